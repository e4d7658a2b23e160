"""Bad input at the edges: invalid configs and CLI invocations, each with the exact text a user sees."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_cli_blocking, run_main

from relayaudit.errors import ExitCode
from relayaudit.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
BASE = 'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
LOOPBACK_BASE = 'scope = ["127.0.0.0/8"]\ntargets = ["127.0.79.0/30"]\nports = [2799]\n'


# no connect to anything but loopback from this process (the checks must fail before one)
pytestmark = pytest.mark.usefixtures("loopback_only", "fixed_width")


# -- configs: `relayaudit config check FILE` -------------------------------------------------------
# (id, TOML after BASE, message after "relayaudit: PATH: "); test_config.py has the others

# (id, TOML after BASE (or a whole file starting with scope), message after "relayaudit: PATH: ");
# tests/test_config.py has the others
BAD_CONFIGS: list[tuple[str, str, str]] = [
    (
        "webhook-table-instead-of-array",
        '[alerts.webhook]\nurl = "https://tickets.campus.example/hook"\n',
        "alerts.webhook: line 3: must be an array of tables: write [[alerts.webhook]] for each entry (got a table)",
    ),
    (
        "approved-inline-table",
        'approved = { address = "192.0.2.25" }\n',
        "approved: line 3: must be an array of tables: write [[approved]] for each entry (got a table)\n"
        "approved: not checked against scope, as approved is invalid",
    ),
    ("ports-as-string", 'ports = "25"\n', "ports: line 3: must be an array (got '25')"),
    (
        "scope-as-string",
        'scope = "192.0.2.0/24"\ntargets = ["192.0.2.0/24"]\n',
        "scope: line 1: must be an array (got '192.0.2.0/24')\n"
        "targets: not checked against scope, as scope is invalid",
    ),
    (
        "seed-fractional",
        "seed = 1.5\n",
        "seed: line 3: Input should be a valid integer, got a number with a fractional part (got 1.5)",
    ),
    (
        "command-hook-without-argv",
        "[[alerts.command]]\nargv = []\n",
        "alerts.command[0].argv: line 4: Tuple should have at least 1 item after validation, not 0 (got [])",
    ),
    (
        "webhook-not-http",
        '[[alerts.webhook]]\nurl = "ftp://tickets.campus.example/"\n',
        "alerts.webhook[0].url: line 4: 'ftp://tickets.campus.example/' is not an http:// or https:// URL",
    ),
    (
        "webhook-timeout-words",
        '[[alerts.webhook]]\nurl = "https://t.campus.example/"\ntimeout = "10 seconds"\n',
        "alerts.webhook[0].timeout: line 5: '10 seconds' is not a duration (use e.g. 30, '30s', '5m', '1h')",
    ),
    (
        "secret-env-not-a-name",
        '[[alerts.webhook]]\nurl = "https://t.campus.example/"\ntoken = { env = 5 }\n',
        'alerts.webhook[0].token: line 5: a secret is a string, { env = "NAME" } or { file = "/path" }',
    ),
    (
        "secret-with-two-sources",
        '[[alerts.webhook]]\nurl = "https://t.campus.example/"\nhmac_key = { env = "A", file = "/b" }\n',
        'alerts.webhook[0].hmac_key: line 5: a secret is a string, { env = "NAME" } or { file = "/path" }',
    ),
    (
        "email-without-recipients",
        '[[alerts.email]]\nhost = "mail.campus.example"\nmail_from = "relayaudit@campus.example"\n',
        "alerts.email[0].to: line 3: required key is missing",
    ),
    (
        "email-port-name",
        '[[alerts.email]]\nhost = "mail.campus.example"\nport = "smtp"\n'
        'mail_from = "relayaudit@campus.example"\nto = ["rt@campus.example"]\n',
        "alerts.email[0].port: line 5: must be an integer (got 'smtp')",
    ),
    (
        "log-level-unknown",
        '[logging]\nlevel = "verbose"\n',
        "logging.level: line 4: 'verbose' is not one of debug, info, warning, error",
    ),
    (
        "metrics-listen-without-port",
        '[metrics]\nlisten = "0.0.0.0"\n',
        "metrics.listen: line 4: '0.0.0.0' is not of the form ADDRESS:PORT (e.g. 127.0.0.1:2526)",
    ),
    (
        "metrics-enabled-yes",
        '[metrics]\nenabled = "yes"\n',
        "metrics.enabled: line 4: must be true or false (got 'yes')",
    ),
    (
        "state-path-with-nul",
        '[state]\npath = "state\\u0000.sqlite"\n',
        "state.path: line 4: 'state\\x00.sqlite' is not a usable file path",
    ),
    (
        "findings-path-empty",
        '[output]\nfindings = ""\n',
        "output.findings: line 4: '' is not a usable file path",
    ),
    (
        "log-file-blank",
        '[logging]\nfile = " "\n',
        "logging.file: line 4: ' ' is not a usable file path",
    ),
    (
        "resolve-after-zero",
        "[state]\nresolve_after = 0\n",
        "state.resolve_after: line 4: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "cron-minute-61",
        '[schedule]\ncron = "61 * * * *"\n',
        "schedule.cron: line 4: '61 * * * *': minute value 61 is outside 0-59",
    ),
    (
        "interval-zero",
        "[schedule]\ninterval = 0\n",
        "schedule.interval: line 4: 0 must be longer than zero",
    ),
    (
        "contact-with-terminal-escape",
        '[identity]\ncontact = "iso\\u001b[2J"\n',
        "identity.contact: line 4: 'iso\\x1b[2J' contains control characters",
    ),
    (
        "too-many-tests-per-session",
        "[relay]\nmax_tests_per_session = 51\n",
        "relay.max_tests_per_session: line 4: Input should be less than or equal to 50 (got 51)",
    ),
    (
        "approved-host-bits",
        '[[approved]]\naddress = "192.0.2.1/24"\n',
        "approved[0].address: line 4: '192.0.2.1/24' has host bits set",
    ),
    (
        "ipv6-target-in-ipv4-scope",
        'scope = ["192.0.2.0/24"]\ntargets = ["2001:db8::/120"]\n',
        "targets[0]: line 2: '2001:db8::/120' is outside scope (192.0.2.0/24)",
    ),
    (
        "quoted-dotted-key",
        '"relay.campus_domains" = ["campus.example"]\n',
        "\"relay.campus_domains\": line 3: unknown key (got ['campus.example'])",
    ),
    (
        "empty-key",
        '[relay]\n"" = 1\n',
        'relay."": line 4: unknown key (got 1)',
    ),
    (
        "nested-too-deeply",
        "deep = " + "[" * 3000 + "]" * 3000 + "\n",
        "TOML syntax error: arrays or tables nested too deeply",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text if text.startswith("scope") else BASE + text, encoding="utf-8")
    assert run_main(capsys, "config", "check", str(path)) == (
        ExitCode.CONFIG,
        "",
        "".join(f"relayaudit: {path}: {line}\n" for line in message.splitlines()),
    )


# -- command lines -----------------------------------------------------------------------------------


@pytest.fixture
def doc_config(tmp_path: Path) -> Path:
    path = tmp_path / "doc.toml"
    path.write_text(
        BASE + f'[state]\npath = "{tmp_path / "never-written.sqlite"}"\n', encoding="utf-8"
    )
    return path


@pytest.fixture
def not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database\n", encoding="utf-8")
    return path


CHECK_USAGE = (
    "usage: relayaudit check [-h] [--port PORT] [--config CONFIG] [--source SOURCE]\n"
    "                        [--confirm] [--retry-greylisted] [--json]\n"
    "                        [--fail-on {never,relay,critical,high,medium,low}]\n"
    "                        [--no-transcript] [--timeout SECONDS]\n"
    "                        host\n"
)
FINDINGS_USAGE = (
    "usage: relayaudit findings [-h] [--config CONFIG] [--state STATE]\n"
    "                           [--status {new,ongoing,resolved,reopened,open}]\n"
    "                           [--json]\n"
)

# (id, argv with {cfg}/{tmp}/{notdb} placeholders, exit code, stdout, stderr)
CLI: list[tuple[str, list[str], int, str, str]] = [
    (
        # a name, not an address: it resolves (to 127.0.0.1), outside the config's scope
        "check-name-resolving-outside-scope",
        ["check", "localhost", "--config", "{cfg}"],
        2,
        "",
        "relayaudit: host 'localhost': 127.0.0.1 is outside scope (192.0.2.0/24) of {cfg}\n",
    ),
    (
        "check-name-resolving-outside-scope-before-confirm",
        ["check", "localhost", "--confirm", "--port", "25", "--config", "{cfg}"],
        2,
        "",
        "relayaudit: host 'localhost': 127.0.0.1 is outside scope (192.0.2.0/24) of {cfg}\n",
    ),
    (
        "check-port-negative",
        ["check", "--port", "-1", "127.0.0.1"],
        2,
        "",
        "relayaudit: --port: -1 is outside 1-65535\n",
    ),
    (
        "check-port-zero",
        ["check", "--port", "0", "127.0.0.1"],
        2,
        "",
        "relayaudit: --port: 0 is outside 1-65535\n",
    ),
    (
        "check-port-empty",
        ["check", "--port=", "127.0.0.1"],
        2,
        "",
        CHECK_USAGE + "relayaudit: error: argument --port: invalid int value: ''\n",
    ),
    (
        "check-port-float",
        ["check", "--port", "25.5", "127.0.0.1"],
        2,
        "",
        CHECK_USAGE + "relayaudit: error: argument --port: invalid int value: '25.5'\n",
    ),
    (
        "check-missing-config",
        ["check", "127.0.0.1", "--config", "{tmp}/missing.toml"],
        ExitCode.CONFIG,
        "",
        "relayaudit: {tmp}/missing.toml: no such file\n",
    ),
    (
        "check-without-host",
        ["check", "--port", "25"],
        2,
        "",
        CHECK_USAGE + "relayaudit: error: the following arguments are required: host\n",
    ),
    (
        # an address this machine does not have: the bind fails, nothing is sent
        "check-source-not-local",
        ["check", "--source", "192.0.2.1", "--port", "1", "127.0.0.1"],
        ExitCode.USAGE,
        "",
        "relayaudit: --source: '192.0.2.1' is not an address of this host: "
        "Cannot assign requested address\n",
    ),
    (
        "run-missing-config",
        ["run", "--config", "{tmp}/missing.toml"],
        ExitCode.CONFIG,
        "",
        "relayaudit: {tmp}/missing.toml: no such file\n",
    ),
    (
        "run-without-config",
        ["run"],
        2,
        "",
        "usage: relayaudit run [-h] --config CONFIG [--shard SHARD]\n"
        "relayaudit: error: the following arguments are required: --config\n",
    ),
    (
        "run-bad-shard",
        ["run", "--config", "{cfg}", "--shard", "1/2/3"],
        2,
        "",
        "relayaudit: --shard: '1/2/3' is not of the form i/n\n",
    ),
    (
        "findings-without-state",
        ["findings"],
        2,
        "",
        "relayaudit: give --state FILE (repeatable) or --config FILE to name the state store\n",
    ),
    (
        "findings-missing-state-file",
        ["findings", "--state", "{tmp}/missing.sqlite"],
        2,
        "",
        "relayaudit: --state: '{tmp}/missing.sqlite' does not exist\n",
    ),
    (
        # the daemon never ran with this config: the message names the config's key, not --state
        "findings-config-whose-state-is-missing",
        ["findings", "--config", "{cfg}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: {cfg}: state.path: '{tmp}/never-written.sqlite' does not exist\n",
    ),
    (
        "findings-state-not-a-database",
        ["findings", "--state", "{notdb}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: state file {notdb}: open: not a relayaudit state file, or corrupt "
        "(sqlite: file is not a database)\n",
    ),
    (
        "findings-state-is-a-directory",
        ["findings", "--state", "{tmp}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: state file {tmp}: is a directory\n",
    ),
    (
        "findings-bad-status",
        ["findings", "--state", "{notdb}", "--status", "bogus"],
        2,
        "",
        FINDINGS_USAGE + "relayaudit: error: argument --status: invalid choice: 'bogus' "
        "(choose from 'new', 'ongoing', 'resolved', 'reopened', 'open')\n",
    ),
    (
        "outbox-status-without-list",
        ["outbox", "--state", "{notdb}", "--status", "dead"],
        2,
        "",
        "relayaudit: --status: only with `outbox list`\n",
    ),
    (
        "outbox-list-with-replay",
        ["outbox", "list", "--state", "{notdb}", "--replay", "3"],
        2,
        "",
        "relayaudit: --replay: not with `outbox list`; replay first, then list\n",
    ),
    (
        "outbox-list-state-not-a-database",
        ["outbox", "list", "--state", "{notdb}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: state file {notdb}: open: not a relayaudit state file, or corrupt "
        "(sqlite: file is not a database)\n",
    ),
    (
        "history-bad-address",
        ["history", "999.1.1.1", "--state", "{notdb}"],
        2,
        "",
        "relayaudit: address: '999.1.1.1' is not an IP address\n",
    ),
    (
        "history-hostname",
        ["history", "mx.campus.example", "--state", "{notdb}"],
        2,
        "",
        "relayaudit: address: 'mx.campus.example' is not an IP address\n",
    ),
    (
        "history-without-state",
        ["history", "127.0.0.1"],
        2,
        "",
        "relayaudit: give --state FILE (repeatable) or --config FILE to name the state store\n",
    ),
    (
        "history-state-not-a-database",
        ["history", "::1", "--state", "{notdb}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: state file {notdb}: open: not a relayaudit state file, or corrupt "
        "(sqlite: file is not a database)\n",
    ),
    (
        "config-check-directory",
        ["config", "check", "{tmp}"],
        ExitCode.CONFIG,
        "",
        "relayaudit: {tmp}: cannot be read: Is a directory\n",
    ),
]


@pytest.mark.parametrize(
    ("argv", "code", "out", "err"), [c[1:] for c in CLI], ids=[c[0] for c in CLI]
)
def test_cli(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    doc_config: Path,
    not_a_database: Path,
    argv: list[str],
    code: int,
    out: str,
    err: str,
) -> None:
    def fill(text: str) -> str:
        for key, value in (("{cfg}", doc_config), ("{tmp}", tmp_path), ("{notdb}", not_a_database)):
            text = text.replace(key, str(value))
        return text

    got = run_main(capsys, *(fill(a) for a in argv))
    # Python 3.12.8+ and 3.13.1+ stopped quoting argparse's choices
    unquoted = re.sub(r"\(choose from [^)]*\)", lambda m: m.group().replace("'", ""), fill(err))
    assert got in {(code, fill(out), fill(err)), (code, fill(out), unquoted)}


def test_a_valid_state_file_still_works_with_a_filter(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # the control for the error cases above: an empty, valid store lists nothing
    with StateStore(tmp_path / "state.sqlite"):
        pass
    code, out, err = run_main(
        capsys, "findings", "--state", str(tmp_path / "state.sqlite"), "--status", "open"
    )
    assert (code, err) == (0, "")
    assert out.endswith("0 finding(s)\n")


# -- the daemon refusing to start: clear message, exit 78 (config) or 75 (a port in use) ---


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, int(sock.getsockname()[1])


DaemonCase = Callable[[Path], tuple[str, str]]  # tmp -> (config text after the base, message)


def _log_file_under_a_file(tmp: Path) -> tuple[str, str]:
    (tmp / "logs").write_text("a file where the log directory should be\n")
    return (
        f'[logging]\nfile = "{tmp}/logs/relayaudit.jsonl"\n',
        f"logging.file: cannot open '{tmp}/logs/relayaudit.jsonl' for writing: {tmp}/logs is not a directory",
    )


def _state_is_a_directory(tmp: Path) -> tuple[str, str]:
    (tmp / "state").mkdir()
    return f'[state]\npath = "{tmp}/state"\n', f"state file {tmp}/state: is a directory"


def _state_under_a_file(tmp: Path) -> tuple[str, str]:
    (tmp / "var").write_text("")
    return (
        f'[state]\npath = "{tmp}/var/state.sqlite"\n',
        f"state file {tmp}/var/state.sqlite: cannot be created: {tmp}/var is not a directory",
    )


@pytest.mark.parametrize(
    "case",
    [_log_file_under_a_file, _state_is_a_directory, _state_under_a_file],
    ids=["log-file-under-a-file", "state-is-a-directory", "state-under-a-file"],
)
def test_daemon_refuses_to_start(tmp_path: Path, case: DaemonCase) -> None:
    extra, message = case(tmp_path)
    cfg = tmp_path / "relayaudit.toml"
    cfg.write_text(LOOPBACK_BASE + "[metrics]\nenabled = false\n" + extra, encoding="utf-8")
    code, out, err = run_cli_blocking("run", "--config", str(cfg), cwd=tmp_path)
    assert (code, err) == (ExitCode.CONFIG, f"relayaudit: {message}\n"), out


def test_daemon_with_its_metrics_port_taken(tmp_path: Path) -> None:
    sock, port = _busy_port()
    with sock:
        cfg = tmp_path / "relayaudit.toml"
        cfg.write_text(
            LOOPBACK_BASE + f'[logging]\nstdout = false\n[state]\npath = "{tmp_path}/s.sqlite"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
            encoding="utf-8",
        )
        code, _, err = run_cli_blocking("run", "--config", str(cfg), cwd=tmp_path)
    assert (code, err) == (
        ExitCode.TEMPFAIL,
        f"relayaudit: metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use\n",
    )


def test_daemon_with_its_canary_port_taken_exits_cleanly_and_resumes(tmp_path: Path) -> None:
    sock, port = _busy_port()
    cfg = tmp_path / "relayaudit.toml"
    log = tmp_path / "log.jsonl"
    cfg.write_text(
        LOOPBACK_BASE + f'[logging]\nstdout = false\nfile = "{log}"\n'
        f'[state]\npath = "{tmp_path}/s.sqlite"\n[metrics]\nenabled = false\n'
        f'[canary]\nenabled = true\ndomain = "canary.iso.test"\nlisten = "127.0.0.1:{port}"\nwait = "1s"\n'
        '[timeouts]\nconnect = "1s"\ncommand = "1s"\nsession = "3s"\n',
        encoding="utf-8",
    )
    with sock:
        code, _, err = run_cli_blocking("run", "--config", str(cfg), cwd=tmp_path)
    # before the fix: a traceback ending in "OSError: [Errno 98] error while attempting to bind"
    assert (code, err) == (
        ExitCode.TEMPFAIL,
        f"relayaudit: canary.listen: cannot listen on 127.0.0.1:{port}: Address already in use\n",
    )
    # the port is free again: a restart resumes the sweep the failed start had begun
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayaudit", "run", "--config", str(cfg)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            events = (
                [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            )
            if any(e["event"] == "sweep.summary" for e in events):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    starts = [e for e in events if e["event"] == "sweep.start"]
    assert [e["resumed"] for e in starts] == [False, True]  # the failed start, then the resume
    assert starts[0]["sweep_id"] == starts[1]["sweep_id"]
    assert any(e["event"] == "sweep.summary" for e in events)
