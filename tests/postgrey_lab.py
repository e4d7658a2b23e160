"""A real postgrey (Debian's greylisting policy server) on loopback, with a fresh database per use."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from loopback import stop_process

__all__ = ["POSTGREY", "postgrey", "postgrey_available"]

POSTGREY = "/usr/sbin/postgrey"
_USER = "postgrey"  # the package's account: root starts it, it drops to this user
START_TIMEOUT_S = 10.0


def postgrey_available() -> str | None:
    """None when postgrey can run here, else the reason it cannot."""
    if not Path(POSTGREY).exists():
        return f"{POSTGREY} not found: install Debian's postgrey (scripts/test does, as root)"
    if shutil.which("perl") is None:
        return "perl not found: postgrey is a Perl program"
    if os.geteuid() != 0:
        return "postgrey is started as root here (it drops to its own account)"
    try:
        pwd.getpwnam(_USER)
    except KeyError:
        return f"no `{_USER}` user: the postgrey package is not installed properly"
    return None


@contextlib.contextmanager
def postgrey(
    host: str, port: int, *, delay: int = 3, whitelist_recipients: tuple[str, ...] = ()
) -> Iterator[Path]:
    """postgrey on host:port (loopback only) with a fresh database in a new directory, greylisting
    every triplet for `delay` seconds; `whitelist_recipients` (postgrey's file format: a domain,
    `user@`, or /regexp/) pass at once. Yields the directory; stopped and removed on exit."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"postgrey must listen on loopback, not {host}")
    if reason := postgrey_available():
        raise RuntimeError(reason)
    account = pwd.getpwnam(_USER)
    directory = Path(tempfile.mkdtemp(prefix="relayaudit-postgrey-"))
    directory.chmod(0o755)
    db = directory / "db"
    db.mkdir()
    os.chown(db, account.pw_uid, account.pw_gid)
    empty = directory / "empty"
    empty.write_text("", encoding="ascii")
    recipients = directory / "whitelist_recipients"
    recipients.write_text("".join(f"{r}\n" for r in whitelist_recipients), encoding="ascii")
    log = (directory / "postgrey.log").open("wb")
    # the whitelist options replace /etc/postgrey's lists (which pass postmaster@ at once);
    # --auto-whitelist-clients=0: a client is never whitelisted after its first successes
    proc = subprocess.Popen(
        [
            "perl",
            "-T",
            POSTGREY,
            f"--inet={host}:{port}",
            f"--dbdir={db}",
            f"--user={_USER}",
            f"--group={_USER}",
            f"--delay={delay}",
            "--auto-whitelist-clients=0",
            f"--whitelist-clients={empty}",
            f"--whitelist-recipients={recipients}",
            "--hostname=pg.campus.test",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(host, port, proc, directory)
        yield directory
    finally:
        stop_process(proc)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], directory: Path) -> None:
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = (directory / "postgrey.log").read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"postgrey exited with {proc.returncode}:\n{text[-2000:]}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"postgrey not listening on {host}:{port} within {START_TIMEOUT_S:g}s")
