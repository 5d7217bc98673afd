"""Validation of caller-supplied names and containment of the paths built from them.

Each check here guards against a named threat; tests name the threat too.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from .errors import InvalidInputError

__all__ = [
    "check_component",
    "check_git_ref",
    "contained",
    "generated_id",
    "slugify",
    "split_workspace_name",
]

# One path component: starts with a letter or digit (so never '-', '.', '..'), then a
# conservative set. Guards against traversal and option injection through names.
# A ref is a file under .git/refs: longer names fail with ENAMETOOLONG (file names stop at 255 bytes).
MAX_REF_BYTES = 200

_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_component(field: str, value: str) -> str:
    """Return ``value`` if it is a safe single path component.

    Raises:
        InvalidInputError: empty, a separator, ``..``, a leading ``-``/``.``, or odd characters.
    """
    if not _COMPONENT.fullmatch(value) or ".." in value or value.endswith(".lock"):
        raise InvalidInputError(
            field,
            f"{value!r} is not a valid name: use letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, no '..' and no '/'.",
        )
    return value


def check_git_ref(field: str, value: str) -> str:
    """Return ``value`` if it is a branch name git accepts and that cannot be read as an option.

    Raises:
        InvalidInputError: leading ``-`` (option injection), not a valid git ref name, or longer
            than a file name may be (a ref is a file in the repository).
    """
    if len(value.encode("utf-8", "surrogatepass")) > MAX_REF_BYTES:
        raise InvalidInputError(
            field,
            f"is {len(value)} characters long; a branch name is at most {MAX_REF_BYTES} bytes. Pass a shorter one.",
        )
    bad = (
        not value
        or value.startswith(("-", "/", "."))
        or value.endswith(("/", ".", ".lock"))
        or ".." in value
        or "//" in value
        or "@{" in value
        or value == "@"
        or any(c in value for c in " ~^:?*[\\\x7f")
        or any(ord(c) < 32 for c in value)
        or "/." in value
    )
    if bad:
        raise InvalidInputError(
            field,
            f"{value!r} is not a usable branch name: it must not start with '-', '/' or '.', nor contain "
            "'..', spaces or any of ~^:?*[\\. Pass an existing branch of the repository, e.g. 'main'.",
        )
    return value


def contained(root: Path, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and make sure the result stays inside it.

    Raises:
        InvalidInputError: the resolved path escapes ``root`` (traversal, symlink).
    """
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    try:
        path.relative_to(base)
    except ValueError as e:
        raise InvalidInputError("path", f"{'/'.join(parts)!r} leads outside {base}") from e
    return path


def slugify(text: str, max_len: int = 40) -> str:
    """A lowercase ASCII slug of ``text`` made of ``[a-z0-9-]``; ``task`` when nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or "task"


def generated_id() -> str:
    """A short random id for workspaces that have no issue, PR or branch to be named after."""
    return "w-" + secrets.token_hex(4)


def split_workspace_name(name: str) -> tuple[str, str, str]:
    """Split ``org/repo/slug`` and check each part.

    Raises:
        InvalidInputError: not three safe components.
    """
    parts = name.split("/")
    if len(parts) != 3:
        raise InvalidInputError("workspace", f"{name!r} is not a workspace name; names look like 'org/repo/task-12'.")
    org, repo, slug = parts
    return (
        check_component("workspace", org),
        check_component("workspace", repo),
        check_component("workspace", slug),
    )
