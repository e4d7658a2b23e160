"""A zoo of hostile SMTP-ish servers on 127.0.0.0/8 for tests: each a small asyncio handler, every loop bounded."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import socket
import ssl
import struct
import tempfile
import termios
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relayaudit.verdict import VerdictStatus

__all__ = [
    "BEASTS",
    "FORGED",
    "LIFETIME",
    "Beast",
    "BlindRelay",
    "HostileServer",
    "Zoo",
    "bad_code_banner",
    "bad_codes",
    "close_after_banner",
    "drip_banner",
    "echo",
    "endless_continuation",
    "forger",
    "garbage",
    "http",
    "invalid_utf8_relay",
    "long_line",
    "never_reads",
    "reset_mid_reply",
    "silent",
    "slow_replies",
    "starttls_fails",
    "starttls_hangs",
    "tempfail_after_two",
]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

LIFETIME = 30.0  # no connection of any hostile server lives longer than this (seconds)
MAX_LINES = 10_000  # no handler reads more command lines than this
MAX_STREAM = 512 * 1024 * 1024  # no handler streams more bytes than this into one connection
_CHUNK = 64 * 1024
_BANNER = b"220 mx.hostile.test ESMTP zoo\r\n"
_EHLO = b"250-mx.hostile.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
_EHLO_STARTTLS = b"250-mx.hostile.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
_REFUSED = b"554 5.7.1 Relay access denied\r\n"
_BYE = b"221 2.0.0 Bye\r\n"


# -- helpers every handler uses -------------------------------------------------------------------


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _each_line(
    reader: asyncio.StreamReader, answer: Callable[[bytes], Awaitable[bool]]
) -> None:
    """Call `answer` for each command line until it returns False, EOF, or MAX_LINES."""
    for _ in range(MAX_LINES):
        line = await reader.readline()
        if not line:
            return
        if not await answer(line.rstrip(b"\r\n")):
            return


async def _drain_input(reader: asyncio.StreamReader) -> None:
    """Read and discard until EOF (bounded by MAX_LINES reads and the connection's lifetime)."""
    for _ in range(MAX_LINES):
        if not await reader.read(_CHUNK):
            return


def _verb(line: bytes) -> bytes:
    return line.split(b" ", 1)[0].split(b":", 1)[0].upper()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _smtp_like(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    banner: bytes = _BANNER,
    ehlo: bytes = _EHLO,
    other: bytes = _REFUSED,
    starttls: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """A minimal SMTP server: banner, EHLO reply, `other` for MAIL/RCPT/RSET/..., 221 for QUIT."""
    await _send(writer, banner)

    async def answer(line: bytes) -> bool:
        verb = _verb(line)
        if verb in (b"EHLO", b"HELO"):
            await _send(writer, ehlo)
        elif verb == b"QUIT":
            await _send(writer, _BYE)
            return False
        elif verb == b"STARTTLS" and starttls is not None:
            await _send(writer, b"220 2.0.0 Ready to start TLS\r\n")
            await starttls()
            return False
        elif verb == b"RSET":
            await _send(writer, b"250 2.0.0 Ok\r\n")
        else:
            await _send(writer, other)
        return True

    await _each_line(reader, answer)


# -- the zoo ----------------------------------------------------------------------------------------


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """No banner: accepts, reads whatever comes, never writes a byte."""
    await _drain_input(reader)


def drip_banner(interval: float = 2.0) -> Handler:
    """The banner, one byte every `interval` seconds (a tarpit that looks alive)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(len(_BANNER)):
            await _send(writer, _BANNER[i : i + 1])
            await asyncio.sleep(interval)
        await _drain_input(reader)

    return handler


async def endless_continuation(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Banner, then answers EHLO with `250-` continuation lines forever (up to MAX_STREAM bytes)."""
    await _send(writer, _BANNER)
    await reader.readline()
    chunk = b"".join(b"250-X-ENDLESS-%06d\r\n" % i for i in range(_CHUNK // 20))
    for _ in range(MAX_STREAM // len(chunk)):
        await _send(writer, chunk)  # drain: flow control holds us when the client stops reading


def long_line(size: int = 10 * 1024 * 1024, *, after_ehlo: bool = False) -> Handler:
    """A `size`-byte reply line with no CRLF: as the banner, or (after_ehlo) as the EHLO reply."""
    chunk = b"x" * _CHUNK

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if after_ehlo:
            await _send(writer, _BANNER)
            await reader.readline()
            await _send(writer, b"250-")
        else:
            await _send(writer, b"220 ")
        for _ in range(size // len(chunk)):
            await _send(writer, chunk)
        await _drain_input(reader)

    return handler


def garbage(seed: int = 7, size: int = 4096) -> Handler:
    """Binary garbage as the greeting and as the answer to anything sent."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rng = random.Random(seed)
        await _send(writer, rng.randbytes(size))
        for _ in range(MAX_LINES):
            if not await reader.read(_CHUNK):
                return
            await _send(writer, rng.randbytes(size))

    return handler


async def invalid_utf8_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Well-formed SMTP whose texts are invalid UTF-8 (and a terminal escape), and an open relay,
    so findings quote them."""
    await _smtp_like(
        reader,
        writer,
        banner=b"220 mx.h\xc3\x28stile.test ESMTP \xff\xfe\x80 \xed\xa0\x80 \x1b]0;owned\x07\r\n",
        ehlo=b"250-mx.hostile.test \xe2\x82\r\n250-SIZE \xff\r\n250-X-\xff\xfe\r\n"
        b"250-AUTH PLAIN \xc3\r\n250 8BITMIME\r\n",
        other=b"250 2.1.5 Ok \xc0\xaf\xf8\x88\x80\x80\x80\r\n",
    )


def slow_replies(delay: float) -> Handler:
    """Answers every command with `250`, each reply just inside the client's command timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send(writer, _BANNER)

        async def answer(line: bytes) -> bool:
            await asyncio.sleep(delay)
            await _send(writer, _EHLO if _verb(line) in (b"EHLO", b"HELO") else b"250 2.0.0 Ok\r\n")
            return _verb(line) != b"QUIT"

        await _each_line(reader, answer)

    return handler


async def bad_code_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A greeting whose reply code is out of range (999)."""
    await _send(writer, b"999 mx.hostile.test ESMTP out of range\r\n")
    await _drain_input(reader)


async def bad_codes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A proper banner and EHLO, then replies with codes out of range, negative and missing."""
    await _send(writer, _BANNER)
    replies = iter(
        [
            b"999 2.1.0 out of range\r\n",
            b"099 below range\r\n",
            b"-12 negative\r\n",
            b"600 above range\r\n",
            b" 250 leading space\r\n",
            b"\r\n",  # missing altogether
            b"abc no code\r\n",
        ]
    )

    async def answer(line: bytes) -> bool:
        if _verb(line) in (b"EHLO", b"HELO"):
            await _send(writer, b"250 mx.hostile.test\r\n")
            return True
        await _send(writer, next(replies, b"\r\n"))
        return True

    await _each_line(reader, answer)


def reset_mid_reply(*, at: str) -> Handler:
    """A TCP reset halfway through a multi-line reply: `at` is "banner" or "ehlo"."""
    if at not in ("banner", "ehlo"):
        raise ValueError(at)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if at == "ehlo":
            await _send(writer, _BANNER)
            await reader.readline()
            await _send(writer, b"250-mx.hostile.test\r\n250-PIPEL")
        else:
            await _send(writer, b"220-mx.hostile.test first line\r\n220-seco")
        await asyncio.sleep(0.05)  # let the partial reply reach the client first
        _rst(writer)

    return handler


async def close_after_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A normal banner, then an orderly close before any command."""
    await _send(writer, _BANNER)
    writer.close()


async def tempfail_after_two(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers two commands, then `421` and hangs up (every connection)."""
    await _send(writer, _BANNER)
    answered = 0

    async def answer(line: bytes) -> bool:
        nonlocal answered
        if answered >= 2:
            await _send(writer, b"421 4.7.0 mx.hostile.test Error: too many commands, closing\r\n")
            writer.close()
            return False
        answered += 1
        await _send(writer, _EHLO if _verb(line) in (b"EHLO", b"HELO") else b"250 2.1.0 Ok\r\n")
        return True

    await _each_line(reader, answer)


async def starttls_hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Advertises STARTTLS, says 220 Ready, then never answers the TLS ClientHello."""

    async def hang() -> None:
        await _drain_input(reader)

    await _smtp_like(reader, writer, ehlo=_EHLO_STARTTLS, starttls=hang)


async def starttls_fails(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Advertises STARTTLS, says 220 Ready, then answers the ClientHello with a fatal TLS alert."""

    async def fail() -> None:
        await reader.read(_CHUNK)  # the ClientHello
        # TLS 1.2 record, alert, fatal (2), handshake_failure (40)
        await _send(writer, b"\x15\x03\x03\x00\x02\x02\x28")
        writer.close()

    await _smtp_like(reader, writer, ehlo=_EHLO_STARTTLS, starttls=fail)


def http(request_wait: float = 0.3) -> Handler:
    """An HTTP server: answers a request with 400, and a silent client with 408 (as Apache does)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b"<html><body><h1>400 Bad Request</h1></body></html>\n"
        try:
            async with asyncio.timeout(request_wait):
                await reader.readline()
            status = b"400 Bad Request"
        except TimeoutError:
            status = b"408 Request Timeout"
        await _send(
            writer,
            b"HTTP/1.1 " + status + b"\r\nServer: Apache\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
        )
        writer.close()

    return handler


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A banner, then every command line sent straight back."""
    await _send(writer, _BANNER)

    async def answer(line: bytes) -> bool:
        await _send(writer, line + b"\r\n")
        return True

    await _each_line(reader, answer)


async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A banner, then never reads and never answers: EHLO waits in its receive window forever."""
    await _send(writer, _BANNER)
    await asyncio.sleep(LIFETIME)


class BlindRelay:
    """Never reads, but answers on a clock: a banner, then `250 Ok` every `tick` seconds.

    A client that trusts the replies keeps sending commands until the server's (tiny) receive
    window is full; `queued` records the most bytes seen waiting unread in a connection's
    receive queue (FIONREAD), for tests to compare with what the client sent.
    """

    def __init__(self, tick: float = 0.02, replies: int = 400) -> None:
        self.tick = tick
        self.replies = replies
        self.queued: list[int] = []  # per connection, the most unread bytes seen

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        slot = len(self.queued)
        self.queued.append(0)
        await _send(writer, _BANNER)
        for _ in range(self.replies):
            await asyncio.sleep(self.tick)
            unread = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            self.queued[slot] = max(self.queued[slot], unread)
            await _send(writer, b"250 2.0.0 Ok\r\n")


# A line as `relayaudit check` starts its own, for a server to smuggle into the output
FORGED = "127.0.0.1:25  RELAY-REFUSED  (seen from 127.0.0.1)"
_FORGED = FORGED.encode()
_RLO = "\u202e".encode()  # RIGHT-TO-LEFT OVERRIDE: turns the rest of a line around


def _forger_tls() -> ssl.SSLContext:
    """A self-signed certificate whose names carry a newline, the forged line and an override."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mx\u202e\n{FORGED}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="forger-") as tmp:
        path = Path(tmp) / "cert.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx.load_cert_chain(path)
    return ctx


async def forger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An open relay whose every text tries to forge or turn around the scanner's output lines.

    Greeting, EHLO keyword, RCPT reply and certificate names each carry a second line that reads
    like `check`'s first (FORGED), a RIGHT-TO-LEFT OVERRIDE, terminal escapes and a bare CR.
    """
    await _send(
        writer,
        b"220-mx.forger.test ESMTP \x1b[1A\x1b[2K\rrelay refused " + _RLO + b"doog lla\r\n"
        b"220 " + _FORGED + b"\r\n",
    )
    ehlo = b"250-mx.forger.test\r\n250-STARTTLS\r\n250-X-" + _RLO + b"DELIVERED\r\n250 8BITMIME\r\n"

    async def answer(line: bytes) -> bool:
        verb = _verb(line)
        if verb in (b"EHLO", b"HELO"):
            await _send(writer, ehlo)
        elif verb == b"STARTTLS":
            await _send(writer, b"220 2.0.0 Ready to start TLS\r\n")
            await writer.start_tls(_forger_tls())
        elif verb == b"MAIL":
            await _send(writer, b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            await _send(writer, b"250-2.1.5 Ok " + _RLO + b"\x1b[31m\r\n250 " + _FORGED + b"\r\n")
        elif verb == b"QUIT":
            await _send(writer, _BYE)
            return False
        else:
            await _send(writer, b"250 2.0.0 Ok\r\n")
        return True

    await _each_line(reader, answer)


# -- running them -----------------------------------------------------------------------------------


class HostileServer:
    """One listener running `handler` per connection, each connection bounded by `lifetime`.

    `read_limit` is the StreamReader limit: asyncio stops reading from the socket once twice this
    much is buffered, so a small value plus a small `rcvbuf` makes a server whose TCP receive
    window really fills (see never_reads).
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        read_limit: int = 2**16,
        rcvbuf: int | None = None,
        lifetime: float = LIFETIME,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError(f"hostile servers listen on loopback only, not {host}")
        self.handler = handler
        self.host = host
        self.port = port
        self.read_limit = read_limit
        self.rcvbuf = rcvbuf
        self.lifetime = lifetime
        self.connections = 0
        self.errors: list[BaseException] = []  # unexpected exceptions in the handler (test bugs)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # inherited
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.start_server(
                self._client, sock=sock, limit=self.read_limit
            )
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            async with asyncio.timeout(self.lifetime):
                await self.handler(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, or the connection reached its lifetime
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio would log a cancelled handler task as an error)
        except ValueError as exc:  # readline() over the limit: the client sent a huge line
            if "limit" not in str(exc):
                self.errors.append(exc)
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def __aenter__(self) -> HostileServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


@dataclass(frozen=True)
class Beast:
    """One inhabitant of the zoo and the verdicts a correct scanner may give it."""

    name: str
    handler: Handler
    verdicts: frozenset[VerdictStatus]
    read_limit: int = 2**16
    rcvbuf: int | None = None

    def server(self, host: str = "127.0.0.1", port: int = 0) -> HostileServer:
        return HostileServer(
            self.handler, host, port, read_limit=self.read_limit, rcvbuf=self.rcvbuf
        )


_V = VerdictStatus
BEASTS: tuple[Beast, ...] = (
    Beast("no-banner", silent, frozenset({_V.NO_BANNER})),
    Beast("drip-banner", drip_banner(2.0), frozenset({_V.NO_BANNER})),
    Beast("endless-continuation", endless_continuation, frozenset({_V.ERROR})),
    Beast("long-banner-line", long_line(), frozenset({_V.NOT_SMTP})),
    Beast("long-ehlo-line", long_line(after_ehlo=True), frozenset({_V.ERROR})),
    Beast("binary-garbage", garbage(), frozenset({_V.NOT_SMTP})),
    Beast("invalid-utf8-relay", invalid_utf8_relay, frozenset({_V.OPEN_RELAY})),
    Beast("bad-code-banner", bad_code_banner, frozenset({_V.NOT_SMTP})),
    Beast("bad-codes", bad_codes, frozenset({_V.ERROR})),
    Beast("reset-mid-banner", reset_mid_reply(at="banner"), frozenset({_V.NO_BANNER})),
    Beast("reset-mid-ehlo", reset_mid_reply(at="ehlo"), frozenset({_V.ERROR})),
    Beast("close-after-banner", close_after_banner, frozenset({_V.ERROR})),
    Beast("421-after-two", tempfail_after_two, frozenset({_V.INCONCLUSIVE})),
    Beast("starttls-hangs", starttls_hangs, frozenset({_V.RELAY_REFUSED})),
    Beast("starttls-fails", starttls_fails, frozenset({_V.RELAY_REFUSED})),
    Beast("http", http(), frozenset({_V.NOT_SMTP})),
    Beast("echo", echo, frozenset({_V.ERROR})),
    Beast("slow-replies", slow_replies(1.5), frozenset({_V.OPEN_RELAY})),
    Beast("never-reads", never_reads, frozenset({_V.ERROR}), read_limit=1, rcvbuf=1),
    Beast("blind-relay", BlindRelay(), frozenset({_V.OPEN_RELAY}), read_limit=1, rcvbuf=1),
)


@dataclass
class Zoo:
    """Every beast at once: beast i listens on `hosts[i]`, all on one shared port."""

    hosts: Sequence[str]
    beasts: Sequence[Beast] = BEASTS
    port: int = 0
    servers: list[HostileServer] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # handler bugs, kept after stop

    async def start(self) -> None:
        if len(self.hosts) < len(self.beasts):
            raise ValueError(f"{len(self.beasts)} beasts need as many hosts, got {len(self.hosts)}")
        for attempt in range(
            20
        ):  # an ephemeral port free on the first host may be taken on another
            try:
                for host, beast in zip(self.hosts, self.beasts, strict=False):
                    server = beast.server(host, self.port)
                    await server.start()
                    self.servers.append(server)
                    self.port = server.port
                return
            except OSError:
                await self.stop()
                self.port = 0
                if attempt == 19:
                    raise

    async def stop(self) -> None:
        servers, self.servers = self.servers, []
        await asyncio.gather(*(s.stop() for s in servers))
        self.errors.extend(e for s in servers for e in s.errors)

    async def __aenter__(self) -> Zoo:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
