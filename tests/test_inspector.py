"""The MCP Inspector's CLI (a second, independent MCP client) sees the tools over stdio."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

INSPECTOR = "@modelcontextprotocol/inspector@0.15.0"


def test_mcp_inspector_cli_lists_dispatch_status_resume_and_sync_with_input_and_output_schemas(
    isolated_home: Path,
) -> None:
    npx = shutil.which("npx")
    assert npx, "npx (Node.js) is needed to run the MCP Inspector; install Node.js"
    proc = subprocess.run(
        [npx, "-y", INSPECTOR, "--cli", sys.executable, "-m", "agentic_dispatch", "serve", "--method", "tools/list"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AGENTIC_DISPATCH_HOME": str(isolated_home)},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tools = {t["name"]: t for t in json.loads(proc.stdout)["tools"]}
    for name in ("agentic_dispatch", "agentic_status", "agentic_resume", "agentic_sync"):
        assert tools[name]["inputSchema"]["type"] == "object"
        assert tools[name]["outputSchema"]["type"] == "object"
