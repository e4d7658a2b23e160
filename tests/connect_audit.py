"""Records every socket connect and bind of this process with an audit hook; run as a child process.

Audit hooks cannot be removed, so tests run this file as a child:

    python tests/connect_audit.py RECORD.json relayaudit ARGS...   # relayaudit's command line
    python tests/connect_audit.py RECORD.json property             # test_scope_guard's property

and read RECORD.json: a list of [event, family, host, port], event "socket.connect" or
"socket.bind", family "AF_INET" or "AF_INET6" (Unix sockets are left out). uvloop is kept out of
this process: its loop opens listeners in C, where no audit hook sees them, so every socket here
is opened through Python's socket module.

The hook also refuses (EPERM) every connect to an address that is not loopback, after recording
it: whatever the code under test gets wrong, nothing leaves this machine.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["Record", "loopback", "records"]

Record = tuple[str, str, str, int]

#: What the hook saw so far (the property clears it between commands).
records: list[Record] = []


def loopback(host: object) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback written as IPv4-mapped IPv6 (Linux routes it there)."""
    try:
        address = ipaddress.ip_address(str(host))  # a zone id (fe80::1%eth0) is not loopback
    except ValueError:
        return False  # a name: socket.connect would resolve it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in ("socket.connect", "socket.bind"):
        return
    sock, address = args
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        records.append((event, socket.AddressFamily(sock.family).name, address[0], address[1]))
        if event == "socket.connect" and not loopback(address[0]):
            raise PermissionError(errno.EPERM, f"connect_audit: {address[0]} is not loopback")


def main(argv: list[str]) -> int:
    record_path, command, *rest = argv
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # an import of uvloop now fails
    sys.modules.setdefault("connect_audit", sys.modules[__name__])  # one `records`, not two
    sys.addaudithook(_hook)
    try:
        if command == "relayaudit":
            from relayaudit.cli import main as relayaudit  # noqa: PLC0415 - after the hook

            return relayaudit(rest)
        if command == "property":
            from test_scope_guard import sweeps_connect_only_inside_scope  # noqa: PLC0415

            sweeps_connect_only_inside_scope()
            return 0
        raise SystemExit(f"unknown command {command!r}")
    finally:
        Path(record_path).write_text(json.dumps(records), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
