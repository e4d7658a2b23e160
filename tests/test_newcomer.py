"""A newcomer's first hour (issue 32): `check`'s progress line under a real pseudo-terminal,
`check --timeout`, and the other commands a first-time user meets. Loopback only (127.0.233.x)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_runner import run_main
from loopback import lab_thread, read_banner

from relayaudit.demo import DEMO_LAB, ROLES, new_run_dir
from relayaudit.lab import Behaviour, ServerSpec

ROOT = Path(__file__).resolve().parent.parent
TARPIT = ServerSpec(host="127.0.233.1", port=2525, behaviour=Behaviour.TARPIT)

pytestmark = pytest.mark.usefixtures("loopback_only")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}


def _check_under_pty(*args: str) -> tuple[int, str, str]:
    """`relayaudit check ARGS` with standard error on a pseudo-terminal (os.openpty) and
    standard output on a pipe: (exit code, stdout, what the terminal received)."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayaudit", "check", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=_env(),
    )
    os.close(follower)
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        reader.join(5)
        os.close(leader)
    return proc.returncode, out.decode(), seen.decode(errors="replace")


def test_check_on_a_terminal_says_what_it_waits_for_at_most_once_a_second() -> None:
    with lab_thread(TARPIT):
        code, out, terminal = _check_under_pty(
            "127.0.233.1", "--port", "2525", "--timeout", "2", "--no-transcript"
        )
    assert code == 0, (out, terminal)
    assert "NO-BANNER" in out
    assert "127.0.233.1:2525: waiting for the greeting, 1 s of 2 s" in terminal, terminal
    assert (
        "127.0.233.1:2525: waiting for an answer to QUIT (no greeting came), 1 s of 2 s"
    ) in terminal, terminal
    # each update overwrites the line; the last one clears it
    updates = terminal.count("\r\x1b[K127.0.233.1:2525: waiting for")
    assert 2 <= updates <= 4, terminal  # about 4 s of waits, at most one line a second
    assert terminal.rstrip("\r\n").endswith("\r\x1b[K") or "\r\x1b[K\r" in terminal, terminal


