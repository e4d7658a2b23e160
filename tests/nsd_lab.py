"""A real authoritative DNS server for tests: Debian's NSD on a free 127.0.0.1 port, unprivileged config.

The recipe is /work/shared's NSD note, in short: no setuid, no database, no remote control, the
state files in the instance's own directory. `provide-xfr: 127.0.0.1 NOKEY` allows zone
transfers to loopback. Without NSD the tests that need it skip, or fail when
RELAYAUDIT_REQUIRE_NSD=1 (.ci/run sets it), so a broken install never passes as skipped tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopback import stop_process

__all__ = ["NSD", "Nsd", "nsd_server", "require_nsd"]

NSD = "/usr/sbin/nsd"


def require_nsd() -> None:
    """Skip without NSD; with RELAYAUDIT_REQUIRE_NSD=1 fail instead."""
    if Path(NSD).is_file() and shutil.which("nsd-checkzone"):
        return
    reason = f"NSD is not installed ({NSD}; Debian package nsd, installed by scripts/test)"
    if os.environ.get("RELAYAUDIT_REQUIRE_NSD") == "1":
        pytest.fail(f"RELAYAUDIT_REQUIRE_NSD=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    # a port free for both UDP and TCP on 127.0.0.1 (NSD listens on both)
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for NSD")


@dataclass(frozen=True)
class Nsd:
    port: int
    directory: Path


def _config(directory: Path, port: int, zones: Mapping[str, str], xfr: bool) -> str:
    lines = [
        "server:",
        f"    ip-address: 127.0.0.1@{port}",
        f'    zonesdir: "{directory}"',
        '    username: ""',
        '    database: ""',
        '    pidfile: "nsd.pid"',
        '    xfrdfile: "xfrd.state"',
        '    zonelistfile: "zone.list"',
        "    server-count: 1",
        "remote-control:",
        "    control-enable: no",
    ]
    for name in zones:
        lines += ["zone:", f"    name: {name}", f"    zonefile: {name}.zone"]
        if xfr:
            lines.append("    provide-xfr: 127.0.0.1 NOKEY")
    return "\n".join(lines) + "\n"


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def nsd_server(directory: Path, zones: Mapping[str, str], *, xfr: bool = True) -> Iterator[Nsd]:
    """NSD serving `zones` (name -> zone file text) on 127.0.0.1; stopped on exit."""
    require_nsd()
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in zones.items():
        (directory / f"{name}.zone").write_text(text, encoding="utf-8")
        check = subprocess.run(
            ["nsd-checkzone", name, str(directory / f"{name}.zone")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    conf = directory / "nsd.conf"
    conf.write_text(_config(directory, port, zones, xfr), encoding="utf-8")
    proc = subprocess.Popen(
        [NSD, "-d", "-c", str(conf)],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"nsd exited {proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError("nsd did not listen within 10 s")
            time.sleep(0.05)
        yield Nsd(port=port, directory=directory)
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()
