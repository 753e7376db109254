"""Serve the trace receiver: ``python -m tollgate_dev.traces --port 14318 --dir .tollgate/traces``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import uvicorn

from tollgate.ops.serving import server_parser
from tollgate_dev.traces.receiver import create_receiver_app
from tollgate_dev.traces.store import DEFAULT_KEEP, TraceStore


def main(argv: Sequence[str] | None = None) -> None:
    """Run the receiver under uvicorn until interrupted."""
    parser = server_parser(
        "python -m tollgate_dev.traces",
        "Receive OTLP/HTTP spans and keep the recent traces as files.",
    )
    parser.add_argument("--dir", type=Path, required=True, help="where traces are kept")
    parser.add_argument(
        "--keep", type=int, default=DEFAULT_KEEP, help="how many recent traces to keep"
    )
    args = parser.parse_args(argv)
    app = create_receiver_app(TraceStore(args.dir, keep=args.keep))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
