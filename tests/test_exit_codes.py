"""Exit codes: a crash never reads as success or "relay found" (issue 22, item 1).

0 nothing found at or above --fail-on, 1 found, 2 usage, 70 internal error, 75 temporary, 78 config.
Internal errors are injected by replacing one function with one that raises: the point is what
the command line makes of a bug, wherever it happens.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import run_main
from loopback import lab_thread

from relayaudit import cli, probe
from relayaudit.errors import ExitCode
from relayaudit.lab import Behaviour, ServerSpec

HOST = "127.0.131.1"  # this file's servers: 127.0.131.0/24
PORT = 2831
CONFIG = f"""
scope = ["127.0.131.0/24"]
targets = ["{HOST}/32"]
ports = [{PORT}]
[timeouts]
connect = "1s"
command = "2s"
greeting = "2s"
session = "10s"
[limits]
rate = 100
subnet_rate = 100
"""


@contextlib.contextmanager
def resetting_server() -> Iterator[int]:
    """Greets, reads the EHLO, then resets the connection: a network error with no verdict."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()
    port = int(listener.getsockname()[1])
    done = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                conn.sendall(b"220 mx.campus.test ESMTP\r\n")
                with contextlib.suppress(OSError):
                    conn.recv(1024)
                # SO_LINGER 0: close() sends RST, as a crashing server or a middlebox would
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        done.set()
        listener.close()
        thread.join(5)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relayaudit.toml"
    path.write_text(
        CONFIG + f'[output]\nfindings = "{tmp_path / "findings.jsonl"}"\n', encoding="utf-8"
    )
    return path


def _boom(*args: object, **kwargs: object) -> None:
    raise ZeroDivisionError("injected by the test")


# -- internal errors: 70, with the traceback ---------------------------------------------------


@pytest.mark.usefixtures("loopback_only")
def test_an_uncaught_exception_in_a_command_exits_70_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    # before: the exception left main() (python -m relayaudit: a traceback and exit 1, which
    # `check` and `sweep` use for "relay found")
    monkeypatch.setattr(cli, "_config_check", _boom)
    code, _, err = run_main(capsys, "config", "check", str(config))
    assert code == ExitCode.SOFTWARE
    assert "Traceback (most recent call last)" in err
    assert "ZeroDivisionError: injected by the test" in err
    assert err.rstrip().endswith("internal error (a bug; exit 70); the traceback above says where")


@pytest.mark.usefixtures("loopback_only")
def test_a_probe_ending_in_internal_error_makes_check_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # before: internal-error was neither a relay nor "error": check exited 0, "nothing found"
    monkeypatch.setattr(probe._Probe, "run", _boom)
    with lab_thread(ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)):
        code, out, _ = run_main(capsys, "check", HOST, "--port", str(PORT))
    assert "INTERNAL-ERROR" in out, out
    assert code == ExitCode.SOFTWARE


@pytest.mark.usefixtures("loopback_only")
def test_a_sweep_with_a_probe_in_internal_error_exits_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    monkeypatch.setattr(probe._Probe, "run", _boom)
    with lab_thread(ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)):
        code, _, err = run_main(capsys, "sweep", "--config", str(config))
    assert code == ExitCode.SOFTWARE, err
    assert "1 probe(s) ended in an internal error" in err


@pytest.mark.usefixtures("loopback_only")
def test_a_crashed_sweep_process_makes_the_parent_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    # before: the parent raised "2 of 2 sweep processes failed" and exited 2, a usage error
    monkeypatch.setattr(cli, "sweep", _boom)  # the forked children inherit it; nothing connects
    code, _, err = run_main(capsys, "sweep", "--config", str(config), "--processes", "2")
    assert code == ExitCode.SOFTWARE, err
    assert "2 of 2 sweep processes failed (exit 70, 70)" in err


# -- temporary failures: 75 --------------------------------------------------------------------


@pytest.mark.usefixtures("loopback_only")
def test_check_ending_in_a_network_error_exits_75(capsys: pytest.CaptureFixture[str]) -> None:
    # before: 2, the code of a bad command line; a reset is worth trying again later
    with resetting_server() as port:
        code, out, _ = run_main(capsys, "check", HOST, "--port", str(port))
    assert "ERROR" in out.splitlines()[0], out
    assert code == ExitCode.TEMPFAIL


# -- what counts as found: --fail-on -----------------------------------------------------------


@pytest.mark.usefixtures("loopback_only")
@pytest.mark.parametrize(
    ("behaviour", "fail_on", "code"),
    [
        (Behaviour.OPEN_RELAY, None, ExitCode.FOUND),  # the default: a relay
        (Behaviour.OPEN_RELAY, "never", ExitCode.OK),  # a Job's sweep that found relays succeeded
        (Behaviour.CLOSED, None, ExitCode.OK),  # only "unapproved SMTP" (medium): not a relay
        (Behaviour.CLOSED, "medium", ExitCode.FOUND),
        (Behaviour.CLOSED, "critical", ExitCode.OK),
        (Behaviour.AUTH_NO_TLS, "high", ExitCode.OK),  # medium findings only: below high
    ],
)
def test_fail_on(
    capsys: pytest.CaptureFixture[str],
    config: Path,
    behaviour: Behaviour,
    fail_on: str | None,
    code: ExitCode,
) -> None:
    extra = ["--fail-on", fail_on] if fail_on else []
    with lab_thread(ServerSpec(host=HOST, port=PORT, behaviour=behaviour)):
        # with --config: the approved list it names (empty) makes an SMTP service "unapproved"
        # (medium); without one, check calls nothing unapproved (issue 32)
        checked = run_main(
            capsys, "check", HOST, "--port", str(PORT), "--config", str(config), *extra
        )
        swept = run_main(capsys, "sweep", "--config", str(config), *extra)
    assert checked[0] == code, checked
    assert swept[0] == code, swept
