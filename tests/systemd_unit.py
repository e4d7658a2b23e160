"""The shipped systemd unit copied for `systemd-analyze`: ExecStart's program swapped for one that exists."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "relayaudit.service"


def unit_copy(tmp_path: Path, drop_ins: Mapping[str, str] | None = None) -> Path:
    """A copy of the unit under `tmp_path` with a stand-in program and these drop-ins (name: text)."""
    text = UNIT.read_text()
    program = next(
        shlex.split(line.partition("=")[2])[0]
        for line in text.splitlines()
        if line.startswith("ExecStart=")
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    stand_in = tmp_path / "relayaudit"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "relayaudit.service"
    unit.write_text(text.replace(program, str(stand_in)))
    if drop_ins:
        directory = tmp_path / "relayaudit.service.d"
        directory.mkdir()
        for name, content in drop_ins.items():
            (directory / name).write_text(content)
    return unit


_INSTALLED_UNITS = ("/lib/systemd/", "/usr/lib/systemd/", "/etc/systemd/", "/run/systemd/")


def own_complaints(stderr: str) -> str:
    """`systemd-analyze verify`'s complaints about the units under test, not about units other
    packages installed on this machine (Debian's request-tracker5.service names databases and
    web servers that are not installed: verify reports those too)."""
    return "\n".join(
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(_INSTALLED_UNITS)
    )


def verify_problems(exe: str, unit: Path) -> str:
    """What `systemd-analyze verify` says is wrong with `unit` (and its drop-ins); "" when
    nothing. It exits 0 on unknown keys and bad values: its messages are the verdict."""
    proc = subprocess.run(
        [exe, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = "\n".join(p for p in (proc.stdout.strip(), own_complaints(proc.stderr)) if p)
    return problems or ("" if proc.returncode == 0 else f"exit {proc.returncode}")
