"""agentic-dispatch: an MCP server that hands coding work to agent CLIs in Docker containers."""

__version__ = "0.1.0"
