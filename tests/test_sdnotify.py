"""systemd's side of `Type=notify` played by a loopback datagram socket, and the health endpoints
(issue 24, item 4): READY, STATUS, WATCHDOG, STOPPING; /livez apart from /readyz and /healthz."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, base_config, write_config
from loopback import free_port

from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sdnotify import Notifier

HOST, PORT = "127.0.134.1", 2834  # this file's lab: 127.0.134.0/24


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """What systemd listens on: an AF_UNIX datagram socket; $NOTIFY_SOCKET names its path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram waiting, each as its KEY=value lines."""
    out: list[dict[str, str]] = []
    while True:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return out
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


def test_the_notifier_speaks_sd_notify_and_never_raises(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    path = str(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog == 2.0
    assert notifier.ready("started\nsecond line") and notifier.ping()
    assert received(notify_socket) == [
        {"READY": "1", "STATUS": "started second line", "MAINPID": str(os.getpid())},
        {"WATCHDOG": "1"},
    ]
    # another process's watchdog, no socket, a socket gone: nothing sent, nothing raised
    assert (
        Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog
        is None
    )
    assert not Notifier({}).notify(READY=1)
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not gone.ping() and gone.failed == 1


def test_an_abstract_notify_socket() -> None:
    name = f"relayaudit-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("idle")
        assert sock.recv(100) == b"STATUS=idle\n"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.usefixtures("loopback_only")
async def test_the_daemon_notifies_systemd_and_answers_livez_apart_from_readyz(
    tmp_path: Path, notify_socket: socket.socket, daemons: list[DaemonProcess]
) -> None:
    # before: Type=exec, no datagram at all; /livez and /readyz were 404
    metrics_port = free_port()
    data = base_config(tmp_path, f"{HOST}/32", PORT)
    data["schedule"] = {"interval": "1h"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "600000"}
    messages: list[dict[str, str]] = []
    async with Lab([ServerSpec(host=HOST, port=PORT, behaviour=Behaviour.OPEN_RELAY)]):
        daemon = DaemonProcess(cfg, tmp_path / "log.jsonl", env=env)
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 30, "the sweep")
        await asyncio.sleep(1.0)  # a few watchdog periods
        messages += await asyncio.to_thread(received, notify_socket)
        live = await asyncio.to_thread(get, metrics_port, "/livez")
        ready = await asyncio.to_thread(get, metrics_port, "/readyz")
        health = await asyncio.to_thread(get, metrics_port, "/healthz")
        await daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code(20) == 0
        messages += await asyncio.to_thread(received, notify_socket)
    assert live[0] == 200 and live[1].startswith("ok alive (loop ticked"), live
    assert ready[0] == health[0] == 200 and ready[1].startswith("ok last sweep completed"), ready
    assert messages[0]["READY"] == "1" and messages[0]["MAINPID"] == str(daemon.pid)
    statuses = [m["STATUS"] for m in messages if "STATUS" in m]
    assert any(s.startswith("sweep ") and " done in " in s for s in statuses), statuses
    assert any(s.startswith("idle: next sweep at ") for s in statuses), statuses
    assert sum("WATCHDOG" in m for m in messages) >= 3  # every 0.2 s with a 0.6 s watchdog
    assert messages[-1].get("STOPPING") == "1"
