"""Lean asyncio SMTP lab: many loopback-only listeners in one process, scripted relay behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from enum import Enum, StrEnum
from types import MappingProxyType, TracebackType
from typing import Final, cast

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relayaudit.errors import ConfigError

__all__ = [
    "MAX_LINE",
    "MAX_MESSAGE",
    "Behaviour",
    "Delivery",
    "Lab",
    "RecipientKind",
    "ServerSpec",
    "is_plain_address",
    "resolve_recipient",
    "server_tls_context",
]

_log = logging.getLogger(__name__)

MAX_LINE: Final = 4096  # longest command line (without CRLF) before "500 5.5.0 Line too long"
MAX_MESSAGE: Final = 1024 * 1024  # DATA larger than this is read to the end, then refused with 552
_MAX_RCPTS: Final = 100
_SIZE_ADVERTISED: Final = 10240000  # Postfix's default message_size_limit, as real servers say
_SOFT_ERROR_LIMIT: Final = 10  # Postfix smtpd_soft_error_limit
_HARD_ERROR_LIMIT: Final = 20  # Postfix smtpd_hard_error_limit
_FORWARD_TIMEOUT: Final = 10.0
_TLS_HANDSHAKE_TIMEOUT: Final = 10.0
# A relay chain built from a misconfigured mx map could loop forever inside one process; real MTAs
# stop such loops by counting Received headers, so the lab does the same.
_MAX_HOPS: Final = 25
_BACKLOG: Final = 256  # benchmarks open bursts of connections to one listener

_HTTP_400: Final = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_OK: Final = b"250 2.0.0 Ok\r\n"
_UNKNOWN: Final = b"502 5.5.2 Error: command not recognized\r\n"

_MAIL_RE: Final = re.compile(r"FROM:\s*<([^<>]*)>(?:\s+(.*))?", re.IGNORECASE)
_RCPT_RE: Final = re.compile(r"TO:\s*<([^<>]*)>(?:\s+(.*))?", re.IGNORECASE)
# u%d@host: the only odd form a percent-hack server relays (host must be its own name or IP).
_PERCENT_RE: Final = re.compile(r'([^@%!"]+)%([^@%!"]+)@([^@%!"]+)')
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")

_EMPTY_MX: Final[Mapping[str, tuple[str, int]]] = MappingProxyType({})


class Behaviour(StrEnum):
    """How one lab server answers relay attempts; each is a case from relay-tests/verdicts."""

    OPEN_RELAY = "open_relay"  # relays any resolvable off-host recipient, odd forms included
    CLOSED = "closed"  # local recipients only; others "554 5.7.1 <rcpt>: Relay access denied"
    CAMPUS_SENDER = "campus_sender"  # relays when MAIL FROM's domain is a campus domain
    PERCENT_HACK = "percent_hack"  # relays u%d@[IP] and u%d@<hostname>; otherwise CLOSED
    AUTH_REQUIRED = "auth_required"  # MAIL answered 530 5.7.0 Authentication required
    TLS_REQUIRED = "tls_required"  # MAIL refused before STARTTLS; CLOSED after it
    RELAY_AFTER_STARTTLS = "relay_after_starttls"  # CLOSED in plaintext, OPEN_RELAY after TLS
    ACCEPT_ALL_DISCARD = "accept_all_discard"  # 250 to everything, delivers nothing
    ODD_FORMS_LOCAL = "odd_forms_local"  # OpenSMTPD-like: odd forms taken as local, never relayed
    GREYLIST = "greylist"  # 451 at RCPT for every non-local recipient
    AUTH_NO_TLS = "auth_no_tls"  # CLOSED, but advertises AUTH without STARTTLS
    HELO_ONLY = "helo_only"  # EHLO unknown, HELO works; otherwise OPEN_RELAY
    NOT_SMTP = "not_smtp"  # silent until input, then an HTTP 400 and close
    TARPIT = "tarpit"  # accepts TCP, never sends a banner, never reads


@dataclass(frozen=True)
class ServerSpec:
    """One listener of the lab."""

    host: str  # an IPv4 address in 127.0.0.0/8
    port: int  # 0 = ephemeral; Lab.address_of() reports the bound port
    behaviour: Behaviour
    hostname: str = "mx.campus.test"  # banner/EHLO name; PERCENT_HACK accepts u%d@<hostname>
    implicit_tls: bool = False  # TLS from the first byte (port-465 style)
    reply_delay: float = 0.0  # seconds before every reply, banner included
    error_limits: bool = False  # Postfix soft/hard error limits (10 / 20 refused commands)
    error_sleep: float = 1.0  # Postfix smtpd_error_sleep_time; tests shorten it


@dataclass(frozen=True)
class Delivery:
    """A message the lab relayed onward for one recipient (recorded when DATA is accepted)."""

    server: tuple[str, int]  # the lab listener that relayed it
    mail_from: str  # the MAIL FROM path without <>, "" for the null sender
    rcpt: str  # the external address the relay resolved the RCPT path to
    data: bytes  # the message as received, dot-unstuffed


class RecipientKind(Enum):
    """What a server that honours every address trick would make of a RCPT path."""

    LOCAL = "local"  # a mailbox on this host (or an unqualified name)
    EXTERNAL = "external"  # an address on another host: relaying it is relaying
    BAD = "bad"  # nothing sensible (empty, control characters, leftover extra @)


def is_plain_address(path: str) -> bool:
    """True for exactly local@domain with no %, !, quotes, extra @ or leading @route."""
    local, at, domain = path.partition("@")
    return (
        bool(at and local and domain)
        and "@" not in domain
        and not any(c in path for c in '%!"')
        and _CONTROL_RE.search(path) is None
    )


def resolve_recipient(path: str, own_names: frozenset[str]) -> tuple[RecipientKind, str]:
    """Resolve a RCPT path the way a maximally permissive MTA would; returns (kind, address).

    own_names are lower-case: the server's host name, its local domains and "[its IP]".
    The rules, applied in order, are deliberately simple:
    1. drop every double quote ("u@d" -> u@d, "u@d"@T -> u@d@T), a leading source route
       (@T:u@d -> u@d, @a,@b:u@d -> u@d) and trailing @s (u@d@ -> u@d);
    2. while the text ends in @<own name> and what precedes it still holds @, % or !, drop that
       suffix (u@d@T -> u@d, u%d@[IP] -> u%d, d!u@T -> d!u);
    3. with no @ left: the rightmost % becomes @ (u%d -> u@d); else the first ! splits a UUCP
       path (d!u -> u@d); else it is an unqualified local name;
    4. exactly one @ must remain with non-empty sides, else BAD; the domain decides local/external.
    """
    if not path or _CONTROL_RE.search(path):
        return RecipientKind.BAD, path
    text = path.replace('"', "")
    if text.startswith("@"):
        _, colon, rest = text.partition(":")
        if not colon:
            return RecipientKind.BAD, path
        text = rest
    text = text.rstrip("@")
    while "@" in text:
        head, _, domain = text.rpartition("@")
        if domain.lower() in own_names and any(c in head for c in "@%!"):
            text = head
        else:
            break
    if "@" not in text:
        if "%" in text:
            user, _, host = text.rpartition("%")
            text = f"{user}@{host}"
        elif "!" in text:
            host, _, user = text.partition("!")
            text = f"{user}@{host}"
        elif text:
            return RecipientKind.LOCAL, text
        else:
            return RecipientKind.BAD, path
    local, _, domain = text.rpartition("@")
    if not local or not domain or "@" in local:
        return RecipientKind.BAD, path
    if domain.lower() in own_names:
        return RecipientKind.LOCAL, text
    return RecipientKind.EXTERNAL, text


@functools.cache
def _tls_key() -> ec.EllipticCurvePrivateKey:
    # One key per process: EC P-256 is generated in microseconds, RSA 2048 in ~100 ms.
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def server_tls_context(hostname: str) -> ssl.SSLContext:
    """A server context with a self-signed 1-day certificate for hostname, made once per process."""
    key = _tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # tolerate small clock skew of clients
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files; the key lives on disk for the duration of this call only.
    with tempfile.TemporaryDirectory(prefix="relaylab-") as tmp:
        path = os.path.join(tmp, "cert.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        ctx.load_cert_chain(path)
    return ctx


def _ehlo_reply(hostname: str, extra: Sequence[str]) -> bytes:
    lines = [hostname, "PIPELINING", f"SIZE {_SIZE_ADVERTISED}", "8BITMIME", *extra]
    body = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return body.encode()


def _encode(text: str) -> bytes:
    # surrogateescape round-trips any bytes a client sent, so echoed paths never raise.
    return (text + "\r\n").encode("utf-8", "surrogateescape")


def _loopback_ipv4(value: str, where: str) -> None:
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IPv4 address literal") from None
    if addr not in ipaddress.IPv4Network("127.0.0.0/8"):
        raise ConfigError(f"{where}: {value!r} is outside 127.0.0.0/8; the lab is loopback-only")


def _hop_count(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    header = data if end < 0 else data[:end]
    return sum(1 for line in header.splitlines() if line[:9].lower() == b"received:")


class _Listener:
    """Per-listener constants, computed once so that sessions stay small and cheap."""

    __slots__ = (
        "address",
        "banner",
        "ehlo_plain",
        "ehlo_tls",
        "hostname_l",
        "ip_literal",
        "lab",
        "own_names",
        "server",
        "spec",
        "tls_context",
    )

    def __init__(self, lab: Lab, spec: ServerSpec) -> None:
        self.lab = lab
        self.spec = spec
        self.address: tuple[str, int] = (spec.host, spec.port)
        self.server: asyncio.Server | None = None
        self.hostname_l = spec.hostname.lower()
        self.ip_literal = f"[{spec.host}]"
        self.own_names = frozenset({self.hostname_l, self.ip_literal, *lab._local_domains})
        self.banner = _encode(f"220 {spec.hostname} ESMTP relaylab")
        b = spec.behaviour
        auth = ["AUTH PLAIN LOGIN"] if b in (Behaviour.AUTH_REQUIRED, Behaviour.AUTH_NO_TLS) else []
        offers_starttls = b in (Behaviour.TLS_REQUIRED, Behaviour.RELAY_AFTER_STARTTLS)
        starttls = ["STARTTLS"] if offers_starttls and not spec.implicit_tls else []
        self.ehlo_plain = _ehlo_reply(spec.hostname, starttls + auth)
        self.ehlo_tls = _ehlo_reply(spec.hostname, auth)
        needs_tls = spec.implicit_tls or bool(starttls)
        self.tls_context = server_tls_context(spec.hostname) if needs_tls else None


class _Session(asyncio.Protocol):
    """One SMTP connection: a line-driven state machine; delays use loop timers, not tasks."""

    __slots__ = (
        "_batch",
        "_buf",
        "_data_midline",
        "_data_parts",
        "_data_size",
        "_data_too_big",
        "_done",
        "_errors",
        "_helo",
        "_in_data",
        "_listener",
        "_mail",
        "_overlong",
        "_paused",
        "_peer",
        "_rcpts",
        "_timer",
        "_tls",
        "_transport",
        "_upgrading",
    )

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._batch: list[bytes] | None = None  # replies to pipelined input, written together
        self._paused = False  # a delayed reply is pending; input waits behind it
        self._upgrading = False  # STARTTLS handshake in progress
        self._done = False  # NOT_SMTP has answered, or the session is closing
        self._timer: asyncio.TimerHandle | None = None
        self._errors = 0
        self._overlong = False
        self._tls = listener.spec.implicit_tls
        self._helo = ""
        self._peer = ""
        self._mail: str | None = None
        self._rcpts: list[tuple[str, str | None]] = []  # (path as sent, external relay target)
        self._in_data = False
        self._data_parts: list[bytes] = []
        self._data_size = 0
        self._data_too_big = False
        self._data_midline = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._listener.lab._sessions.add(self)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        behaviour = self._listener.spec.behaviour
        if behaviour is Behaviour.TARPIT:
            # Never reading lets the kernel buffers fill, as a real tarpit does.
            self._transport.pause_reading()
            return
        if behaviour is Behaviour.NOT_SMTP:
            return
        self._reply(self._listener.banner)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._listener.spec.behaviour is Behaviour.NOT_SMTP:
            self._done = True
            self._reply(_HTTP_400, close=True)
            return
        self._buf += data
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def abort(self) -> None:
        """Drop the connection at once (Lab.stop)."""
        transport = self._transport
        self._closed()
        if transport is not None:
            transport.abort()

    def _closed(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._buf.clear()
        self._data_parts.clear()
        self._listener.lab._sessions.discard(self)

    # -- replies ---------------------------------------------------------------------------

    def _reply(
        self, data: bytes, *, close: bool = False, then: Callable[[], None] | None = None
    ) -> None:
        spec = self._listener.spec
        delay = spec.reply_delay
        if spec.error_limits and self._errors >= _SOFT_ERROR_LIMIT:
            delay += spec.error_sleep
        if data[:1] in (b"4", b"5"):
            self._errors += 1
        if delay > 0 and self._transport is not None:
            # Hold further input until this reply is out, so pipelined commands keep their order.
            self._paused = True
            self._transport.pause_reading()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(delay, self._delayed_send, data, close, then)
        else:
            self._send(data, close, then)

    def _delayed_send(self, data: bytes, close: bool, then: Callable[[], None] | None) -> None:
        self._timer = None
        self._send(data, close, then)
        self._drain()

    def _send(self, data: bytes, close: bool, then: Callable[[], None] | None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._batch is not None and not close and then is None:
            self._batch.append(data)  # one write for the replies to one read
            return
        self._flush()
        transport.write(data)
        if close:
            self._done = True
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if then is not None:
            then()

    # -- input -----------------------------------------------------------------------------

    def _flush(self) -> None:
        batch, transport = self._batch, self._transport
        if batch:
            self._batch = []
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(batch))

    def _drain(self) -> None:
        self._batch = []
        try:
            self._drain_lines()
        finally:
            self._flush()
            self._batch = None

    def _drain_lines(self) -> None:
        buf = self._buf
        while not (self._paused or self._upgrading or self._done) and self._transport is not None:
            idx = buf.find(b"\n")
            if idx < 0:
                if len(buf) > MAX_LINE:
                    if self._in_data:
                        # Long DATA lines are legal enough; keep them as line continuations.
                        self._data_chunk(bytes(buf), eol=False)
                    else:
                        self._overlong = True  # answer once the line finally ends
                    buf.clear()
                return
            line = bytes(buf[: idx + 1])
            del buf[: idx + 1]
            if self._in_data:
                self._data_chunk(line, eol=True)
            elif self._overlong or len(line.rstrip(b"\r\n")) > MAX_LINE:
                self._overlong = False
                self._reply(b"500 5.5.0 Line too long\r\n")
            else:
                self._command(line)

    def _data_chunk(self, piece: bytes, *, eol: bool) -> None:
        at_line_start = not self._data_midline
        self._data_midline = not eol
        if at_line_start and eol and piece in (b".\r\n", b".\n"):
            self._end_data()
            return
        if at_line_start and piece.startswith(b"."):
            piece = piece[1:]  # RFC 5321 4.5.2 dot-unstuffing
        if self._data_too_big:
            return
        self._data_size += len(piece)
        if self._data_size > MAX_MESSAGE:
            # Keep reading to the terminator (the client is still sending), but stop storing.
            self._data_too_big = True
            self._data_parts.clear()
        else:
            self._data_parts.append(piece)

    # -- commands --------------------------------------------------------------------------

    def _command(self, raw: bytes) -> None:
        listener = self._listener
        spec = listener.spec
        if spec.error_limits and self._errors >= _HARD_ERROR_LIMIT:
            self._reply(_encode(f"421 4.7.0 {spec.hostname} Error: too many errors"), close=True)
            return
        text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape").strip()
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        behaviour = spec.behaviour
        match verb:
            case "EHLO" | "HELO":
                if verb == "EHLO" and behaviour is Behaviour.HELO_ONLY:
                    self._reply(_UNKNOWN)
                elif not arg:
                    self._reply(_encode(f"501 Syntax: {verb} hostname"))
                else:
                    self._helo = arg
                    self._reset()
                    if verb == "HELO":
                        self._reply(_encode(f"250 {spec.hostname}"))
                    else:
                        self._reply(listener.ehlo_tls if self._tls else listener.ehlo_plain)
            case "MAIL":
                self._mail_cmd(arg)
            case "RCPT":
                self._rcpt_cmd(arg)
            case "DATA":
                if self._mail is None:
                    self._reply(b"503 5.5.1 Error: need MAIL command\r\n")
                elif not self._rcpts:
                    self._reply(b"503 5.5.1 Error: need RCPT command\r\n")
                else:
                    self._in_data = True
                    self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            case "RSET":
                self._reset()
                self._reply(_OK)
            case "NOOP":
                self._reply(_OK)
            case "QUIT":
                self._reply(b"221 2.0.0 Bye\r\n", close=True)
            case "VRFY":
                self._reply(b"252 2.0.0 Cannot VRFY user, but will accept message\r\n")
            case "STARTTLS":
                self._starttls_cmd()
            case "AUTH":
                if behaviour in (Behaviour.AUTH_REQUIRED, Behaviour.AUTH_NO_TLS):
                    # The lab knows no credentials: every attempt fails, as for a scanner.
                    self._reply(b"535 5.7.8 Error: authentication failed\r\n")
                else:
                    self._reply(b"503 5.5.1 Error: authentication not enabled\r\n")
            case "":
                self._reply(b"500 5.5.2 Error: bad syntax\r\n")
            case _:
                self._reply(_UNKNOWN)

    def _reset(self) -> None:
        self._mail = None
        self._rcpts = []

    def _starttls_cmd(self) -> None:
        listener = self._listener
        if listener.tls_context is None or listener.spec.implicit_tls:
            self._reply(_UNKNOWN)
        elif self._tls:
            self._reply(b"554 5.5.1 Error: TLS already active\r\n")
        else:
            self._reply(b"220 2.0.0 Ready to start TLS\r\n", then=self._begin_tls)

    def _begin_tls(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._upgrading = True
        # Stop the raw transport now, or the ClientHello could reach data_received before
        # start_tls takes over.
        transport.pause_reading()
        # Anything pipelined after STARTTLS arrived in plaintext and must not run under TLS
        # (the CVE-2011-0411 command-injection class).
        self._buf.clear()
        lab = self._listener.lab
        lab._track(asyncio.get_running_loop().create_task(self._upgrade(transport)))

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        ctx = self._listener.tls_context
        assert ctx is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, ctx, server_side=True, ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            tls = None
        if tls is None or self._done:
            # A failed handshake never reaches connection_lost on this protocol: clean up here.
            self._closed()
            raw.abort()
            if tls is not None:
                tls.abort()
            return
        self._transport = tls
        self._tls = True
        self._upgrading = False
        self._helo = ""
        self._reset()  # RFC 3207: forget everything learnt before TLS; the client must EHLO again
        self._drain()

    def _mail_cmd(self, arg: str) -> None:
        behaviour = self._listener.spec.behaviour
        match = _MAIL_RE.fullmatch(arg)
        if self._mail is not None:
            self._reply(b"503 5.5.1 Error: nested MAIL command\r\n")
        elif match is None or _CONTROL_RE.search(match.group(1)):
            self._reply(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
        elif behaviour is Behaviour.AUTH_REQUIRED:
            self._reply(b"530 5.7.0 Authentication required\r\n")
        elif behaviour is Behaviour.TLS_REQUIRED and not self._tls:
            self._reply(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        else:
            self._mail = match.group(1)
            self._rcpts = []
            self._reply(b"250 2.1.0 Ok\r\n")

    def _mode(self) -> Behaviour:
        """The behaviour that decides RCPT now, after STARTTLS and sender are taken into account."""
        behaviour = self._listener.spec.behaviour
        if behaviour in (Behaviour.OPEN_RELAY, Behaviour.HELO_ONLY):
            return Behaviour.OPEN_RELAY
        if behaviour is Behaviour.RELAY_AFTER_STARTTLS:
            return Behaviour.OPEN_RELAY if self._tls else Behaviour.CLOSED
        if behaviour is Behaviour.CAMPUS_SENDER:
            domain = (self._mail or "").rpartition("@")[2].lower()
            campus = domain in self._listener.lab._campus_domains
            return Behaviour.OPEN_RELAY if campus else Behaviour.CLOSED
        if behaviour in (
            Behaviour.PERCENT_HACK,
            Behaviour.ACCEPT_ALL_DISCARD,
            Behaviour.ODD_FORMS_LOCAL,
            Behaviour.GREYLIST,
        ):
            return behaviour
        return Behaviour.CLOSED

    def _rcpt_cmd(self, arg: str) -> None:
        match = _RCPT_RE.fullmatch(arg)
        if self._mail is None:
            self._reply(b"503 5.5.1 Error: need MAIL command\r\n")
        elif match is None:
            self._reply(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
        elif len(self._rcpts) >= _MAX_RCPTS:
            self._reply(b"452 4.5.3 Error: too many recipients\r\n")
        else:
            path = match.group(1)
            reply, target = self._decide(path)
            if reply is None:
                self._rcpts.append((path, target))
                self._reply(b"250 2.1.5 Ok\r\n")
            else:
                self._reply(reply)

    def _decide(self, path: str) -> tuple[bytes | None, str | None]:
        """(refusal or None for 250, external address to relay to or None)."""
        listener = self._listener
        mode = self._mode()
        if mode is Behaviour.ACCEPT_ALL_DISCARD:
            return None, None
        kind, address = resolve_recipient(path, listener.own_names)
        if mode is Behaviour.ODD_FORMS_LOCAL:
            if is_plain_address(path) and kind is RecipientKind.EXTERNAL:
                return b"550 Invalid recipient\r\n", None
            return None, None  # odd forms land in a local mailbox named after the whole path
        if kind is RecipientKind.LOCAL:
            return None, None
        if mode is Behaviour.GREYLIST:
            return b"451 4.7.1 Greylisted, try again later\r\n", None
        if kind is RecipientKind.BAD:
            return b"501 5.1.3 Bad recipient address syntax\r\n", None
        if mode is Behaviour.OPEN_RELAY:
            return None, address
        if mode is Behaviour.PERCENT_HACK:
            m = _PERCENT_RE.fullmatch(path)
            if m is not None and m.group(3).lower() in (listener.hostname_l, listener.ip_literal):
                return None, address
        return _encode(f"554 5.7.1 <{path}>: Relay access denied"), None

    def _end_data(self) -> None:
        self._in_data = False
        data = b"".join(self._data_parts)
        too_big = self._data_too_big
        mail_from = self._mail or ""
        targets = [target for _, target in self._rcpts if target is not None]
        self._data_parts = []
        self._data_size = 0
        self._data_too_big = False
        self._data_midline = False
        self._reset()
        if too_big:
            self._reply(b"552 5.3.4 Error: message file too big\r\n")
            return
        if targets and _hop_count(data) > _MAX_HOPS:
            self._reply(b"554 5.4.0 Error: too many hops\r\n")
            return
        lab = self._listener.lab
        lab.accepted_data += 1
        queue_id = f"{next(lab._queue_ids):010X}"
        if targets:
            lab._relay(
                self._listener,
                helo=self._helo,
                peer=self._peer,
                queue_id=queue_id,
                mail_from=mail_from,
                targets=targets,
                data=data,
            )
        self._reply(_encode(f"250 2.0.0 Ok: queued as {queue_id}"))


class Lab:
    """A set of loopback SMTP listeners sharing one event loop, with a record of what they relay."""

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        *,
        local_domains: Sequence[str] = ("campus.test",),
        campus_domains: Sequence[str] = ("campus.test",),
        mx: Mapping[str, tuple[str, int]] = _EMPTY_MX,
    ) -> None:
        self.specs: tuple[ServerSpec, ...] = tuple(specs)
        self._local_domains = frozenset(d.lower() for d in local_domains)
        self._campus_domains = frozenset(d.lower() for d in campus_domains)
        for i, spec in enumerate(self.specs):
            where = f"specs[{i}]"
            _loopback_ipv4(spec.host, f"{where}.host")
            if not 0 <= spec.port <= 65535:
                raise ConfigError(f"{where}.port: {spec.port!r} is not a TCP port")
            if not spec.hostname or any(c.isspace() for c in spec.hostname):
                raise ConfigError(f"{where}.hostname: {spec.hostname!r} is empty or has spaces")
            if spec.reply_delay < 0 or spec.error_sleep < 0:
                raise ConfigError(f"{where}: reply_delay and error_sleep must be >= 0")
        self._mx: dict[str, tuple[str, int]] = {}
        for domain, (host, port) in mx.items():
            # The lab must never hand mail to anything but a loopback listener it was told about.
            _loopback_ipv4(host, f"mx[{domain!r}]")
            if not 0 < port <= 65535:
                raise ConfigError(f"mx[{domain!r}]: {port!r} is not a TCP port")
            self._mx[domain.lower()] = (host, port)
        self.delivered: list[Delivery] = []
        self.accepted_data = 0
        self.forward_failures: list[tuple[Delivery, str]] = []
        self._listeners: list[_Listener] = []
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._forwards: set[asyncio.Task[None]] = set()
        self._queue_ids = itertools.count(1)

    async def start(self) -> None:
        """Bind every listener; on failure close those already bound and raise OSError."""
        if self._listeners:
            raise RuntimeError("Lab already started")
        loop = asyncio.get_running_loop()
        listeners = [_Listener(self, spec) for spec in self.specs]
        try:
            for listener in listeners:
                spec = listener.spec
                ctx = listener.tls_context if spec.implicit_tls else None
                try:
                    server = await loop.create_server(
                        functools.partial(_Session, listener),
                        spec.host,
                        spec.port,
                        ssl=ctx,
                        ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT if ctx else None,
                        backlog=_BACKLOG,
                        reuse_address=True,
                    )
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot listen on {spec.host}:{spec.port}: {exc.strerror}"
                    ) from exc
                listener.server = server
                bound = server.sockets[0].getsockname()
                listener.address = (str(bound[0]), int(bound[1]))
        except BaseException:
            for listener in listeners:
                if listener.server is not None:
                    listener.server.close()
            raise
        self._listeners = listeners

    async def stop(self) -> None:
        """Let pending forwards finish (bounded), then close listeners and every open connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FORWARD_TIMEOUT
        # Forwards first, while every listener still runs: an mx may be a listener of this lab.
        # Only forwards are waited for; a client stalled in a TLS handshake must not delay stop.
        while (pending := [t for t in self._forwards if not t.done()]) and loop.time() < deadline:
            await asyncio.wait(pending, timeout=deadline - loop.time())
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
        for session in list(self._sessions):
            session.abort()
        tasks = self._tasks | self._forwards
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            if listener.server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.server.wait_closed(), 5.0)
                listener.server = None
        self._listeners = []

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def address_of(self, index: int) -> tuple[str, int]:
        """The bound (host, port) of specs[index]."""
        if not self._listeners:
            raise RuntimeError("Lab not started")
        return self._listeners[index].address

    @property
    def connections(self) -> int:
        """Open client connections right now (for benchmarks and leak checks)."""
        return len(self._sessions)

    # -- internals used by sessions ----------------------------------------------------------

    def _track(self, task: asyncio.Task[None], *, forward: bool = False) -> None:
        # The loop keeps only weak references to tasks; these sets keep them alive until done.
        tasks = self._forwards if forward else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _relay(
        self,
        listener: _Listener,
        *,
        helo: str,
        peer: str,
        queue_id: str,
        mail_from: str,
        targets: list[str],
        data: bytes,
    ) -> None:
        by_mx: dict[tuple[str, int], list[Delivery]] = {}
        for rcpt in targets:
            delivery = Delivery(listener.address, mail_from, rcpt, data)
            self.delivered.append(delivery)
            mx = self._mx.get(rcpt.rpartition("@")[2].lower())
            if mx is not None:  # domains without an mx entry are recorded, never contacted
                by_mx.setdefault(mx, []).append(delivery)
        if not by_mx:
            return
        stamp = format_datetime(datetime.now(UTC))
        received = _encode(
            f"Received: from {helo or 'unknown'} ([{peer}])\r\n\tby {listener.spec.hostname}"
            f" (relaylab) with ESMTP id {queue_id}; {stamp}"
        )
        loop = asyncio.get_running_loop()
        for mx, deliveries in by_mx.items():
            coro = self._forward(listener, mx, deliveries, received + data)
            self._track(loop.create_task(coro), forward=True)

    async def _forward(
        self,
        listener: _Listener,
        mx: tuple[str, int],
        deliveries: list[Delivery],
        message: bytes,
    ) -> None:
        host, port = mx
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=listener.spec.hostname,
            timeout=_FORWARD_TIMEOUT,
            use_tls=False,
            start_tls=False,  # the canary mx is plain loopback; never opportunistic TLS
        )
        try:
            async with asyncio.timeout(_FORWARD_TIMEOUT):
                async with client:
                    # SMTP.sendmail (unlike aiosmtplib.send) accepts the null sender "".
                    await client.sendmail(
                        deliveries[0].mail_from, [d.rcpt for d in deliveries], message
                    )
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            _log.warning("relaylab forward to %s:%d failed: %s", host, port, reason)
            self.forward_failures.extend((d, reason) for d in deliveries)