def test_check_prints_no_progress_line_with_json_or_off_a_terminal() -> None:
    with lab_thread(TARPIT):
        code, _out, terminal = _check_under_pty(
            "127.0.233.1", "--port", "2525", "--timeout", "1", "--json"
        )
        assert code == 0
        assert "waiting for" not in terminal
        piped = subprocess.run(
            [
                sys.executable,
                "-m",
                "relayaudit",
                "check",
                "127.0.233.1",
                "--port",
                "2525",
                "--timeout",
                "1",
                "--no-transcript",
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
            check=False,
        )
    assert piped.returncode == 0, piped.stderr
    assert "waiting for" not in piped.stderr


def test_check_timeout_sets_the_greeting_and_command_waits() -> None:
    with lab_thread(TARPIT):
        code, out, _ = _check_under_pty("127.0.233.1", "--port", "2525", "--timeout", "1.5s")
    assert code == 0
    assert "no greeting within 1.5s; no answer to QUIT either" in out, out
    bad = subprocess.run(
        [sys.executable, "-m", "relayaudit", "check", "127.0.233.1", "--timeout", "soon"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "argument --timeout: 'soon' is not a duration" in bad.stderr


CLOSED = ServerSpec(host="127.0.233.2", port=2525, behaviour=Behaviour.CLOSED)


def test_check_without_config_calls_nothing_unapproved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --config, no approved list: no unapproved-smtp finding, and the output says why;
    with a config that approves nothing, the same server is not on the approved list."""
    config = tmp_path / "campus.toml"
    config.write_text(
        'scope = ["127.0.233.0/24"]\ntargets = ["127.0.233.0/28"]\nports = [2525]\n',
        encoding="utf-8",
    )
    with lab_thread(CLOSED):
        bare = run_main(capsys, "check", "127.0.233.2", "--port", "2525", "--no-transcript")
        configured = run_main(
            capsys, "check", "127.0.233.2", "--config", str(config), "--no-transcript"
        )
        as_json = run_main(capsys, "check", "127.0.233.2", "--port", "2525", "--json")
    code, out, _ = bare
    assert code == 0, out
    lines = out.splitlines()
    # the address it connected from, not "default"
    assert lines[0] == "127.0.233.2:2525  RELAY-REFUSED  (seen from 127.0.0.1)"
    assert "  no approved list given (--config names one)" in lines
    assert "unapproved" not in out and "not on the approved list" not in out
    code, out, _ = configured
    assert code == 0, out
    assert "  not on the approved list" in out.splitlines()
    assert "unapproved-smtp" in out
    code, out, _ = as_json
    kinds = [f["kind"] for f in json.loads(out)["verdict"]["findings"]]
    assert "unapproved-smtp" not in kinds


# -- relayaudit demo --------------------------------------------------------------------------


def test_demo_runs_keep_the_five_newest_and_nothing_else(tmp_path: Path) -> None:
    old = [tmp_path / f"2024010{d}T000000Z" for d in range(1, 7)]
    for d in old:
        (d / "sub").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine\n", encoding="utf-8")
    (tmp_path / "20240101T000000Z.bak").mkdir()  # not named as a run: never removed
    run = new_run_dir(tmp_path)
    assert run.parent == tmp_path and run.is_dir() and not any(run.iterdir())
    kept = sorted(d.name for d in tmp_path.iterdir())
    assert kept == sorted(
        [*(d.name for d in old[-4:]), run.name, "notes.txt", "20240101T000000Z.bak"]
    )
    # a second run in the same second gets a name of its own, and sorts after the first
    again = new_run_dir(tmp_path)
    assert again.is_dir() and again.name > run.name
    assert run.is_dir()  # still among the five newest
    assert not old[2].exists()


def test_demo_writes_a_run_directory_and_says_what_to_try_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(capsys, "demo", "--output-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert f"demo: writing into {run}/ (keeping the 5 newest runs of {tmp_path / 'runs'}/)" in out
    assert f"report: {run / 'report.html'}" in out and (run / "report.html").is_file()
    assert (run / "findings.jsonl").stat().st_size > 0
    tail = out[out.index("try next") :].splitlines()
    assert [line.split()[1] for line in tail[1:]] == ["lab", "check", "show", "report"]
    # the show and report commands it prints work on this run's state store as written
    show = tail[3].split()[1:]
    assert show[2:] == ["--state", str(run / "demo-state.sqlite")] and show[1].startswith("ra-")
    code, shown, err = run_main(capsys, *show)
    assert code == 0, err
    assert show[1] in shown and "127.0.10." in shown
    code, report, err = run_main(capsys, *tail[4].split()[1:])
    assert code == 0, err
    assert "open-relay" in report


# -- relayaudit lab ---------------------------------------------------------------------------


def _lab(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relayaudit", "lab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _until_ready(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("lab ready"):
            return lines
    raise AssertionError(f"no 'lab ready': {lines} {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_lab_lists_its_servers_and_stops_with_0_on_a_signal(signum: int) -> None:
    proc = _lab()
    try:
        lines = _until_ready(proc)
        # every server of the demo's factory listens once "lab ready" is printed
        for octet, port, behaviour, _ in DEMO_LAB:
            assert any(line.startswith(f"  127.0.10.{octet}:{port} ") for line in lines), lines
            assert any(ROLES[behaviour] in line for line in lines)
            if behaviour is Behaviour.OPEN_RELAY:
                assert read_banner(f"127.0.10.{octet}", port, 5) == (
                    f"220 mx{octet}.campus.test ESMTP relaylab"
                )
        assert "  relayaudit sweep --config config/lab.toml --report lab-report.html" in lines
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.endswith("lab stopped\n")
    assert read_banner("127.0.10.1", 2525, 1) is None  # stopped means stopped


def test_lab_for_seconds_ends_with_0_and_a_taken_address_with_75() -> None:
    started = time.monotonic()
    proc = _lab("--for", "1")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "lab ready (for 1 s)" in out and 1.0 <= time.monotonic() - started < 20
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.10.13", 2525))
        taken.listen()
        proc = _lab("--for", "5")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, (out, err)
    assert "lab ready" not in out
    assert err.startswith("relayaudit: lab: cannot listen on 127.0.10.13:2525: "), err
    assert err.endswith("address already in use\n"), err
