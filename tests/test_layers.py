"""The layers of docs/architecture.md hold: imports only point downward (between layers, and
between the parts of the service), only the MCP front end imports the MCP SDK, no function
grows past what a reader takes in at once, and every in-package import names what its
module exports in ``__all__``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "server" / "agentic_dispatch"

LAYER = {
    "mcp_server": 5,
    "mcp_watch": 5,
    "mcp_tools": 5,
    "cli": 5,
    "cli_args": 5,
    "cli_views": 5,
    "cli_watch": 5,
    "board": 5,
    "service": 4,
    "scheduler": 3,
    "gateway": 3,
    "workspace": 2,
    "mirrors": 2,
    "repos": 2,
    "gitops": 2,
    "qa": 2,
    "prompts": 2,
    "agents": 2,
    "credentials": 2,
    "store": 2,
    "events": 2,
    "index": 2,
    "sync": 2,
    "checkpoints": 2,
    "scope": 2,
    "runtime": 1,
    "config": 0,
    "http_auth": 0,
    "models": 0,
    "errors": 0,
    "fileio": 0,
    "naming": 0,
    "safefs": 0,
}


# Inside the service package, cut by job: the facade wires the jobs; a job never imports the
# facade, and imports between jobs (and between the modules of one job) point downward.
SERVICE_JOBS = {
    "catalog": 0,
    "containers": 0,
    "run_files": 0,
    "delivery": 1,
    "runs": 2,
    "intake": 3,
    "views": 3,
    "facade": 4,
}
SERVICE_MODULES = {
    "runs": {
        "lifecycle": 0,
        "network": 0,
        "qa_gate": 1,
        "disk_cap": 0,
        "retention": 1,
        "stalls": 1,
        "executor": 2,
        "launch": 3,
        "recovery": 4,
        "control": 4,
    },
    "intake": {"preflight": 0, "dispatch": 1, "reviews": 2},
    "views": {"status": 0, "inspection": 0, "insights": 0, "watching": 1},
}
MAX_FUNCTION_LINES = 60


def _module_layer(path: Path) -> tuple[str, int]:
    rel = path.relative_to(PKG).with_suffix("")
    top = rel.parts[0]
    return ".".join(rel.parts), LAYER.get(top, -1)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(PKG).parent.parts[: len(path.relative_to(PKG).parent.parts) - node.level + 1]
                out.append(".".join(("agentic_dispatch", *base, node.module or "")).rstrip("."))
            else:
                out.append(node.module or "")
    return out


def test_only_the_mcp_front_end_imports_the_mcp_sdk() -> None:
    offenders = [
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if not (p.parent == PKG and p.name.startswith("mcp_"))  # the MCP front end: mcp_server.py, mcp_watch.py
        and any(i == "mcp" or i.startswith(("mcp.", "mcp_types")) for i in _imports(p))
    ]
    assert offenders == []


def test_imports_only_point_downward() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        name, layer = _module_layer(path)
        assert layer >= 0, f"{name} has no layer in this test: add it to LAYER and to docs/architecture.md"
        for imp in _imports(path):
            if not imp.startswith("agentic_dispatch."):
                continue
            target = imp.split(".")[1]
            if target in LAYER and target != name.split(".")[0] and LAYER[target] > layer:
                problems.append(f"{name} (layer {layer}) imports {imp} (layer {LAYER[target]})")
    assert problems == []


def _service_place(rel: tuple[str, ...]) -> tuple[int, int]:
    """(the job's rank, the module's rank inside its job) of ``service/<rel>``."""
    job = rel[0].removesuffix(".py")
    assert job in SERVICE_JOBS, f"service/{'/'.join(rel)} belongs to no job in SERVICE_JOBS: add it there"
    if len(rel) == 1:
        return SERVICE_JOBS[job], 0
    module = rel[1].removesuffix(".py")
    assert module in SERVICE_MODULES[job], f"service/{'/'.join(rel)} has no place in SERVICE_MODULES: add it there"
    return SERVICE_JOBS[job], SERVICE_MODULES[job][module]


def test_service_jobs_import_only_jobs_below_them_and_never_the_facade() -> None:
    service = PKG / "service"
    problems = []
    for path in sorted(service.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        here = _service_place(path.relative_to(service).parts)
        for imp in _imports(path):
            if not imp.startswith("agentic_dispatch.service.") or imp.count(".") < 2:
                continue
            parts = tuple(imp.split(".")[2:])
            target = (parts[0] + ".py",) if len(parts) == 1 else (parts[0], parts[1] + ".py")
            there = _service_place(target)
            same_job = target[0].removesuffix(".py") == path.relative_to(service).parts[0].removesuffix(".py")
            if (same_job and there[1] >= here[1] and target != path.relative_to(service).parts) or (
                not same_job and there[0] >= here[0]
            ):
                problems.append(f"{path.relative_to(PKG)} imports {imp}")
    assert problems == []


def _exports(module: str) -> set[str] | None:
    """The names ``__all__`` of a package module lists (``None`` when it declares none)."""
    rel = Path(*module.split(".")[1:])
    path = PKG / rel.with_suffix(".py") if (PKG / rel.with_suffix(".py")).exists() else PKG / rel / "__init__.py"
    if not path.exists():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}  # type: ignore[attr-defined]
    return None


def test_every_in_package_import_names_what_its_module_exports_in_all() -> None:
    """``__all__`` is the contract: a module's other names are its own business."""
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = path.relative_to(PKG).parent.parts[: len(path.relative_to(PKG).parent.parts) - node.level + 1]
            module = ".".join(("agentic_dispatch", *base, node.module or "")).rstrip(".")
            for alias in node.names:
                submodule = PKG.joinpath(*module.split(".")[1:], alias.name)
                if submodule.with_suffix(".py").exists() or submodule.is_dir():
                    continue  # a module, not a name
                exported = _exports(module)
                if exported is None:
                    problems.append(f"{path.relative_to(PKG)}: {module} has no __all__")
                elif alias.name not in exported:
                    problems.append(f"{path.relative_to(PKG)}: {alias.name} is not in {module}.__all__")
    assert sorted(set(problems)) == []


