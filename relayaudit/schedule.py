"""When the daemon sweeps next: fixed intervals or 5-field cron expressions, with jitter; pure."""

from __future__ import annotations


def parse_cron(expr: str) -> object:
    raise ValueError("cron expressions are not supported yet")
