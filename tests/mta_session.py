"""One message through a fresh Exim and a fresh OpenSMTPD of tests/mta_lab.py, over loopback SMTP.

Prints, as JSON, the SMTP replies, whether each message arrived, who owns what each daemon
wrote, and the accounts the daemons ran as next to the host's. tests/test_mta_accounts.py runs it
inside tests/host_accounts.py's namespace; by hand, as root: `python tests/mta_session.py`.
Exit 75 (EX_TEMPFAIL) when another run holds its addresses.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import smtplib
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from mta_lab import (
    MTA_PORT,
    MtaInstance,
    lab_accounts,
    make_lab_directory,
    mta_available,
)
from smtp_sink import MessageSink, serve_smtp

# beside the policy lab's addresses (mta_lab: .21-.25, .31-.40), so both can run at once
HOSTS = {"exim": "127.0.4.51", "opensmtpd": "127.0.4.52"}
# the one relay client every policy trusts, and a remote recipient: the daemons queue the message
# and relay it to the sink as their own accounts (OpenSMTPD delivers no local mail to root)
CLIENT = "127.0.0.1"
RECIPIENT = "someone@example.org"
# what the daemons write as their accounts: Exim's spool and log, OpenSMTPD's queue
OWNED = {"exim": ("spool/input", "log/mainlog"), "opensmtpd": ("var-spool/smtpd/queue",)}
DELIVERY_TIMEOUT_S = 20.0
BUSY = 75


def _ids(path: Path) -> list[int] | None:
    with contextlib.suppress(OSError):
        info = path.stat()
        return [info.st_uid, info.st_gid]
    return None


def _host_ids(name: str) -> list[int] | None:
    """NAME's uid and its same-named group's gid in this namespace's /etc/passwd and /etc/group."""
    try:
        return [pwd.getpwnam(name).pw_uid, grp.getgrnam(name).gr_gid]
    except KeyError:
        return None


def _holders(uid: int, gid: int) -> list[str | None]:
    """The names the host gives UID and GID, None where it has none."""
    user = group = None
    with contextlib.suppress(KeyError):
        user = pwd.getpwuid(uid).pw_name
    with contextlib.suppress(KeyError):
        group = grp.getgrgid(gid).gr_name
    return [user, group]


def _session(host: str, marker: str) -> list[str]:
    """Every reply of one SMTP conversation that hands a message for RECIPIENT to HOST."""
    smtp = smtplib.SMTP(timeout=10.0, source_address=(CLIENT, 0))
    replies: list[tuple[int, bytes]] = []
    try:
        replies.append(smtp.connect(host, MTA_PORT))
        replies.append(smtp.ehlo("client.campus.test"))
        replies.append(smtp.mail("sender@campus.test"))
        replies.append(smtp.rcpt(RECIPIENT))
        message = (
            f"Subject: {marker}\r\nFrom: sender@campus.test\r\nTo: {RECIPIENT}\r\n\r\n{marker}\r\n"
        )
        replies.append(smtp.data(message))
        replies.append(smtp.quit())
    finally:
        smtp.close()
    return [f"{code} {text.decode('ascii', 'replace')}".split("\n", 1)[0] for code, text in replies]


def _arrived(sink: MessageSink, marker: str) -> bool:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        with sink.lock:
            if any(marker.encode() in content for _, _, content in sink.messages):
                return True
        time.sleep(0.2)
    return False


def run(lab: Path) -> dict[str, Any]:
    sink = MessageSink()
    report: dict[str, Any] = {}
    with serve_smtp(sink) as sink_port:
        for kind, host in HOSTS.items():
            instance = MtaInstance(
                kind, "closed", host, lab / f"{kind}-session", sink=("127.0.0.1", sink_port)
            )
            marker = f"relayaudit-mta-session-{kind}-{os.getpid()}"
            instance.start()
            try:
                replies = _session(host, marker)
                delivered = _arrived(sink, marker)
                owned = {path: _ids(instance.directory / path) for path in OWNED[kind]}
            finally:
                instance.stop()
            report[kind] = {"replies": replies, "delivered": delivered, "owners": owned}
    accounts = lab_accounts(lab)
    report["lab_accounts"] = {name: list(ids) for name, ids in accounts.items()}
    report["host_accounts"] = {name: _host_ids(name) for name in accounts}
    report["id_holders"] = {name: _holders(*ids) for name, ids in accounts.items()}
    return report


def main() -> int:
    # a SIGTERM (host_accounts' --kill-child) runs the finally blocks: no daemon outlives the run
    def terminate(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if reason := mta_available("exim") or mta_available("opensmtpd"):
        print(reason, file=sys.stderr)
        return 2
    lock = (Path(tempfile.gettempdir()) / "relayaudit-mta-session.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("another mta_session run holds 127.0.4.51-52", file=sys.stderr)
        return BUSY
    lab = make_lab_directory()
    try:
        print(json.dumps(run(lab), indent=1))
    finally:
        shutil.rmtree(lab, ignore_errors=True)
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
