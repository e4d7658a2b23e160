"""Probes one address:port: connect, SMTP session facts, the relay battery, optional canary send."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import cast

import aiosmtplib

from relayaudit.battery import BatteryInputs, address_literal, build_battery, canary_recipient
from relayaudit.connect import NoSession, connect_socket
from relayaudit.evidence import (
    Confirmation,
    Exchange,
    PortState,
    ProbeResult,
    ProbeStatus,
    RelayTest,
    Reply,
    ReplyClass,
    SessionFacts,
    TestCategory,
    TestOutcome,
    TestResult,
    TlsFacts,
    Transport,
    classify_reply,
    redact_command,
    writable_text,
)
from relayaudit.settings import CanaryTarget, ProbeSettings

# ProbeSettings and CanaryTarget live in relayaudit.settings (importable without the SMTP client)
__all__ = ["CanaryTarget", "Gate", "ProbeSettings", "probe"]

Gate = Callable[[str], Awaitable[None]]
"""Awaited before every new connection to an address (the engine's pacer); the probe knows no rate."""


class _Broken(Exception):
    """The current SMTP connection is unusable; `fatal` means do not reconnect either."""

    def __init__(self, reason: str, *, fatal: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal


_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_SOFTWARE = (
    ("Postfix", re.compile(r"postfix", re.I)),
    ("Exim", re.compile(r"\bexim\b", re.I)),
    ("OpenSMTPD", re.compile(r"opensmtpd", re.I)),
    ("Sendmail", re.compile(r"sendmail", re.I)),
    ("Microsoft Exchange", re.compile(r"microsoft|exchange", re.I)),
    ("qmail", re.compile(r"qmail", re.I)),
    ("Haraka", re.compile(r"haraka", re.I)),
)


def _hostname_from(text: str) -> str | None:
    first = text.split(None, 1)[0] if text.split() else ""
    return first.lower() if "." in first and _HOSTNAME.match(first) else None


def _software(text: str) -> str | None:
    return next((name for name, rx in _SOFTWARE if rx.search(text)), None)


def _tls_facts(smtp: aiosmtplib.SMTP) -> TlsFacts:
    obj = smtp.get_transport_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return TlsFacts(error="no TLS object on the transport")
    cipher = obj.cipher()
    der = obj.getpeercert(binary_form=True)
    facts: dict[str, object] = {
        "protocol": obj.version(),
        "cipher": cipher[0] if cipher else None,
    }
    if der:
        from cryptography import x509  # noqa: PLC0415 - only sessions with TLS pay for this import

        try:
            cert = x509.load_der_x509_certificate(der)
            facts |= {
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "not_after": cert.not_valid_after_utc,
                "self_signed": cert.issuer == cert.subject,
            }
        except ValueError as exc:
            facts["error"] = f"certificate not parseable: {exc}"
    return TlsFacts.model_validate(facts)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{type(exc).__name__}: {exc.code} {exc.message}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


@dataclass(slots=True)
class _Session:
    """One SMTP connection of a probe; its exchanges join the transcript as one block."""

    smtp: aiosmtplib.SMTP
    timeout: float  # the command timeout
    log: list[Exchange] = field(default_factory=list)
    waiting_since: float | None = None  # the command in flight was sent then
    expired: bool = False  # the watchdog closed the connection: that command timed out
    _watchdog: asyncio.TimerHandle | None = None

    # One timer per session instead of one per command (aiosmtplib's per-command wait_for was
    # a tenth of a relay test's CPU): it fires at most once per timeout period, and ends the
    # connection only if the command then in flight has waited the whole timeout.
    def sent(self) -> None:
        self.waiting_since = time.monotonic()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if self.waiting_since is None:
            return
        waited = time.monotonic() - self.waiting_since
        loop = asyncio.get_running_loop()
        if waited >= self.timeout:
            # decided one loop turn later: a reply read in this same turn resumes the command
            # first (and clears waiting_since) instead of losing the connection
            loop.call_soon(self._expire)
        else:
            self._watchdog = loop.call_later(self.timeout - waited, self._check)

    def _expire(self) -> None:
        if self.waiting_since is None or time.monotonic() - self.waiting_since < self.timeout:
            return
        self.expired = True
        self.abort()  # the read in flight ends with SMTPServerDisconnected

    def abort(self) -> None:
        """Drop the connection now: no TLS close_notify exchange a stalled server never answers."""
        transport = self.smtp.transport
        if transport is not None and hasattr(transport, "abort"):
            cast(asyncio.Transport, transport).abort()  # asyncio's and uvloop's alike
        self.smtp.close()

    def stop_watch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


@dataclass(slots=True)
class _Battery:
    """The tests still to run for one transport, shared by the probe's parallel sessions."""

    queue: deque[RelayTest]
    transport: Transport
    attempts: dict[str, int] = field(default_factory=dict)
    sessions_left: int = 0
    stop: str | None = None  # set: run nothing more, skip the rest with this reason
    last_failure: str = ""


@dataclass
class _Run:
    """Mutable evidence gathered while probing, so a deadline still leaves what was seen."""

    address: str
    port: int
    settings: ProbeSettings
    implicit_tls: bool
    gate: Gate | None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    vantage: str = ""
    port_state: PortState = PortState.ERROR
    status: ProbeStatus = ProbeStatus.ERROR
    error: str | None = None
    facts: SessionFacts | None = None
    tls: TlsFacts | None = None
    tests: list[TestResult] = field(default_factory=list)
    transcript: list[Exchange] = field(default_factory=list)
    confirmation: Confirmation | None = None
    sessions: int = 0
    banner_seen: bool = False
    helo: str = ""  # the HELO name in use: the configured one, or the literal it fell back to

    def __post_init__(self) -> None:
        self.helo = self.helo or self.settings.helo_name

    def result(self) -> ProbeResult:
        facts = self.facts
        if facts is not None and self.tls is not None:
            facts = facts.model_copy(update={"tls": self.tls})
        return ProbeResult(
            address=self.address,
            port=self.port,
            vantage=self.vantage or (self.settings.source_address or "default"),
            started=self.started,
            finished=datetime.now(UTC),
            port_state=self.port_state,
            status=self.status,
            error=self.error,
            facts=facts,
            tests=tuple(self.tests),
            transcript=tuple(self.transcript),
            confirmation=self.confirmation,
            sessions=self.sessions,
        )

    # -- one SMTP command ----------------------------------------------------------------

    async def command(self, session: _Session, line: str) -> Reply:
        """Send one command and wait for its reply (never pipelined)."""
        started = time.monotonic()
        verb, _, arg = line.partition(" ")
        if not session.smtp.is_connected:
            # the server closed after its last reply (421, a hang-up after RSET): nothing is sent
            raise _Broken(f"server hung up before {verb}")
        args = (verb.encode(), arg.encode("utf-8", "surrogateescape")) if arg else (verb.encode(),)
        session.sent()
        try:
            response = await session.smtp.execute_command(*args, timeout=None)
        except asyncio.CancelledError:
            self._log(session, line, None, started, error="cancelled (session deadline or stop)")
            raise
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as exc:
            self._log(session, line, None, started, error=f"timeout: {exc}")
            raise _Broken(
                f"no reply to {verb} within {self.settings.command_timeout:g}s", fatal=True
            ) from None
        except aiosmtplib.SMTPServerDisconnected as exc:
            if session.expired:
                self._log(session, line, None, started, error="timeout: no reply")
                raise _Broken(
                    f"no reply to {verb} within {self.settings.command_timeout:g}s", fatal=True
                ) from None
            self._log(session, line, None, started, error=f"disconnected: {exc}")
            raise _Broken(f"server hung up after {verb}") from None
        except aiosmtplib.SMTPResponseException as exc:
            self._log(session, line, None, started, error=_describe(exc))
            raise _Broken(f"unreadable reply to {verb}: {exc.message}", fatal=True) from None
        except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
            self._log(session, line, None, started, error=_describe(exc))
            raise _Broken(f"{verb} failed: {_describe(exc)}", fatal=True) from None
        finally:
            session.waiting_since = None
        # the reply made it, even if the watchdog ended the connection in the same instant: the
        # next command then finds a hang-up, not a timeout
        session.expired = False
        # records on the per-command path are built without validation: their values come
        # typed from aiosmtplib and from us, and validation was a third of a relay test's cost;
        # only the server's text needs what validation would do (invalid UTF-8, control bytes)
        reply = Reply.model_construct(code=response.code, text=writable_text(response.message))
        self._log(session, line, reply, started)
        return reply

    def _log(
        self,
        session: _Session,
        line: str | None,
        reply: Reply | None,
        started: float,
        *,
        error: str | None = None,
    ) -> None:
        session.log.append(
            Exchange.model_construct(
                command=redact_command(line) if line is not None else None,
                reply=reply,
                error=writable_text(error) if error is not None else None,
                elapsed_ms=round((time.monotonic() - started) * 1000, 1),
            )
        )

    # -- sessions ------------------------------------------------------------------------

    async def open_session(
        self, transport: Transport, sock: socket.socket | None = None
    ) -> _Session:
        """Connect (or take the discovery socket), read the greeting, EHLO or HELO, STARTTLS."""
        s = self.settings
        if sock is None:
            if self.gate is not None:
                await self.gate(self.address)
            sock = await connect_socket(
                self.address, self.port, source=s.source_address, timeout=s.connect_timeout
            )
        self.port_state = PortState.OPEN
        with contextlib.suppress(OSError):
            self.vantage = sock.getsockname()[0]
        self.sessions += 1
        session = _Session(
            timeout=s.command_timeout,
            smtp=aiosmtplib.SMTP(
                hostname=self.address,
                sock=sock,
                use_tls=transport is Transport.IMPLICIT_TLS,
                start_tls=False,
                validate_certs=False,
                timeout=s.command_timeout,
                local_hostname=s.helo_name,
            ),
        )
        try:
            banner = await self._greeting(session, transport)
            ehlo = await self._hello(session)
            if transport is Transport.STARTTLS:
                await self._starttls(session)
            elif transport is Transport.IMPLICIT_TLS and self.tls is None:
                self.tls = _tls_facts(session.smtp)
            if self.facts is None:
                self.facts = _facts(session.smtp, banner, ehlo)
        except BaseException:
            self.end_session(session)
            if session.smtp.transport is None:
                sock.close()  # cancelled before aiosmtplib's transport took the socket over
            raise
        return session

    async def _greeting(self, session: _Session, transport: Transport) -> Reply:
        s = self.settings
        smtp = session.smtp
        # the greeting may come late (greet pauses, anti-spam delays); RFC 5321 4.5.3.2
        # allows the server minutes, so it gets its own, longer deadline
        wait = max(s.greeting_timeout, s.command_timeout)
        started = time.monotonic()
        try:
            # one deadline for the TLS handshake (implicit TLS) and the greeting together;
            # asyncio.timeout costs no task per connect, as aiosmtplib's two wait_for calls did.
            # Implicit TLS keeps aiosmtplib's timeout too: it is also the handshake's limit,
            # which would otherwise be asyncio's own 60 s, shorter than a long greeting wait
            tls_limit = wait if transport is Transport.IMPLICIT_TLS else None
            async with asyncio.timeout(wait):
                response = await smtp.connect(timeout=tls_limit)
        except aiosmtplib.SMTPConnectResponseError as exc:
            self._log(session, None, Reply(code=exc.code, text=exc.message), started)
            if 200 <= exc.code <= 599:
                self.banner_seen = True
                raise NoSession(
                    ProbeStatus.SESSION_REFUSED,
                    f"greeting {exc.code} {exc.message}",
                    PortState.OPEN,
                ) from None
            raise NoSession(
                ProbeStatus.NOT_SMTP, f"greeting code {exc.code}", PortState.OPEN
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            self._log(session, None, None, started, error=_describe(exc))
            raise NoSession(
                ProbeStatus.NOT_SMTP, f"not an SMTP greeting: {exc.message[:120]}", PortState.OPEN
            ) from None
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            self._log(session, None, None, started, error="no greeting")
            raise NoSession(
                ProbeStatus.NO_BANNER, f"no greeting within {wait:g}s", PortState.OPEN
            ) from None
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            self._log(session, None, None, started, error=_describe(exc))
            if transport is Transport.IMPLICIT_TLS:
                if self.tls is None:  # a parallel session's failure keeps earlier good facts
                    self.tls = TlsFacts(error=_describe(exc))
                raise NoSession(
                    ProbeStatus.NOT_SMTP, f"implicit TLS failed: {_describe(exc)}", PortState.OPEN
                ) from None
            raise NoSession(
                ProbeStatus.NO_BANNER,
                f"hung up before the greeting: {_describe(exc)}",
                PortState.OPEN,
            ) from None
        self.banner_seen = True
        banner = Reply(code=response.code, text=response.message)
        self._log(session, None, banner, started)
        return banner

    async def _hello(self, session: _Session) -> bool:
        """EHLO, else HELO; True when EHLO worked.

        Servers with anti-forgery HELO rules refuse a name they consider theirs (a campus HELO
        name from outside is exactly that): then the vantage's address literal is tried, the
        RFC 5321 form for a client without a name. A server refusing both refuses the session.
        """
        smtp = session.smtp
        names = [self.helo]
        if self.vantage:
            literal = address_literal(self.vantage)
            if literal != self.helo:
                names.append(literal)
        reply: Reply | None = None
        for name in names:
            started = time.monotonic()
            line = f"EHLO {name}"
            try:
                response = await smtp.ehlo(hostname=name)
                self._log(session, line, Reply(code=response.code, text=response.message), started)
                self.helo = name
                return True
            except aiosmtplib.SMTPHeloError as exc:
                self._log(session, line, Reply(code=exc.code, text=exc.message), started)
            except aiosmtplib.SMTPServerDisconnected as exc:
                self._log(session, line, None, started, error=_describe(exc))
                raise _Broken("server hung up after EHLO") from None
            except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
                self._log(session, line, None, started, error=_describe(exc))
                raise _Broken(f"EHLO failed: {_describe(exc)}", fatal=True) from None
            if not smtp.is_connected:
                raise _Broken("server hung up after EHLO")
            reply = await self.command(session, f"HELO {name}")
            if reply.code == 250:
                self.helo = name
                smtp.last_helo_response = aiosmtplib.SMTPResponse(reply.code, reply.text)
                return False
            if not smtp.is_connected or reply.code == 421:
                break
        raise NoSession(ProbeStatus.SESSION_REFUSED, f"HELO refused: {reply}", PortState.OPEN)

    async def _starttls(self, session: _Session) -> None:
        smtp = session.smtp
        started = time.monotonic()
        try:
            response = await smtp.starttls(validate_certs=False)
        except aiosmtplib.SMTPResponseException as exc:
            self._log(session, "STARTTLS", Reply(code=exc.code, text=exc.message), started)
            if self.tls is None:
                self.tls = TlsFacts(error=f"STARTTLS refused: {exc.code} {exc.message}")
            raise _Broken("STARTTLS refused", fatal=True) from None
        except (aiosmtplib.SMTPException, TimeoutError, OSError, ssl.SSLError) as exc:
            self._log(session, "STARTTLS", None, started, error=_describe(exc))
            if self.tls is None:
                self.tls = TlsFacts(error=f"handshake failed: {_describe(exc)}")
            raise _Broken("STARTTLS handshake failed", fatal=True) from None
        self._log(session, "STARTTLS", Reply(code=response.code, text=response.message), started)
        self.tls = _tls_facts(smtp)
        started = time.monotonic()
        try:
            response = await smtp.ehlo(hostname=self.helo)
        except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
            self._log(session, f"EHLO {self.helo}", None, started, error=_describe(exc))
            raise _Broken("EHLO after STARTTLS failed", fatal=True) from None
        self._log(
            session,
            f"EHLO {self.helo}",
            Reply(code=response.code, text=response.message),
            started,
        )

    async def quit(self, session: _Session) -> None:
        """Say goodbye politely, but never wait long for it (a silent QUIT is not an error).

        Past the session deadline (the task is being cancelled) there is no goodbye at all.
        """
        answered = False
        try:
            task = asyncio.current_task()
            if session.smtp.is_connected and not (task is not None and task.cancelling()):
                with contextlib.suppress(_Broken, TimeoutError):
                    async with asyncio.timeout(min(2.0, self.settings.command_timeout)):
                        await self.command(session, "QUIT")
                        answered = True
        finally:
            self.end_session(session, abort=not answered)

    def end_session(self, session: _Session, *, abort: bool = True) -> None:
        """Close the connection and file its exchanges in the transcript.

        abort: drop it at once (the default for every end but an answered QUIT): a TLS
        connection's graceful close would wait up to 30 s for a silent server's close_notify.
        """
        session.stop_watch()
        if abort:
            session.abort()
        else:
            session.smtp.close()
        if session.log:
            self.transcript.extend(session.log)
            session.log = []

    # -- the battery ---------------------------------------------------------------------

    async def battery(
        self, tests: list[RelayTest], transport: Transport, first: _Session | None
    ) -> None:
        """Run every test, at most N per session, in up to `sessions_per_host` parallel sessions.

        A session hung up on, or answering 421, hands its unfinished tests back for a fresh
        connection. Results are kept in battery order, whichever session ran them.
        """
        s = self.settings
        per_session = s.max_tests_per_session
        wanted = -(-len(tests) // per_session)  # sessions the battery needs without failures
        parallel = max(1, min(s.sessions_per_host, wanted))
        state = _Battery(
            queue=deque(tests),
            transport=transport,
            # as many connections as before parallel sessions: the first plus max_reconnects
            sessions_left=s.max_reconnects + (first is None),
        )
        order = {t.id: i for i, t in enumerate(tests)}
        mark = len(self.tests)
        try:
            if parallel == 1:
                await self._worker(state, first)
            else:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._worker(state, first))
                    for _ in range(parallel - 1):
                        group.create_task(self._worker(state, None))
            if state.queue:
                self._skip(state.queue, transport, state.stop or state.last_failure)
        finally:
            self.tests[mark:] = sorted(self.tests[mark:], key=lambda r: order.get(r.test.id, 0))

    async def _worker(self, state: _Battery, session: _Session | None) -> None:
        """One connection at a time: claim up to N tests, run them, hand back what is unfinished."""
        try:
            while state.queue and state.stop is None:
                if session is None:
                    if state.sessions_left <= 0:
                        state.last_failure = "not run: too many reconnects"
                        return
                    state.sessions_left -= 1
                    try:
                        session = await self.open_session(state.transport)
                    except (NoSession, _Broken, OSError) as exc:
                        state.last_failure = f"not run: reconnect failed: {exc}"
                        return
                    if not state.queue or state.stop is not None:
                        break
                count = min(self.settings.max_tests_per_session, len(state.queue))
                claimed = [state.queue.popleft() for _ in range(count)]
                unfinished = await self._session_tests(session, claimed, state)
                state.queue.extendleft(reversed(unfinished))
                await self.quit(session)
                session = None
        finally:
            if session is not None:
                await self.quit(session)  # at the deadline: closed at once, no goodbye

    async def _session_tests(
        self, session: _Session, claimed: list[RelayTest], state: _Battery
    ) -> list[RelayTest]:
        """Run the claimed tests on one connection; the ones left unfinished are returned.

        Each test is MAIL, then RCPT only after MAIL was accepted, then RSET before the next
        test; every command waits for its reply.
        """
        transport = state.transport
        smtp = session.smtp
        for i, test in enumerate(claimed):
            if not smtp.is_connected:
                return claimed[i:]  # closed after the last reply (421 to RSET): not this test's try
            state.attempts[test.id] = attempts = state.attempts.get(test.id, 0) + 1
            try:
                result = await self._one_test(session, test, transport)
            except _Broken as exc:
                if exc.fatal or attempts >= 2:
                    self.tests.append(
                        TestResult(
                            test=test,
                            transport=transport,
                            outcome=TestOutcome.ERROR,
                            error=exc.reason,
                        )
                    )
                    self._ended(state, exc)
                    return claimed[i + 1 :]
                self._ended(state, exc)
                return claimed[i:]
            closing = 421 in (result.mail and result.mail.code, result.rcpt and result.rcpt.code)
            if closing and attempts < 2:
                # 421 closes the session ("too many errors", connection limits); it is no
                # answer about relaying: ask again on a fresh connection
                return claimed[i:]
            self.tests.append(result)
            if closing or not smtp.is_connected:
                return claimed[i + 1 :]
            # RSET ends the transaction MAIL opened; after a refused MAIL none is open
            if i + 1 < len(claimed) and result.rcpt is not None:
                try:
                    await self.command(session, "RSET")
                except _Broken as exc:
                    self._ended(state, exc)
                    return claimed[i + 1 :]
        return []

    @staticmethod
    def _ended(state: _Battery, exc: _Broken) -> None:
        state.last_failure = f"not run: {exc.reason}"
        if exc.fatal:
            state.stop = state.last_failure

    async def _one_test(
        self, session: _Session, test: RelayTest, transport: Transport
    ) -> TestResult:
        mail = await self.command(session, f"MAIL FROM:<{test.mail_from}>")
        mail_class = classify_reply(mail)
        if mail_class is not ReplyClass.OK:
            return TestResult.model_construct(
                test=test,
                transport=transport,
                mail=mail,
                rcpt=None,
                outcome=_outcome(mail_class, sender=True),
                error=None,
            )
        rcpt = await self.command(session, f"RCPT TO:<{test.rcpt_to}>")
        rcpt_class = classify_reply(rcpt)
        outcome = (
            TestOutcome.ACCEPTED
            if rcpt_class is ReplyClass.OK
            else _outcome(rcpt_class, sender=False)
        )
        return TestResult.model_construct(
            test=test, transport=transport, mail=mail, rcpt=rcpt, outcome=outcome, error=None
        )

    def _skip(self, queue: deque[RelayTest], transport: Transport, reason: str) -> None:
        while queue:
            self.tests.append(
                TestResult(
                    test=queue.popleft(),
                    transport=transport,
                    outcome=TestOutcome.ERROR,
                    error=reason,
                )
            )

    # -- confirmation mode ---------------------------------------------------------------

    async def confirm(self, canary: CanaryTarget, inputs: BatteryInputs) -> None:
        """Send one self-identifying message through the strongest accepted test form."""
        candidates = [
            t
            for t in self.tests
            if t.outcome is TestOutcome.ACCEPTED and t.test.category is not TestCategory.CONTROL
        ]
        if not candidates:
            return
        best = min(candidates, key=_confirmation_preference)
        token = f"relayaudit-{_token()}"
        rcpt = canary_recipient(
            best.test, inputs, local_part=f"{canary.local_part}+{token}", domain=canary.domain
        )
        conf = Confirmation(
            token=token, test_id=best.test.id, transport=best.transport, rcpt_to=rcpt
        )
        self.confirmation = conf
        try:
            session = await self.open_session(best.transport)
        except (NoSession, _Broken) as exc:
            self.confirmation = conf.model_copy(update={"error": f"could not reconnect: {exc}"})
            return
        try:
            mail = await self.command(session, f"MAIL FROM:<{best.test.mail_from}>")
            rcpt_reply = await self.command(session, f"RCPT TO:<{rcpt}>")
            if (
                classify_reply(mail) is not ReplyClass.OK
                or classify_reply(rcpt_reply) is not ReplyClass.OK
            ):
                self.confirmation = conf.model_copy(
                    update={"error": f"canary refused: {mail} / {rcpt_reply}"}
                )
                return
            body = _canary_message(token, self, canary, rcpt)
            started = time.monotonic()
            line = f"DATA <message carrying token {token}>"
            try:
                protocol = session.smtp.protocol
                if protocol is None:
                    raise _Broken("connection lost before DATA")
                response = await protocol.execute_data_command(
                    body, timeout=self.settings.command_timeout
                )
            except aiosmtplib.SMTPResponseException as exc:
                self._log(session, line, Reply(code=exc.code, text=exc.message), started)
                self.confirmation = conf.model_copy(
                    update={"error": f"message refused: {exc.code} {exc.message}"}
                )
                return
            except (aiosmtplib.SMTPException, TimeoutError, OSError) as exc:
                self._log(session, line, None, started, error=_describe(exc))
                self.confirmation = conf.model_copy(
                    update={"error": f"message not accepted: {_describe(exc)}"}
                )
                return
            reply = Reply(code=response.code, text=response.message)
            self._log(session, line, reply, started)
            self.confirmation = conf.model_copy(
                update={"data_reply": reply, "sent": reply.code == 250}
            )
        except _Broken as exc:
            self.confirmation = conf.model_copy(update={"error": exc.reason})
        finally:
            await self.quit(session)


def _facts(smtp: aiosmtplib.SMTP, banner: Reply, ehlo: bool) -> SessionFacts:
    ext = smtp.esmtp_extensions if ehlo else {}
    size_text = ext.get("size", "")
    hello_text = smtp.last_ehlo_response.message if ehlo and smtp.last_ehlo_response else ""
    return SessionFacts(
        banner=banner,
        ehlo=ehlo,
        hostname=_hostname_from(banner.text) or _hostname_from(hello_text),
        capabilities=tuple(sorted(ext)),
        auth_mechanisms=tuple(m.upper() for m in smtp.server_auth_methods) if ehlo else (),
        starttls="starttls" in ext,
        size=int(size_text) if size_text.isdigit() else None,
        pipelining="pipelining" in ext,
        eightbitmime="8bitmime" in ext,
        software=_software(banner.text + " " + hello_text),
    )


def _outcome(kind: ReplyClass, *, sender: bool) -> TestOutcome:
    return {
        ReplyClass.TEMPFAIL: TestOutcome.TEMPFAIL,
        ReplyClass.DISCONNECT: TestOutcome.TEMPFAIL,
        ReplyClass.AUTH_REQUIRED: TestOutcome.AUTH_REQUIRED,
        ReplyClass.TLS_REQUIRED: TestOutcome.TLS_REQUIRED,
        ReplyClass.INVALID: TestOutcome.ERROR,
        ReplyClass.DOMAIN_UNKNOWN: TestOutcome.DOMAIN_UNKNOWN,
    }.get(kind, TestOutcome.SENDER_REFUSED if sender else TestOutcome.REFUSED)


def _confirmation_preference(result: TestResult) -> tuple[int, int]:
    test = result.test
    if test.id == "rcpt-plain":
        return (0, 0)
    if test.category is TestCategory.SENDER:
        return (1, 0)
    return (2, len(test.rcpt_to))


def _token() -> str:
    return secrets.token_hex(16)


def _canary_message(token: str, run: _Run, canary: CanaryTarget, rcpt: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"relayaudit <{run.settings.sender_local_part}@{run.settings.helo_name}>"
    msg["To"] = f"<{canary.local_part}@{canary.domain}>"
    msg["Subject"] = f"relayaudit relay confirmation {token}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=run.settings.helo_name)
    msg["X-Relayaudit-Token"] = token
    msg.set_content(
        "This message was sent by relayaudit, the campus security office's relay audit,\n"
        f"through the SMTP server {run.address} port {run.port} to a mailbox the office owns.\n"
        f"It proves the server relays mail for outside senders. Contact: {canary.contact or 'n/a'}\n"
        f"Token: {token}\nRecipient form: {rcpt}\n",
        cte="7bit",
    )
    return bytes(msg)


async def probe(
    address: str,
    port: int,
    settings: ProbeSettings,
    *,
    implicit_tls: bool = False,
    gate: Gate | None = None,
    sock: socket.socket | None = None,
) -> ProbeResult:
    """Probe one address:port within the session deadline; never raises for network outcomes.

    `sock`, when given, is an already connected socket (from discovery) used for the first session.
    """
    run = _Run(address=address, port=port, settings=settings, implicit_tls=implicit_tls, gate=gate)
    deadline = asyncio.timeout(settings.session_timeout)
    try:
        async with deadline:
            await _probe(run, sock)
    except TimeoutError:
        if not deadline.expired():
            # an inner wait's timeout that escaped: a bug of ours, not the session deadline
            run.status, run.error = ProbeStatus.ERROR, "unexpected: an inner timeout escaped"
        elif not run.banner_seen:
            run.status, run.error = (
                ProbeStatus.NO_BANNER,
                f"no greeting within the {settings.session_timeout:g}s session deadline",
            )
        else:
            run.error = (
                f"session deadline of {settings.session_timeout:g}s reached; results are partial"
            )
    except Exception as exc:  # the one place unknown failures become a status, never a crash
        run.status, run.error = ProbeStatus.ERROR, f"unexpected: {_describe(exc)}"
    finally:
        if sock is not None and run.sessions == 0:
            sock.close()
    return run.result()


async def _probe(run: _Run, sock: socket.socket | None) -> None:
    s = run.settings
    first_transport = Transport.IMPLICIT_TLS if run.implicit_tls else Transport.PLAIN
    try:
        try:
            session = await run.open_session(first_transport, sock)
        except _Broken as exc:
            if sock is None or exc.fatal:
                raise
            # the discovery connection may have idled while other ports were probed, and the
            # server dropped it: one fresh connection before giving up
            session = await run.open_session(first_transport)
    except NoSession as exc:
        run.status, run.error, run.port_state = exc.status, exc.reason, exc.port_state
        return
    except _Broken as exc:
        run.status, run.error = ProbeStatus.SMTP, exc.reason
        return
    run.status = ProbeStatus.SMTP
    facts = run.facts
    assert facts is not None
    inputs = BatteryInputs(
        address=run.address,
        hostname=facts.hostname,
        campus_domains=s.campus_domains,
        external_domains=s.external_domains,
        external_local_part=s.external_local_part,
        sender_local_part=s.sender_local_part,
    )
    tests = build_battery(inputs)
    await run.battery(tests, first_transport, session)

    if facts.starttls and first_transport is Transport.PLAIN:
        relayed = any(
            t.outcome is TestOutcome.ACCEPTED and t.test.category is not TestCategory.CONTROL
            for t in run.tests
        )
        try:
            tls_session = await run.open_session(Transport.STARTTLS)
        except (NoSession, _Broken) as exc:
            run.error = f"STARTTLS retest not possible: {exc}"
            tls_session = None
        if tls_session is not None:
            if s.retest_after_starttls and not relayed:
                await run.battery(tests, Transport.STARTTLS, tls_session)
            else:
                await run.quit(tls_session)
    if s.canary is not None:
        await run.confirm(s.canary, inputs)