def _nested_defs(node: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield child
        else:
            yield from _nested_defs(child)


def _span(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    assert node.end_lineno is not None
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return node.end_lineno - first + 1


def _own_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function body's lines without the functions and classes defined inside it (a tool
    factory is as long as its tools, and each tool is measured on its own). The signature is
    not counted: a typed tool with many parameters is long there and simple inside."""
    assert node.end_lineno is not None
    body = node.end_lineno - node.body[0].lineno + 1
    return body - sum(_span(d) for d in _nested_defs(node))


def test_no_function_is_too_long_to_read_at_once() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PKG))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _own_lines(node) > MAX_FUNCTION_LINES:
                problems.append(f"{name}: {node.name} has {_own_lines(node)} lines (at most {MAX_FUNCTION_LINES})")
    assert problems == []


FRONT_ENDS = (
    *("cli.py", "cli_args.py", "cli_views.py", "cli_watch.py", "mcp_server.py", "mcp_watch.py", "mcp_tools.py"),
    *("board/app.py", "board/auth.py", "board/pages.py"),
)


def test_the_front_ends_use_only_the_facades_documented_methods() -> None:
    """The facade is the boundary: every attribute a front end reads of the service is a public,
    documented method of ``Dispatcher`` (with ``Raises:`` where it raises), never one of its parts."""
    facade = ast.parse((PKG / "service" / "facade.py").read_text(encoding="utf-8"))
    cls = next(n for n in facade.body if isinstance(n, ast.ClassDef) and n.name == "Dispatcher")
    methods = {
        n.name: ast.get_docstring(n) or ""
        for n in cls.body
        if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")
    }
    used: set[str] = set()
    for name in FRONT_ENDS:
        tree = ast.parse((PKG / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            base = node.value
            if (
                isinstance(base, ast.Call)
                and (getattr(base.func, "id", "") == "_svc" or getattr(base.func, "attr", "") == "dispatcher")
            ) or (isinstance(base, ast.Name) and base.id in {"svc", "dispatcher"}):
                used.add(node.attr)
    assert used and used <= set(methods), sorted(used - set(methods))
    undocumented = sorted(m for m in used if not methods[m])
    assert undocumented == []


def test_the_architecture_files_list_names_every_module_and_nothing_else() -> None:
    doc = (PKG.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("\n## Files\n", 1)[1]
    listed = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in (part.strip("`") for part in line.split("|")[1].replace(",", " ").split())
    }
    on_disk = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")}
    assert sorted(on_disk - listed) == [], "add these to the Files list of docs/architecture.md"
    assert sorted(listed - on_disk) == [], "these are listed in docs/architecture.md but are gone"
