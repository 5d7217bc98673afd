"""Hypothesis strategies for the tool fuzz (tests/test_fuzz_tools.py): arguments drawn from a tool's
JSON input schema, mixed with hostile values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONTROL = st.text(
    st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028\u2029\ufeff\u202e\u200b"),
    min_size=1,
    max_size=12,
)
HUGE = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from(["A", "é", "/", "\x00", "😀", "-", "../", "a/b/c", "\n"]),
    st.integers(100_001, 140_000),
)
NUMBERS = st.sampled_from(
    [0, -1, -(2**63), 2**63, 2**64 + 1, 10**30, -(10**30), 0.5, -0.0, 1e308, -1e308, 5e-324, 3.0, 1.5, True, False]
)
UNICODE = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
FIXED_TRICKS = [
    "",
    " ",
    ".",
    "..",
    "../..",
    "../../../../etc/passwd",
    "/",
    "/etc/passwd",
    "/dev/zero",
    "/proc/self/environ",
    "~",
    "~root",
    "~no-such-user-agentic/x",
    "./x",
    "x/../../y",
    "a/b/c",
    "a/b/../c",
    "a//b/c",
    "-",
    "--help",
    "-c",
    "ext::sh",
    "fd::3",
    "file:///etc",
    "file://",
    "https://127.0.0.1:1/o/r.git",
    "https://user:pa55word@127.0.0.1:1/o/r.git",  # pragma: allowlist secret
    "ssh://127.0.0.1:1/o/r.git",
    "git@127.0.0.1:o/r.git",
    "git://127.0.0.1:1/o/r.git",
    "http://[::1",
    "org/repo",
    "org/repo.git",
    "o/r/x/y",
    "C:\\x",
    "\\\\server\\share",
    "shell:",
    "shell:-x",
    "shell:\x00",
    "codex",
    "claude:opus",
    "gemini",
    "nope",
    "main",
    "HEAD",
    "@",
    "refs/heads/main",
    "x.lock",
    "$(touch /tmp/x)",
    "`id`",
    "%n%s%x",
    "{org}{repo}",
    "${HOME}",
]


@dataclass
class Pools:
    """Values the fuzz mixes in: ``valid`` per argument name (so generated calls reach real work),
    ``tricks`` for any string (paths in and around this test's state root, injections)."""

    valid: dict[str, list[Any]] = field(default_factory=dict)
    tricks: list[str] = field(default_factory=list)


def hostile(pools: Pools) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(FIXED_TRICKS + pools.tricks),
        CONTROL,
        HUGE,
        NUMBERS,
        UNICODE,
        ANY_JSON,
        st.lists(st.sampled_from(pools.tricks or FIXED_TRICKS), min_size=1, max_size=3),
    )


def from_schema(schema: dict[str, Any], name: str, pools: Pools) -> st.SearchStrategy[Any]:
    """Values ``schema`` accepts (about: bounds and enums are kept), preferring ``pools.valid[name]``."""
    if "anyOf" in schema:
        return st.one_of([from_schema(s, name, pools) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    valid = pools.valid.get(name)
    if kind == "string":
        return st.sampled_from(valid) if valid else UNICODE
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**31)) + ("exclusiveMinimum" in schema))
        return st.integers(min_value=low, max_value=schema.get("maximum", low + 10**6))
    if kind == "number" and valid:
        return st.sampled_from(valid)
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum", -1e6)),
            max_value=schema.get("maximum", 1e6),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = schema.get("items", {})
        return st.sampled_from(valid) if valid else st.lists(from_schema(items, name, pools), max_size=4)
    if kind == "object" and valid:
        return st.sampled_from(valid)
    if kind == "object":
        values = schema.get("additionalProperties", {})
        keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True) | UNICODE
        return st.dictionaries(keys, from_schema(values, name, pools) if values else ANY_JSON, max_size=4)
    return ANY_JSON


@st.composite
def tool_arguments(draw: st.DrawFn, schema: dict[str, Any], pools: Pools) -> dict[str, Any]:
    """One call's arguments: each is missing, valid or hostile, in a mix that is itself drawn (from
    'almost all valid', so calls reach real work, to 'almost all hostile')."""
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    hostility = draw(st.sampled_from([5, 30, 80]))
    args: dict[str, Any] = _quick(props, pools)
    for name, sub in props.items():
        roll = draw(st.integers(0, 99))
        if name in required and roll < 3:
            continue  # a required argument left out
        if name not in required and roll < 50 and name not in args:
            continue
        bad = draw(st.integers(0, 99)) < hostility
        args[name] = draw(hostile(pools) if bad else from_schema(sub, name, pools))
    if draw(st.integers(0, 99)) < 10:
        extra_names = st.sampled_from(["dryrun", "dry-run", "repository", "Task", "force_push", "__proto__", ""])
        args.update(
            draw(
                st.dictionaries(extra_names | UNICODE, ANY_JSON, min_size=1, max_size=2).map(
                    lambda d: {k: v for k, v in d.items() if k not in props}
                )
            )
        )
    return args


SMALL_TRICKS = ["\x00", "a\x00b", "..", "-x", "--upload-pack=true", "~no-such-user-agentic", "\u202e", "x" * 100_001]


def explicit_cases(schema: dict[str, Any], pools: Pools) -> list[dict[str, Any]]:
    """Calls made before the random ones, so every named trick is tried on every tool at least once:
    the valid arguments, with one string argument replaced by a trick (``repo`` and ``workspace`` get
    every path trick; the others a few), one extra unknown argument, or one required argument left out."""
    props: dict[str, Any] = schema.get("properties", {})
    required = schema.get("required", [])
    base = {n: pools.valid[n][0] for n in required if pools.valid.get(n)} | _quick(props, pools)
    cases: list[dict[str, Any]] = [dict(base), {**base, "dryrun": True}, {**base, "": None}]
    cases += [{k: v for k, v in base.items() if k != n} for n in required]
    cases += [{**base, n: v} for n in required for v in pools.valid.get(n, [])[1:]]  # each seeded workspace
    for name, sub in props.items():
        if not _takes_string(sub):
            continue
        tricks = FIXED_TRICKS + pools.tricks if name in ("repo", "workspace", "path") else SMALL_TRICKS
        cases += [{**base, name: t} for t in tricks]
    for name in ("agents", "workspaces"):  # lists of names
        if name in props:
            cases += [{**base, name: [t]} for t in SMALL_TRICKS + pools.tricks] + [{**base, name: ["shell"] * 1000}]
    return cases


def _takes_string(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" or any(s.get("type") == "string" for s in schema.get("anyOf", []))


def _quick(props: dict[str, Any], pools: Pools) -> dict[str, Any]:
    """A wait in seconds (a ``number`` named ``timeout_seconds``) is never left to its default, which
    makes a long-poll tool wait up to a minute when nothing changes; fuzzed, it stays short."""
    wait = props.get("timeout_seconds", {})
    return {"timeout_seconds": pools.valid["timeout_seconds"][-1]} if wait.get("type") == "number" else {}
