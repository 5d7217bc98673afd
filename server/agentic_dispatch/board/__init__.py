"""The board: runs in a browser, served beside ``/mcp`` by ``serve --transport http``.

- ``app``: :class:`Board`, its routes over the Dispatcher facade (a front end, like the MCP tools);
- ``auth``: the token, the session cookie, the Host/Origin rules;
- ``pages``: the HTML; ``static/``: its stylesheet and script (files of the package, no build step).
"""

from .app import Board

__all__ = ["Board"]
