"""The layers of docs/architecture.md hold: imports only point downward (between layers, and
between the parts of the service), only the MCP front end imports the MCP SDK, and no module
or function grows past what a reader takes in at once."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "server" / "agentic_dispatch"

LAYER = {
    "mcp_server": 5,
    "mcp_watch": 5,
    "cli": 5,
    "cli_views": 5,
    "cli_watch": 5,
    "service": 4,
    "scheduler": 3,
    "workspace": 2,
    "mirrors": 2,
    "repos": 2,
    "gitops": 2,
    "qa": 2,
    "prompts": 2,
    "agents": 2,
    "credentials": 2,
    "store": 2,
    "index": 2,
    "sync": 2,
    "runtime": 1,
    "config": 0,
    "http_auth": 0,
    "models": 0,
    "errors": 0,
    "fileio": 0,
    "naming": 0,
    "safefs": 0,
}


# Inside the service package: the facade wires the parts; a part never imports the facade,
# and imports between parts point downward in this order.
SERVICE_LAYER = {
    "common": 0,
    "catalog": 0,
    "run_files": 1,
    "preflight": 1,
    "qa": 1,
    "drain": 1,
    "disk": 1,
    "delivery": 1,
    "finalise": 2,
    "dispatching": 2,
    "recovery": 3,
    "watching": 0,
    "inspect": 1,
    "insights": 1,
    "control": 3,
    "reports": 4,
    "facade": 5,
}
MAX_MODULE_LINES = 400
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


def test_service_parts_import_only_parts_below_them_and_never_the_facade() -> None:
    service = PKG / "service"
    problems = []
    for path in sorted(service.glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert path.stem in SERVICE_LAYER, f"service/{path.name} has no place in SERVICE_LAYER: add it there"
        for imp in _imports(path):
            if not imp.startswith("agentic_dispatch.service."):
                continue
            target = imp.split(".")[2]
            if target != path.stem and SERVICE_LAYER.get(target, 99) >= SERVICE_LAYER[path.stem]:
                problems.append(f"service/{path.name} imports {imp}")
    assert problems == []


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


def test_no_module_or_function_is_too_long_to_read_at_once() -> None:
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PKG))
        if text.count("\n") > MAX_MODULE_LINES:
            problems.append(f"{name}: {text.count(chr(10))} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _own_lines(node) > MAX_FUNCTION_LINES:
                problems.append(f"{name}: {node.name} has {_own_lines(node)} lines (at most {MAX_FUNCTION_LINES})")
    assert problems == []
