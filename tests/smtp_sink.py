"""An aiosmtpd receiver on 127.0.0.1, port 0, that keeps every message it is given."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["MessageSink", "serve_smtp"]


class MessageSink:
    """aiosmtpd handler keeping (mail_from, rcpt_tos, content); runs in the Controller's thread."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 queued"


class _EphemeralController(Controller):
    """Controller on port 0: learns the bound port before its self-test connection."""

    def _trigger_server(self) -> None:
        server = self.server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def serve_smtp(handler: Any, **options: Any) -> Iterator[int]:
    """Serve `handler` on 127.0.0.1 (its own thread) and give the port; options go to Controller."""
    controller = _EphemeralController(
        handler, hostname="127.0.0.1", port=0, ready_timeout=5.0, **options
    )
    controller.start()
    try:
        yield int(controller.port)
    finally:
        controller.stop()
