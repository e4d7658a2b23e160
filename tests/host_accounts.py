"""Run a command as on a host where the MTA accounts do (or do not) exist, without changing the host.

Copies of /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow go to a temporary PREFIX, with
every MTA account (Debian-exim, opensmtpd, opensmtpq) taken out; `useradd`/`groupadd --prefix
PREFIX` then add the accounts a case asks for, allocating ids as on a real installation; and the
command runs in a private mount namespace (`unshare --mount`) where PREFIX's passwd and group are
bind-mounted over the host's. The host's files are only read.

By hand, e.g. the real-MTA tests on a host where the Debian packages once created all three:

    python tests/host_accounts.py [--account NAME]... -- python -m pytest tests/test_exim_opensmtpd.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MTA_ACCOUNTS", "debian_account", "host_accounts_available", "run_with_accounts"]

MTA_ACCOUNTS = ("Debian-exim", "opensmtpd", "opensmtpq")
_DATABASES = ("passwd", "group", "shadow", "gshadow")
_ACCOUNT_TOOLS = ("useradd", "groupadd")

_BIND = """\
set -e
mount --make-rprivate /
mount --bind "$1/passwd" /etc/passwd
mount --bind "$1/group" /etc/group
shift
exec "$@"
"""


def debian_account(name: str) -> list[str]:
    """The useradd command for NAME as the Debian packages' maintainer scripts create it."""
    return [
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        name,
    ]


def host_accounts_available() -> str | None:
    """None when run_with_accounts can work here, else why not."""
    if not sys.platform.startswith("linux"):
        return f"a private mount namespace needs Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "needs root: `unshare --mount` and bind mounts over /etc/passwd and /etc/group"
    for tool in ("unshare", "mount", *_ACCOUNT_TOOLS):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    return None


def _without_mta_accounts(text: str) -> str:
    kept = [line for line in text.splitlines() if line.split(":", 1)[0] not in MTA_ACCOUNTS]
    return "".join(f"{line}\n" for line in kept)


def _prefix_tree(prefix: Path, setup: Sequence[Sequence[str]]) -> Path:
    """PREFIX/etc: the host's account databases minus the MTA accounts, plus what SETUP adds."""
    etc = prefix / "etc"
    etc.mkdir()
    for name in (*_DATABASES, "login.defs"):
        source = Path("/etc") / name
        if not source.exists():
            continue
        shutil.copy2(source, etc / name)  # mode and group too: shadow stays 0640
        if name in _DATABASES:
            text = source.read_text(encoding="utf-8")
            (etc / name).write_text(_without_mta_accounts(text), encoding="utf-8")
    for command in setup:
        if not command or command[0] not in _ACCOUNT_TOOLS:
            raise ValueError(f"setup commands are {' or '.join(_ACCOUNT_TOOLS)}, not {command!r}")
        argv = [command[0], "--prefix", str(prefix), *command[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return etc


def run_with_accounts(
    command: Sequence[str],
    *,
    setup: Sequence[Sequence[str]],
    timeout: float,
    capture_output: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND where the user database is the host's with only the MTA accounts SETUP adds.

    SETUP holds useradd/groupadd commands (without --prefix); none means no MTA account exists.
    """
    with tempfile.TemporaryDirectory(prefix="relayaudit-accounts-") as prefix:
        etc = _prefix_tree(Path(prefix), setup)
        # --kill-child: a timeout that kills unshare also ends the command
        unshare = ["unshare", "--mount", "--fork", "--kill-child=SIGTERM"]
        return subprocess.run(
            [*unshare, "sh", "-c", _BIND, "sh", str(etc), *command],
            stdin=subprocess.DEVNULL,
            capture_output=capture_output,
            text=True,
            timeout=timeout,
            check=False,
        )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--account",
        action="append",
        choices=MTA_ACCOUNTS,
        help="an account to create as Debian does (repeatable; default: all three)",
    )
    parser.add_argument("--none", action="store_true", help="create no MTA account at all")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    if reason := host_accounts_available():
        parser.error(reason)
    names = [] if args.none else (args.account or list(MTA_ACCOUNTS))
    result = run_with_accounts(
        args.command,
        setup=[debian_account(name) for name in names],
        timeout=args.timeout,
        capture_output=False,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
