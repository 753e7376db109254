"""The command line every Tollgate HTTP server starts with: where to bind.

The codec server, the provider sandbox and the trace receiver each add their own
options after these.
"""

from __future__ import annotations

import argparse

__all__ = ["server_parser"]


def server_parser(
    prog: str, description: str, *, port: int | None = None
) -> argparse.ArgumentParser:
    """A parser with ``--host`` (127.0.0.1 unless told otherwise: only this machine can
    call) and ``--port``, which defaults to ``port``, or is required without one."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    if port is None:
        parser.add_argument("--port", type=int, required=True, help="port to bind")
    else:
        parser.add_argument("--port", type=int, default=port, help="port to bind")
    return parser
