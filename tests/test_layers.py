"""The layers of docs/architecture.md hold: imports only point downward, and only the MCP
front end imports the MCP SDK."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "server" / "agentic_dispatch"

LAYER = {
    "mcp_server": 5,
    "cli": 5,
    "service": 4,
    "scheduler": 3,
    "workspace": 2,
    "prompts": 2,
    "agents": 2,
    "credentials": 2,
    "store": 2,
    "sync": 2,
    "runtime": 1,
    "config": 0,
    "models": 0,
    "errors": 0,
    "naming": 0,
    "safefs": 0,
}


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
        if p.name != "mcp_server.py" and any(i == "mcp" or i.startswith(("mcp.", "mcp_types")) for i in _imports(p))
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
