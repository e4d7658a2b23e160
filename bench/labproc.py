"""The benchmark's SMTP lab process: serves one campus (a JSON list of ServerSpecs) until told to stop.

Run as ``python bench/labproc.py SPECS.json --max-seconds N``. It binds every listener, prints
``READY <listeners>`` on stdout, and stops (closing every listener and connection) on SIGTERM,
SIGINT, end of stdin, or after --max-seconds, whichever comes first. It is one lean asyncio
process (relayaudit.lab), so its CPU time can be read from /proc/PID/stat by the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from relayaudit import eventloop
from relayaudit.lab import Behaviour, Lab, ServerSpec


def load_specs(path: Path) -> list[ServerSpec]:
    """ServerSpecs from the JSON file the benchmark wrote (a list of plain objects)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of server specs")
    specs = []
    for item in raw:
        specs.append(
            ServerSpec(
                host=str(item["host"]),
                port=int(item["port"]),
                behaviour=Behaviour(item["behaviour"]),
                hostname=str(item.get("hostname", "mx.campus.test")),
                reply_delay=float(item.get("reply_delay", 0.0)),
                flight_delay=float(item.get("flight_delay", 0.0)),
                error_limits=bool(item.get("error_limits", False)),
                error_sleep=float(item.get("error_sleep", 1.0)),
            )
        )
    return specs


async def serve(specs: list[ServerSpec], max_seconds: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stdin_closed() -> None:
        # the benchmark holds our stdin open; EOF means it went away without stopping us
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    with contextlib.suppress(OSError, ValueError, NotImplementedError):
        loop.add_reader(sys.stdin.fileno(), stdin_closed)
    lab = Lab(specs, local_domains=("campus.test",), campus_domains=("campus.test",))
    try:
        await lab.start()
    except OSError as exc:
        print(f"FAILED {exc}", flush=True)
        return 2
    try:
        print(f"READY {len(specs)}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    finally:
        await lab.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("specs", type=Path)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the lab's loop (default auto: uvloop when installed, serving both tools alike)",
    )
    args = parser.parse_args()
    return eventloop.run(serve(load_specs(args.specs), args.max_seconds), args.event_loop)


if __name__ == "__main__":
    sys.exit(main())
