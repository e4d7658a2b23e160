"""Operational faults: failing alert receivers, a locked or full state store, an unwritable log directory, SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import (
    DaemonProcess,
    StoreView,
    base_config,
    read_jsonl,
    ticket_identities,
    write_config,
)
from factories import make_finding, observe
from http_stub import listen, read_request
from loopback import free_port

from relayaudit.alerts import Dispatcher
from relayaudit.config import AlertsConfig, WebhookHook
from relayaudit.errors import ExitCode
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.state import Alert, StateStore

PORT = 2791  # every lab below listens on this port, each test on its own 127.0.7x.0/24

pytestmark = pytest.mark.time_limit(100)


def assert_nothing_lost(state: Path, tickets: list[dict[str, Any]]) -> StoreView:
    """Every finding has exactly one NEW alert; every alert reached the receiver; no key is two tickets."""
    view = StoreView(state)
    assert view.findings, "the lab produced no findings"
    assert view.new_alert_counts() == {f.id: 1 for f in view.findings}
    identities = ticket_identities(tickets)
    assert {a.key for a in view.alerts} <= set(identities), "an alert never reached the receiver"
    doubled = {k: v for k, v in identities.items() if len(v) != 1}
    assert doubled == {}, f"one idempotency key, two different tickets: {doubled}"
    for a in view.alerts:
        assert identities[a.key] == {(a.transition.value, a.finding.id)}
    assert view.outbox["pending"] == 0 and view.outbox["dead"] == 0, view.outbox
    return view


# -- an alert receiver that misbehaves on command ----------------------------------------------------


class Webhook:
    """A ticketing webhook on 127.0.0.1:`port` whose behaviour the test switches.

    refuse: not listening; ok: 200; fail: 500; hang: accepts, never answers; slow: answers (and
    opens the ticket) only after `slow` seconds, long after the sender gave up.
    """

    def __init__(self, port: int, slow: float = 1.5) -> None:
        self.port = port
        self.slow = slow
        self.mode = "refuse"
        self.attempts: Counter[str] = Counter()
        self.tickets: list[dict[str, Any]] = []  # payloads the receiver processed
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/relayaudit"

    async def set_mode(self, mode: str) -> None:
        if mode == "refuse":
            await self.stop()
        elif self._server is None:
            self._server, _ = await listen(self._handle, self.port)
        self.mode = mode

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        mode = self.mode
        self.attempts[mode] += 1
        try:
            async with asyncio.timeout(30):
                _, _, body = await read_request(reader)
                payload = json.loads(body)
                if mode == "hang":
                    await asyncio.sleep(30)
                if mode == "slow":
                    await asyncio.sleep(self.slow)
                if mode == "fail":
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                else:
                    self.tickets.append(payload)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.CancelledError,
            ValueError,
        ):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


async def test_alert_receiver_refusing_failing_hanging_and_slow_loses_and_doubles_nothing(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    hook = Webhook(free_port())
    data = base_config(tmp_path, "127.0.72.0/29", PORT)
    data["alerts"] = {
        "backoff_initial": "0.1s",
        "backoff_max": "0.3s",
        "max_attempts": 1000,
        "webhook": [{"url": hook.url, "timeout": "0.5s"}],
    }
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    specs = [
        ServerSpec(host="127.0.72.1", port=PORT, behaviour=Behaviour.OPEN_RELAY),
        ServerSpec(host="127.0.72.2", port=PORT, behaviour=Behaviour.CLOSED),
    ]
    d = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(d)

    def retried_with(text: str) -> bool:
        return any(text in e.get("error", "") for e in d.events("alert.retry"))

    try:
        async with Lab(specs):
            await d.start()  # the receiver is down: connections refused
            await d.wait_for(
                lambda: retried_with(f"webhook http://127.0.0.1:{hook.port}"),
                30,
                "a refused delivery",
            )
            assert hook.tickets == []
            await hook.set_mode("fail")
            await d.wait_for(lambda: retried_with("HTTP 500"), 15, "a 500")
            await hook.set_mode("hang")
            await d.wait_for(
                lambda: hook.attempts["hang"] >= 1 and retried_with("no answer within 0.5s"),
                15,
                "a hang",
            )
            sweeps_before_slow = len(d.events("sweep.summary"))
            await hook.set_mode(
                "slow"
            )  # 1.5 s per answer, the sender waits 0.5 s: every try "fails"
            await d.wait_for(lambda: hook.attempts["slow"] >= 3, 15, "slow answers")
            # meanwhile the sweeps go on: delivery trouble never holds up scanning
            await d.wait_for(
                lambda: len(d.events("sweep.summary")) > sweeps_before_slow, 15, "a sweep"
            )
            await hook.set_mode("ok")
            await d.wait_for(
                lambda: (
                    d.events("alert.delivered") != []
                    and StoreView(tmp_path / "state.sqlite").outbox["pending"] == 0
                ),
                30,
                "every alert delivered",
            )
            assert d.running
            assert await d.stop() == 0
    finally:
        await hook.stop()
    view = assert_nothing_lost(tmp_path / "state.sqlite", hook.tickets)
    assert len(view.alerts) == 3  # open-relay and unapproved-smtp on .1, unapproved-smtp on .2
    # a slow receiver processed requests whose answers came too late: the same key arrived more
    # than once, as one ticket (the receiver dedupes by Idempotency-Key)
    print(f"attempts per mode: {dict(hook.attempts)}; tickets received: {len(hook.tickets)}")
    assert len(hook.tickets) > len(view.alerts)


# -- a locked state store ----------------------------------------------------------------------------


def _record(store: StateStore, ports: range) -> list[Alert]:
    record = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=len(ports))
    alerts: list[Alert] = []
    for port in ports:
        now = datetime.now(UTC)
        finding = make_finding(
            address="127.0.73.1",
            port=port,
            when=now,
            title=f"Open relay on 127.0.73.1:{port}",
            summary="test",
            transcript=(),
        )
        alerts += store.record(
            record.id, *observe(finding, address="127.0.73.1", port=port, when=now)
        )
    return alerts


async def test_dispatcher_survives_a_store_locked_past_its_busy_timeout(tmp_path: Path) -> None:
    hook = Webhook(free_port())
    await hook.set_mode("ok")
    path = tmp_path / "state.sqlite"
    config = AlertsConfig(
        webhook=(WebhookHook(url=hook.url, timeout=2),), backoff_initial=0.05, backoff_max=0.1
    )
    store = StateStore(path, busy_timeout=0.3)
    store.open()
    store.set_channels(["webhook:0"])
    alerts = _record(store, range(25, 31))
    locker = sqlite3.connect(path, isolation_level=None, timeout=0)
    stop = asyncio.Event()
    try:
        dispatcher = Dispatcher(store, config, poll_interval=0.05)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        task = asyncio.get_running_loop().create_task(dispatcher.run(stop))
        for _ in range(100):  # a delivery went out, and recording it waited past the busy timeout
            if hook.tickets:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        # before the fix the StateError ended the dispatcher task: no alert was delivered again
        # until the daemon restarted, while sweeps (and /healthz) went on as if all was well
        assert not task.done(), task.exception() if task.done() else None
        locker.execute("COMMIT")
        for _ in range(100):
            if store.outbox_counts()["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        assert store.outbox_counts() == {"pending": 0, "sent": len(alerts), "dead": 0}
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        locker.close()
        store.close()
        await hook.stop()
    identities = ticket_identities(hook.tickets)
    assert {k: v for k, v in identities.items() if len(v) != 1} == {}
    assert {a.key for a in alerts} == set(identities)


async def _hold_lock(path: Path, until: asyncio.Event, limit: float) -> float:
    """Hold the state file's write lock (BEGIN EXCLUSIVE) until `until` is set or `limit` s pass."""
    locker = sqlite3.connect(path, isolation_level=None, timeout=5)
    started = time.monotonic()
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), limit)
        locker.execute("COMMIT")
    finally:
        locker.close()
    return time.monotonic() - started


