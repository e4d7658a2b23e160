"""Runs one measured command: wall time, CPU (user+sys) and peak RSS from wait4, bounded in time.

The command gets its own process group; on its deadline (or when the caller's planned stop time
comes) the group gets SIGTERM, then SIGKILL. CPU and peak RSS are those wait4() reports for the
child: its own plus those of the children it waited for (`relayaudit sweep --processes N` forks
and waits), so CPU is the whole tree's while ru_maxrss is the largest single process; with
`tree_every` the summed RSS of the process group is sampled too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Measured",
    "active_opens",
    "group_rss_mb",
    "proc_rss_mb",
    "run_measured",
    "syn_sent_count",
]

_TICK = 0.1


@dataclass
class Measured:
    """What one run cost."""

    argv: list[str]
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    maxrss_mb: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    stopped: bool = False  # stopped on purpose after `stop_after` seconds
    stdout_path: str = ""
    stderr_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def stdout(self) -> str:
        return Path(self.stdout_path).read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(encoding="utf-8", errors="replace")

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": " ".join(self.argv),
            "wall_s": round(self.wall_s, 3),
            "cpu_user_s": round(self.user_s, 3),
            "cpu_sys_s": round(self.sys_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "peak_rss_mb": round(self.maxrss_mb, 1),
            "returncode": self.returncode,
            "timed_out": self.timed_out,
            "stopped_on_purpose": self.stopped,
            **self.extra,
        }


def _killpg(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_measured(
    argv: list[str],
    *,
    name: str,
    out_dir: Path,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stop_after: float | None = None,
    on_tick: Callable[[int, float], None] | None = None,
    tick: float = _TICK,
    tree_every: float | None = None,
) -> Measured:
    """Run argv to completion (or until `timeout`; or SIGTERM at `stop_after` seconds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = Measured(
        argv=list(argv),
        stdout_path=str(out_dir / f"{name}.stdout"),
        stderr_path=str(out_dir / f"{name}.stderr"),
    )
    with open(result.stdout_path, "wb") as out, open(result.stderr_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    deadline = started + timeout
    planned = started + stop_after if stop_after is not None else None
    status = 0
    rusage = None
    termed_at: float | None = None
    next_tree = started
    tree_peak = 0.0
    try:
        # bounded: ends when the child exits, and the child is killed at the deadline
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            now = time.monotonic()
            if on_tick is not None:
                on_tick(proc.pid, now - started)
            if tree_every is not None and now >= next_tree:
                next_tree = now + tree_every
                tree_peak = max(tree_peak, group_rss_mb(proc.pid))
            if planned is not None and now >= planned and termed_at is None:
                result.stopped = True
                termed_at = now
                _killpg(proc.pid, signal.SIGTERM)
            elif now >= deadline and termed_at is None:
                result.timed_out = True
                result.extra["at_timeout"] = group_states(proc.pid)  # what it was stuck in
                termed_at = now
                _killpg(proc.pid, signal.SIGTERM)
            elif termed_at is not None and now >= termed_at + 10:
                _killpg(proc.pid, signal.SIGKILL)
                if now >= termed_at + 30:
                    raise RuntimeError(f"{argv[0]} survived SIGKILL for 20 s")
            time.sleep(tick)
    finally:
        if rusage is None:  # interrupted: leave nothing running
            _killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                _, status, rusage = os.wait4(proc.pid, 0)
        else:
            _killpg(proc.pid, signal.SIGKILL)  # any grandchildren left in the group
    result.wall_s = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    result.returncode = proc.returncode
    if rusage is not None:
        result.user_s = rusage.ru_utime
        result.sys_s = rusage.ru_stime
        result.maxrss_mb = rusage.ru_maxrss / 1024  # Linux: KiB
    if tree_every is not None:
        result.extra["peak_group_rss_mb"] = round(tree_peak, 1)
    return result


def group_rss_mb(pgid: int) -> float:
    """Sum of VmRSS over the live processes of process group `pgid` (forked workers included)."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat.rpartition(")")[2].split()[2]) != pgid:
                continue
        except (OSError, ValueError, IndexError):
            continue
        total += proc_rss_mb(int(entry.name))[0]
    return total


def group_states(pgid: int) -> list[str]:
    """'pid state wchan command' for each live process of group `pgid` (a stuck run's picture)."""
    rows = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            if int(fields[2]) != pgid:
                continue
            wchan = Path(entry.path, "wchan").read_text().strip() or "-"
            cmd = (
                Path(entry.path, "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")[:120]
            )
        except (OSError, ValueError, IndexError):
            continue
        rows.append(f"{entry.name} {fields[0]} {wchan} {cmd.strip()}")
    return rows


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MiB; (0, 0) when it is gone."""
    rss = hwm = 0.0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return rss, hwm
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def syn_sent_count(pid: int) -> tuple[int, int]:
    """(SYN_SENT, ESTABLISHED) TCP sockets in the network namespace of `pid`."""
    syn = est = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split(None, 4)
                    state = fields[3] if len(fields) > 3 else ""
                    if state == "02":
                        syn += 1
                    elif state == "01":
                        est += 1
        except OSError:
            continue
    return syn, est


def active_opens(pid: int) -> int | None:
    """TCP ActiveOpens (connect() calls that sent a SYN) in the network namespace of `pid`."""
    try:
        lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    except OSError:
        return None
    tcp = [line.split() for line in lines if line.startswith("Tcp:")]
    if len(tcp) < 2:
        return None
    header, values = tcp[0], tcp[1]
    try:
        return int(values[header.index("ActiveOpens")])
    except (ValueError, IndexError):
        return None
