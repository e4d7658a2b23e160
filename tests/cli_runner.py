"""relayaudit's command line for tests: in this process, or as a child run to its end or waited on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relayaudit.cli import main

__all__ = [
    "ROOT",
    "run_cli",
    "run_cli_blocking",
    "run_cli_into_closed_pipe",
    "run_cli_into_head",
    "run_main",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """relayaudit's main() in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _child_env() -> dict[str, str]:
    # the child imports this checkout; argparse wraps usage lines at 80 columns everywhere
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}


async def run_cli(*args: str, timeout: float = 60, cwd: Path | None = None) -> tuple[int, str, str]:
    """`python -m relayaudit ARGS` as a child: (exit code, stdout, stderr).

    A child still running after `timeout` seconds is killed and the TimeoutError raised.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayaudit",
        *args,
        cwd=cwd,
        env=_child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_cli_blocking(*args: str, cwd: Path = ROOT, timeout: float = 60) -> tuple[int, str, str]:
    """run_cli for tests without an event loop (the daemon's process-wide logging stays out of pytest)."""
    proc = subprocess.run(
        [sys.executable, "-m", "relayaudit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_child_env(),
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_cli_into_closed_pipe(*args: str, cwd: Path = ROOT, timeout: float = 60) -> tuple[int, str]:
    """`python -m relayaudit ARGS` writing into a pipe whose reader has already gone, as `| head`
    leaves it once it has its lines: (exit code, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "relayaudit", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=_child_env(),
            timeout=timeout,
            check=False,
        )
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def run_cli_into_head(
    *args: str, lines: int = 1, cwd: Path = ROOT, timeout: float = 60
) -> tuple[int, str, str]:
    """`python -m relayaudit ARGS | head -n LINES`: (relayaudit's exit code, head's output,
    relayaudit's stderr)."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "relayaudit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=_child_env(),
    )
    assert cli.stdout is not None and cli.stderr is not None
    try:
        head = subprocess.Popen(
            ["head", "-n", str(lines)], stdin=cli.stdout, stdout=subprocess.PIPE, text=True
        )
        cli.stdout.close()  # head holds the only read end: once it exits, writes fail
        out, _ = head.communicate(timeout=timeout)
        err = cli.stderr.read().decode()
        code = cli.wait(timeout)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        cli.stderr.close()
    return code, out, err


async def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: Any) -> None:
    """Poll `check` every 0.2 s for at most `timeout` s; fail at once if `proc` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.returncode is not None:
            raise AssertionError(f"relayaudit exited {proc.returncode} waiting for {what}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
