"""Tests for relayaudit.logs: real JSON-lines output to files and stdout, reopen, binding, redaction."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from relayaudit.config import LoggingConfig
from relayaudit.errors import ConfigError
from relayaudit.logs import REDACTED, LogHandle, configure_logging, redact_secrets

Configure = Callable[..., LogHandle]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """configure_logging, with every handle closed and structlog reset afterwards."""
    handles: list[LogHandle] = []

    def make(
        file: Path | None = None, *, stdout: bool = False, level: str = "info", **bind: object
    ) -> LogHandle:
        handle = configure_logging(LoggingConfig(file=file, stdout=stdout, level=level), bind=bind)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.close()
    structlog.reset_defaults()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_json_lines_with_timestamp_level_event_and_bound_context(
    configure: Configure, tmp_path: Path
) -> None:
    path = tmp_path / "relayaudit.log"
    configure(path, shard="2/4")
    before = datetime.now(UTC)
    structlog.get_logger().info("probe_done", address="127.0.0.1", port=25)
    [line] = lines(path)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert line["level"] == "info"
    assert line["event"] == "probe_done"
    assert line["shard"] == "2/4"
    assert (line["address"], line["port"]) == ("127.0.0.1", 25)
    assert line["timestamp"].endswith("Z")
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


def test_bind_changes_context_of_later_events(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    handle = configure(path, shard="0/1")
    log = structlog.get_logger()  # obtained once, like a module-level logger
    handle.bind(sweep_id="s-1")
    log.info("one")
    handle.bind(sweep_id="s-2")
    log.info("two")
    log.info("three", sweep_id="explicit")  # the call site wins over bound context
    handle.bind(sweep_id=None)  # None removes, e.g. between sweeps
    log.info("four")
    handle.bind(sweep_id="s-3", extra=1)
    handle.unbind("sweep_id", "extra")
    log.info("five")
    got = [(e["event"], e.get("sweep_id"), e["shard"]) for e in lines(path)]
    assert got == [
        ("one", "s-1", "0/1"),
        ("two", "s-2", "0/1"),
        ("three", "explicit", "0/1"),
        ("four", None, "0/1"),
        ("five", None, "0/1"),
    ]
    assert handle.bound == {"shard": "0/1"}


def test_level_filter(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path, level="warning")
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [(e["event"], e["level"]) for e in lines(path)] == [("w", "warning"), ("e", "error")]


def test_debug_level_shows_everything(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path, level="debug")
    structlog.get_logger().debug("d")
    assert [e["event"] for e in lines(path)] == ["d"]


def test_stdout_only(configure: Configure, capsys: pytest.CaptureFixture[str]) -> None:
    configure(None, stdout=True, shard="1/1")
    structlog.get_logger().info("hello", n=1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    event = json.loads(out[0])
    assert (event["event"], event["n"], event["shard"]) == ("hello", 1, "1/1")


def test_file_and_stdout_get_the_same_line(
    configure: Configure, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "both.log"
    configure(path, stdout=True)
    structlog.get_logger().info("both")
    assert capsys.readouterr().out == path.read_text(encoding="utf-8")


def test_each_event_is_on_disk_immediately(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path)
    log = structlog.get_logger()
    for i in range(3):
        log.info("tick", i=i)
        # read through a separate file object while the log file stays open
        assert len(path.read_text(encoding="utf-8").splitlines()) == i + 1


def test_reopen_after_logrotate_rename(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "relayaudit.log"
    rotated = tmp_path / "relayaudit.log.1"
    handle = configure(path)
    log = structlog.get_logger()
    log.info("before_rotate")
    path.rename(rotated)
    log.info("still_old_file")  # until reopen, the open descriptor follows the renamed file
    assert not path.exists()
    assert handle.reopen() is True
    log.info("after_reopen")
    assert [e["event"] for e in lines(rotated)] == ["before_rotate", "still_old_file"]
    assert [e["event"] for e in lines(path)] == ["after_reopen"]


def test_reopen_failure_keeps_the_old_file(configure: Configure, tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    path = directory / "relayaudit.log"
    handle = configure(path)
    log = structlog.get_logger()
    log.info("first")
    moved = tmp_path / "moved"
    directory.rename(moved)
    directory.write_text("not a directory any more")  # works as root too, unlike chmod
    assert handle.reopen() is False
    log.info("second")
    got = lines(moved / "relayaudit.log")
    assert [e["event"] for e in got] == ["first", "log_reopen_failed", "second"]
    assert got[1]["level"] == "error"
    assert got[1]["path"] == str(path)


def test_unwritable_log_directory_is_a_config_error(configure: Configure, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log directory should be")
    bad = blocker / "sub" / "relayaudit.log"
    with pytest.raises(ConfigError) as info:
        configure(bad)
    message = str(info.value)
    assert message.startswith("logging.file: ")
    assert str(bad) in message


def test_failed_reconfigure_keeps_the_old_configuration(
    configure: Configure, tmp_path: Path
) -> None:
    good = tmp_path / "good.log"
    configure(good)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(ConfigError):
        configure(blocker / "x.log")
    structlog.get_logger().info("still_here")
    assert [e["event"] for e in lines(good)] == ["still_here"]


def test_reconfigure_switches_files_and_closes_the_old_one(
    configure: Configure, tmp_path: Path
) -> None:
    first_path, second_path = tmp_path / "1.log", tmp_path / "2.log"
    first = configure(first_path)
    structlog.get_logger().info("one")
    configure(second_path, level="debug")
    structlog.get_logger().debug("two")
    assert first.closed
    assert [e["event"] for e in lines(first_path)] == ["one"]
    assert [e["event"] for e in lines(second_path)] == ["two"]


def test_secrets_are_redacted_in_the_file(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    handle = configure(path, api_token="bound-secret")
    handle.bind(hmac_key="k3y")
    structlog.get_logger().info(
        "webhook_failed",
        token="t0ken",
        password="hunter2",
        client_secret="s3cret",
        headers={"Authorization": "Bearer abc.def", "Content-Type": "application/json"},
        hooks=[{"url": "https://ops:pa55@tickets.example/api", "auth_token": "zzz"}],
        error="server said: Authorization: Bearer abc.def rejected",
        idempotency_key="finding-42:new",
    )
    text = path.read_text(encoding="utf-8")
    for secret in ("bound-secret", "k3y", "t0ken", "hunter2", "s3cret", "abc.def", "pa55", "zzz"):
        assert secret not in text
    [event] = lines(path)
    assert event["token"] == event["password"] == event["client_secret"] == REDACTED
    assert event["api_token"] == event["hmac_key"] == REDACTED
    assert event["headers"] == {"Authorization": REDACTED, "Content-Type": "application/json"}
    assert event["hooks"] == [
        {"url": f"https://ops:{REDACTED}@tickets.example/api", "auth_token": REDACTED}
    ]
    assert event["error"] == f"server said: Authorization: Bearer {REDACTED} rejected"
    assert event["idempotency_key"] == "finding-42:new"  # not a secret, despite "key"


def test_redact_secrets_processor_alone() -> None:
    deep: dict[str, Any] = {"password": "p"}
    for _ in range(20):
        deep = {"level": deep}
    out = redact_secrets(None, "info", {"event": "e", "Password": "x", "deep": deep, "n": 1})
    assert out["Password"] == REDACTED
    assert out["n"] == 1
    assert "'p'" not in json.dumps(out) and '"p"' not in json.dumps(out)


def test_exceptions_are_rendered(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("sweep_crashed")
    [event] = lines(path)
    assert event["level"] == "error"
    assert "RuntimeError: boom" in event["exception"]


def test_values_json_cannot_encode_are_written_as_text(
    configure: Configure, tmp_path: Path
) -> None:
    path = tmp_path / "a.log"
    configure(path)
    structlog.get_logger().info(
        "odd_types",
        address=ipaddress.ip_address("127.0.0.1"),
        where=Path("/var/lib/relayaudit"),
        at=datetime(2024, 1, 1, tzinfo=UTC),
        ports={587, 25},
        text="line\nbreak ünïcode",
    )
    raw = path.read_text(encoding="utf-8")
    assert raw.count("\n") == 1  # a newline in a value never splits the line
    [event] = lines(path)
    assert event["address"] == "127.0.0.1"
    assert event["where"] == "/var/lib/relayaudit"
    assert event["at"] == "2024-01-01T00:00:00+00:00"
    assert event["ports"] == [25, 587]
    assert event["text"] == "line\nbreak ünïcode"


def test_stdlib_warnings_become_json_lines(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path, shard="0/1")
    other = logging.getLogger("relayaudit.tests.stdlib")
    other.setLevel(logging.INFO)
    other.info("chatty library info stays out")
    other.warning("library says %s", "careful")
    [event] = lines(path)
    assert event["event"] == "library says careful"
    assert event["level"] == "warning"
    assert event["logger"] == "relayaudit.tests.stdlib"
    assert event["shard"] == "0/1"


def test_stdlib_bridge_is_removed_on_close(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    handle = configure(path)
    handle.close()
    logging.getLogger("relayaudit.tests.stdlib").warning("after close")
    assert path.read_text(encoding="utf-8") == ""


def test_lines_stay_whole_across_threads(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    configure(path)
    log = structlog.get_logger()

    def worker(n: int) -> None:
        for i in range(200):
            log.info("threaded", worker=n, i=i, filler="x" * 200)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    events = lines(path)  # json.loads fails on any torn line
    assert len(events) == 1600
    assert {(e["worker"], e["i"]) for e in events} == {(n, i) for n in range(8) for i in range(200)}


async def test_async_log_methods(configure: Configure, tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    handle = configure(path)
    handle.bind(sweep_id="async")
    await structlog.get_logger().ainfo("from_the_loop")
    [event] = lines(path)
    assert (event["event"], event["sweep_id"]) == ("from_the_loop", "async")