async def test_daemon_rides_out_a_short_lock_and_exits_clearly_on_a_long_one(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    state = tmp_path / "state.sqlite"
    cfg = write_config(tmp_path / "relayaudit.toml", base_config(tmp_path, "127.0.73.0/29", PORT))
    first = [ServerSpec(host="127.0.73.1", port=PORT, behaviour=Behaviour.OPEN_RELAY)]
    later = [ServerSpec(host="127.0.73.2", port=PORT, behaviour=Behaviour.OPEN_RELAY)]
    d = DaemonProcess(cfg, tmp_path / "log.jsonl")
    daemons.append(d)
    async with Lab(first):
        await d.start()
        await d.wait_for(lambda: len(d.events("sweep.summary")) >= 1, 30, "the first sweep")
        # 3 s, well inside sqlite's 10 s busy timeout: the daemon waits and carries on
        held = await _hold_lock(state, asyncio.Event(), 3.0)
        n = len(d.events("sweep.summary"))
        await d.wait_for(
            lambda: len(d.events("sweep.summary")) > n, 30, "a sweep after the short lock"
        )
        assert held >= 3.0 and d.running
        # held until the daemon gives up: it must exit with a message naming the file and the cause
        released = asyncio.Event()
        locker = asyncio.get_running_loop().create_task(_hold_lock(state, released, 45.0))
        try:
            code = await d.exit_code(45)
        finally:
            released.set()
            await locker
        err = d.stderr.decode()
        assert code == ExitCode.TEMPFAIL, err  # a lock goes away: systemd restarts, Jobs retry
        assert re.fullmatch(
            rf"relayaudit: state file {re.escape(str(state))}: [a-z ]+: locked by another process "
            r"\(waited 10s\) \(sqlite: database is locked\)\n",
            err,
        ), err
        # restarted with the lock gone, it resumes and records what it missed
        async with Lab(later):
            again = DaemonProcess(cfg, tmp_path / "log.jsonl")
            daemons.append(again)
            await again.start()
            await again.wait_for(
                lambda: (
                    any(f.address == "127.0.73.2" for f in StoreView(state).findings)
                    and StoreView(state).outbox["pending"] == 0
                ),
                40,
                "the new relay recorded and alerted",
            )
            assert await again.stop() == 0
    assert_nothing_lost(state, read_jsonl(tmp_path / "tickets.jsonl"))


# -- a full disk -------------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(args: list[str], target: Path, why: str) -> Iterator[None]:
    """mount(8) with `args` at `target` for the block; skipped (with the reason) where not allowed."""
    proc = subprocess.run(
        ["mount", *args, str(target)], capture_output=True, text=True, timeout=10, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"{why} needs mount(8) (root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=10, check=False)


def fill(directory: Path) -> Path:
    """Write one file until the file system is full (bounded by its size); return it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as f:
        for _ in range(100_000):  # 400 MB: far more than the small file systems used here
            try:
                f.write(chunk)
            except OSError:
                break
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
        for _ in range(4096):  # the last partial block, byte by byte
            f.write(b"\0")
    return filler


async def test_full_disk_stops_the_daemon_with_a_clear_message_and_it_resumes(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    with mounted(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"], fs, "the disk-full test"):
        data = base_config(tmp_path, "127.0.74.0/29", PORT)
        data["state"]["path"] = str(fs / "state.sqlite")
        data["output"]["findings"] = str(fs / "findings.jsonl")
        cfg = write_config(tmp_path / "relayaudit.toml", data)
        state = fs / "state.sqlite"
        first = [ServerSpec(host="127.0.74.1", port=PORT, behaviour=Behaviour.OPEN_RELAY)]
        more = [
            ServerSpec(host=f"127.0.74.{i}", port=PORT, behaviour=Behaviour.OPEN_RELAY)
            for i in range(2, 7)
        ]
        d = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(d)
        async with Lab(first):
            await d.start()
            await d.wait_for(lambda: StoreView(state).findings != [], 30, "the first findings")
            filler = fill(fs)
            async with Lab(more):  # five new relays: their findings need space that is not there
                code = await d.exit_code(60)
                err = d.stderr.decode()
                print(f"on a full disk: exit {code}: {err!r}")
                assert code == ExitCode.TEMPFAIL, err
                assert re.fullmatch(
                    rf"relayaudit: (state file {re.escape(str(state))}: [a-z ]+: the disk is full "
                    r"\(sqlite: database or disk is full\)"
                    rf"|output\.findings: cannot write '{re.escape(str(fs))}/findings\.jsonl': "
                    r"No space left on device)\n",
                    err,
                ), err
                filler.unlink()
                begun = {e["sweep_id"] for e in d.events("sweep.start")}
                finished = {e["sweep_id"] for e in d.events("sweep.summary")}
                again = DaemonProcess(cfg, tmp_path / "log.jsonl")
                daemons.append(again)
                await again.start()
                await again.wait_for(
                    lambda: (
                        len({f.address for f in StoreView(state).findings}) == 6
                        and StoreView(state).outbox["pending"] == 0
                    ),
                    60,
                    "all six relays recorded and alerted",
                )
                assert await again.stop() == 0
        assert_nothing_lost(state, read_jsonl(tmp_path / "tickets.jsonl"))
        # the disk filled either mid-sweep (then the restart must continue that sweep) or while
        # the daemon was starting its next one (then there is nothing to resume)
        starts = again.events("sweep.start")
        if begun - finished:
            assert any(e["resumed"] and e["sweep_id"] in begun - finished for e in starts)
        # the findings file holds whole JSON lines only
        lines = (fs / "findings.jsonl").read_text(encoding="utf-8").splitlines()
        assert lines and all(_is_json(line) for line in lines)


async def test_sweep_with_its_findings_file_on_a_full_disk_says_so(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    with mounted(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"], fs, "the disk-full test"):
        data = base_config(tmp_path, "127.0.74.8/29", PORT)
        data["output"]["findings"] = str(fs / "findings.jsonl")
        cfg = write_config(tmp_path / "relayaudit.toml", data)
        fill(fs)
        async with Lab([ServerSpec(host="127.0.74.9", port=PORT, behaviour=Behaviour.OPEN_RELAY)]):
            proc = await asyncio.create_subprocess_exec(
                "python", "-m", "relayaudit", "sweep", "--config", str(cfg),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 60)
    # before the fixes: a traceback of an ExceptionGroup around "OSError: [Errno 28]"
    assert (proc.returncode, err.decode()) == (
        ExitCode.TEMPFAIL,
        f"relayaudit: output.findings: cannot write '{fs}/findings.jsonl': No space left on device\n",
    )


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# -- an unwritable log directory ---------------------------------------------------------------------


async def test_log_directory_turning_read_only_keeps_the_daemon_running(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # root ignores chmod 500, so the directory is made read-only with a read-only bind mount of
    # itself; the daemon's open log file (opened before) stays writable, as after a chmod
    logs = tmp_path / "logs"
    logs.mkdir()
    data = base_config(tmp_path, "127.0.76.0/30", PORT)
    data["logging"]["file"] = str(logs / "relayaudit.jsonl")
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    d = DaemonProcess(cfg, logs / "relayaudit.jsonl")
    daemons.append(d)
    rotated = logs / "relayaudit.jsonl.1"
    async with Lab([ServerSpec(host="127.0.76.1", port=PORT, behaviour=Behaviour.OPEN_RELAY)]):
        await d.start()
        await d.wait_for(lambda: len(d.events("sweep.summary")) >= 1, 30, "the first sweep")
        os.rename(logs / "relayaudit.jsonl", rotated)  # logrotate moved the file away
        with mounted(["--bind", "-o", "ro", str(logs)], logs, "the read-only log directory test"):
            if os.access(logs, os.W_OK) and _writable(logs):
                pytest.skip("the read-only bind mount is writable here")
            await d.signal(signal.SIGHUP)  # reopen: the new file cannot be created
            await d.wait_for(
                lambda: any(e["event"] == "log_reopen_failed" for e in read_jsonl(rotated)),
                15,
                "the reopen failure",
            )
            (failure,) = [e for e in read_jsonl(rotated) if e["event"] == "log_reopen_failed"]
            assert "Read-only file system" in failure["error"]
            n = sum(e["event"] == "sweep.summary" for e in read_jsonl(rotated))
            await d.wait_for(
                lambda: sum(e["event"] == "sweep.summary" for e in read_jsonl(rotated)) > n,
                15,
                "sweeps going on",
            )
            # a daemon started now cannot open its log: it refuses to start, saying why
            other = data | {"logging": {"file": str(logs / "other.jsonl"), "stdout": False}}
            other["state"] = {"path": str(tmp_path / "other.sqlite")}
            proc = await asyncio.create_subprocess_exec(
                "python", "-m", "relayaudit", "run", "--config", str(write_config(tmp_path / "other.toml", other)),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert (proc.returncode, err.decode()) == (
                ExitCode.CONFIG,
                f"relayaudit: logging.file: cannot open '{logs}/other.jsonl' for writing: Read-only file system\n",
            )
        await d.signal(signal.SIGHUP)  # writable again: the next reopen succeeds
        await d.wait_for(lambda: len(d.events("sweep.summary")) >= 1, 15, "lines in the new file")
        assert await d.stop() == 0


def _writable(directory: Path) -> bool:
    probe = directory / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


# -- SIGKILL at random points ------------------------------------------------------------------------

KILLS = 20
SEED = 20240601


async def test_sigkill_at_random_points_loses_and_doubles_nothing(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """20 starts, each SIGKILLed after a seeded random delay, then a clean run to the end."""
    rng = random.Random(SEED)
    state = tmp_path / "state.sqlite"
    cfg = write_config(tmp_path / "relayaudit.toml", base_config(tmp_path, "127.0.75.0/27", PORT))
    stable = [
        ServerSpec(
            host=f"127.0.75.{i}", port=PORT, behaviour=Behaviour.OPEN_RELAY, reply_delay=0.02
        )
        for i in range(1, 6)
    ] + [ServerSpec(host="127.0.75.6", port=PORT, behaviour=Behaviour.CLOSED, reply_delay=0.02)]
    # a relay that comes and goes every few kills: NEW, RESOLVED and REOPENED alerts in the mix
    flapping = [ServerSpec(host="127.0.75.7", port=PORT, behaviour=Behaviour.OPEN_RELAY)]
    log = tmp_path / "log.jsonl"
    delays = []
    async with Lab(stable):
        for i in range(KILLS):
            async with contextlib.AsyncExitStack() as stack:
                if (i // 4) % 2 == 0:
                    await stack.enter_async_context(Lab(flapping))
                d = DaemonProcess(cfg, log)
                daemons.append(d)
                await d.start()
                delay = rng.uniform(0.2, 3.5)
                delays.append(round(delay, 2))
                await asyncio.sleep(delay)
                assert d.running, d.stderr.decode()
                await d.kill()  # SIGKILL: no cleanup at all
        # a clean run to the end: two full sweeps after the restart, every alert out
        final = DaemonProcess(cfg, log)
        daemons.append(final)
        await final.start()
        summaries = len(final.events("sweep.summary"))
        await final.wait_for(
            lambda: (
                len(final.events("sweep.summary")) >= summaries + 2
                and StoreView(state).outbox["pending"] == 0
            ),
            60,
            "two clean sweeps and an empty outbox",
        )
        assert await final.stop() == 0
    print(f"kill delays: {delays}")
    view = assert_nothing_lost(state, read_jsonl(tmp_path / "tickets.jsonl"))
    starts = final.events("sweep.start")
    resumed = [e for e in starts if e["resumed"]]
    assert resumed, "no start ever resumed an interrupted sweep"
    # a resumed sweep continues the same sweep id, from a later position
    first_start = {e["sweep_id"]: e for e in reversed(starts)}
    assert all(e["start"] >= first_start[e["sweep_id"]]["start"] for e in resumed)
    transitions = Counter(a.transition.value for a in view.alerts)
    print(f"alerts: {dict(transitions)}; resumed starts: {len(resumed)}")
    assert transitions["new"] == len(view.findings)
