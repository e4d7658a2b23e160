"""Files at rest: created 0600/0640 whatever the umask; a config holding secrets inline and readable
by others is warned about (issue 22, item 2)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import ROOT, run_main
from loopback import lab_thread

from relayaudit.config import LoggingConfig
from relayaudit.lab import Behaviour, ServerSpec
from relayaudit.logs import LogHandle
from relayaudit.state import StateStore

HOST, PORT = "127.0.132.1", 2832  # this file's lab: 127.0.132.0/24
SWEEP = [sys.executable, "-m", "relayaudit", "sweep"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: every file is created as wide as the code asks for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_state_store_and_its_wal_and_shm_are_private(tmp_path: Path) -> None:
    # before: SQLite's default, 0644 less the umask: 0644 here, evidence readable by anyone
    path = tmp_path / "state.sqlite"
    with StateStore(path):
        files = [path, path.with_name("state.sqlite-wal"), path.with_name("state.sqlite-shm")]
        assert all(f.exists() for f in files), list(tmp_path.iterdir())
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}


@pytest.mark.usefixtures("open_umask")
def test_log_file_is_0640(tmp_path: Path) -> None:
    # before: 0666 less the umask
    path = tmp_path / "relayaudit.jsonl"
    handle = LogHandle(LoggingConfig(file=path, stdout=False), {})
    try:
        assert mode(path) == 0o640
    finally:
        handle.close()


@pytest.mark.usefixtures("loopback_only")
def test_findings_and_report_of_a_sweep_are_0640_under_umask_000(tmp_path: Path) -> None:
    config = tmp_path / "relayaudit.toml"
    config.write_text(
        f'scope = ["127.0.132.0/24"]\ntargets = ["{HOST}/32"]\nports = [{PORT}]\n'
        f'[output]\nfindings = "{tmp_path / "findings.jsonl"}"\n',
        encoding="utf-8",
    )
    report = tmp_path / "report.html"
    report.write_text("an old report, world-readable\n")
    report.chmod(0o644)
    with lab_thread(ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)):
        proc = subprocess.run(
            [*SWEEP, "--config", str(config), "--report", str(report)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            umask=0,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr  # the relay
    # before: the report kept the old file's 0644 (or 0666 less the umask when new)
    assert {p.name: mode(p) for p in (tmp_path / "findings.jsonl", report)} == {
        "findings.jsonl": 0o640,
        "report.html": 0o640,
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


INLINE = """
scope = ["192.0.2.0/24"]
targets = ["192.0.2.0/28"]
[[alerts.webhook]]
url = "https://tickets.campus.example/hook"
token = "an-inline-bearer-token"
"""


@pytest.mark.parametrize(
    ("file_mode", "secret", "warned"),
    [
        (0o644, INLINE, "group and others"),
        (0o640, INLINE, "its group"),
        (0o600, INLINE, None),
        (0o644, INLINE.replace('"an-inline-bearer-token"', '{ env = "HOME" }'), None),
    ],
)
def test_config_check_warns_about_readable_inline_secrets(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    file_mode: int,
    secret: str,
    warned: str | None,
) -> None:
    path = tmp_path / "relayaudit.toml"
    path.write_text(secret, encoding="utf-8")
    path.chmod(file_mode)
    code, out, err = run_main(capsys, "config", "check", str(path))
    assert code == 0 and out.startswith(f"{path}: valid")
    if warned is None:
        assert "warning" not in err
    else:
        assert err == (
            f"{path}: warning: mode {file_mode:04o} lets {warned} read the secret written in it "
            "(alerts.webhook[0].token): chmod 600 the file, or give each secret as "
            '{ env = "NAME" } or { file = "/path" }\n'
        )
    assert "an-inline-bearer-token" not in out + err
