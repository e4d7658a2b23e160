"""Probes one address:port and returns everything it saw: the one outcome contract of relayaudit.

Every address:port reaches `judge()` as a ProbeResult from here: `settled()` for a port whose
connect already failed (closed, filtered, error), `probe()` for every port that accepted one.
The steps: the first session (handshake.py), the battery (runner.py), the retest after
STARTTLS, the sessions that claim another identity (claims.py), and the canary (confirm.py).
Network outcomes are values; a failure no known case explains becomes the status
`internal-error`, never a crash.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime

import structlog

from relayaudit.battery import (
    BatteryInputs,
    build_battery,
    claim_tests,
    helo_claims,
    xclient_claims,
)
from relayaudit.claims import run_claims
from relayaudit.confirm import Expect, choose, send_canary
from relayaudit.evidence import (
    Claim,
    Confirmation,
    ProbeResult,
    ProbeStatus,
    RelayTest,
    TestOutcome,
    TestResult,
    TestRole,
    Transport,
    endpoint,
)
from relayaudit.failures import Broken, NoSession, describe
from relayaudit.handshake import Dial, Gate, Handshake
from relayaudit.runner import Limits, run_battery
from relayaudit.session import WAITING, Observed, Session
from relayaudit.settings import CanaryTarget, ProbeSettings
from relayaudit.wire import Connection, SocketConnection

# ProbeSettings and CanaryTarget live in relayaudit.settings (importable without the SMTP client)
__all__ = ["CanaryTarget", "Gate", "ProbeSettings", "probe", "settled"]

_log = structlog.get_logger("relayaudit.probe")


def settled(address: str, port: int, failure: NoSession, *, vantage: str) -> ProbeResult:
    """The result for a port whose connect already failed: closed, filtered or in error."""
    now = datetime.now(UTC)
    # model_construct skips validation: this runs once per closed port, the sweep's hot path,
    # and every value here is already of its declared type
    return ProbeResult.model_construct(
        address=address,
        port=port,
        vantage=vantage,
        started=now,
        finished=now,
        port_state=failure.port_state,
        status=failure.status,
        error=failure.reason,
        facts=None,
        tests=(),
        transcript=(),
        confirmation=None,
        sessions=0,
    )


class _Probe:
    """The steps of one probe; the evidence gathered so far survives a deadline."""

    def __init__(
        self,
        address: str,
        port: int,
        settings: ProbeSettings,
        *,
        implicit_tls: bool,
        gate: Gate | None,
        dial: Dial | None,
        expect_token: Expect | None = None,
        control_recipient: str | None = None,
    ) -> None:
        self.address = address
        self.control_recipient = control_recipient
        self.expect_token = expect_token
        self.port = port
        self.settings = settings
        self.first_transport = Transport.IMPLICIT_TLS if implicit_tls else Transport.PLAIN
        self.started = datetime.now(UTC)
        self.seen = Observed(helo=settings.helo_name)
        self.handshake = Handshake(
            address, port, settings, gate=gate, observed=self.seen, dial=dial
        )
        self.status = ProbeStatus.ERROR
        self.error: str | None = None
        self.tests: list[TestResult] = []
        self.confirmation: Confirmation | None = None
        self.limits = Limits(
            tests_per_session=settings.max_tests_per_session,
            parallel_sessions=settings.sessions_per_host,
            reconnects=settings.max_reconnects,
        )

    def result(self) -> ProbeResult:
        seen = self.seen
        facts = seen.facts
        if facts is not None and (seen.tls is not None or seen.after_starttls is not None):
            facts = facts.model_copy(
                update={"tls": seen.tls, "after_starttls": seen.after_starttls}
            )
        return ProbeResult(
            address=self.address,
            port=self.port,
            vantage=seen.vantage or (self.settings.source_address or "default"),
            started=self.started,
            finished=datetime.now(UTC),
            port_state=seen.port_state,
            status=self.status,
            error=self.error,
            facts=facts,
            tests=tuple(self.tests),
            transcript=tuple(seen.transcript),
            confirmation=self.confirmation,
            sessions=seen.sessions,
            pipelined=seen.pipelined,
            lockstep=seen.lockstep,
        )

    async def open(self, transport: Transport) -> Session:
        return await self.handshake.open(transport)

    async def open_claiming(self, transport: Transport, claim: Claim) -> Session:
        return await self.handshake.open(transport, claim=claim)

    async def first_session(self, first: Connection | None) -> Session | None:
        """The first session, on the discovery connection if there is one; None: no SMTP here."""
        try:
            try:
                session = await self.handshake.open(self.first_transport, first)
            except Broken as exc:
                if first is None or exc.fatal:
                    raise
                # the discovery connection may have idled while other ports were probed, and
                # the server dropped it: one fresh connection before giving up
                session = await self.handshake.open(self.first_transport)
        except NoSession as exc:
            self.status, self.error, self.seen.port_state = exc.status, exc.reason, exc.port_state
            return None
        except Broken as exc:
            self.status, self.error = ProbeStatus.SMTP, exc.reason
            return None
        self.status = ProbeStatus.SMTP
        return session

    async def run(self, first: Connection | None) -> None:
        session = await self.first_session(first)
        if session is None:
            return
        s = self.settings
        facts = self.seen.facts
        assert facts is not None  # set by the first successful handshake
        inputs = BatteryInputs(
            address=self.address,
            hostname=facts.hostname,
            campus_domains=s.campus_domains,
            external_domains=s.external_domains,
            external_local_part=s.external_local_part,
            sender_local_part=s.sender_local_part,
        )
        tests = build_battery(inputs, control_recipient=self.control_recipient)
        await self.battery(tests, self.first_transport, session)
        if facts.starttls and self.first_transport is Transport.PLAIN:
            await self.retest_after_starttls(tests)
        if s.claimed_identity and not self.relayed() and self.answered():
            await self.claims(inputs)
        if s.canary is not None:
            await self.confirm(s.canary, inputs)

    async def battery(
        self, tests: list[RelayTest], transport: Transport, first: Session | None
    ) -> None:
        await run_battery(
            tests, transport, first, opener=self.open, limits=self.limits, results=self.tests
        )

    def relayed(self) -> bool:
        return any(
            t.outcome is TestOutcome.ACCEPTED and t.test.role is not TestRole.CONTROL
            for t in self.tests
        )

    def answered(self) -> bool:
        """The server answered the plain test (a refusal, a deferral): a battery cut short by
        a failure found nothing to go on from."""
        return any(
            t.test.role is TestRole.PLAIN and t.outcome is not TestOutcome.ERROR
            for t in self.tests
        )

    async def claims(self, inputs: BatteryInputs) -> None:
        """No relay under the scanner's own name: one short session per identity a server may
        trust without cause (XCLIENT where offered, then HELO names), each with the plain test
        (and, for a HELO name, the campus-sender test)."""
        facts = self.seen.facts
        assert facts is not None
        transport = self.first_transport
        if transport is Transport.PLAIN and any(
            t.transport is Transport.STARTTLS for t in self.tests
        ):
            # plain text was refused for want of TLS and the battery went on inside it
            plain = [t for t in self.tests if t.transport is Transport.PLAIN]
            if plain and all(t.outcome is TestOutcome.TLS_REQUIRED for t in plain):
                transport = Transport.STARTTLS
        offered = set(facts.capabilities)
        if facts.after_starttls is not None:
            offered |= set(facts.after_starttls.capabilities)
        families = []
        if "xclient" in offered:
            families.append(xclient_claims(inputs))
        families.append(helo_claims(inputs, own_helo=self.seen.helo))
        for claims in families:
            await run_claims(
                [(c, claim_tests(inputs, c)) for c in claims],
                transport,
                opener=self.open_claiming,
                limits=self.limits,
                results=self.tests,
            )

    async def retest_after_starttls(self, tests: list[RelayTest]) -> None:
        """Plaintext refusals do not clear a server that offers STARTTLS: test again inside TLS."""
        relayed = self.relayed()
        try:
            session = await self.handshake.open(Transport.STARTTLS)
        except (NoSession, Broken) as exc:
            self.error = f"STARTTLS retest not possible: {exc}"
            return
        if self.settings.retest_after_starttls and not relayed:
            await self.battery(tests, Transport.STARTTLS, session)
        else:
            await session.quit()

    async def confirm(self, canary: CanaryTarget, inputs: BatteryInputs) -> None:
        chosen = choose(self.tests, canary=canary, inputs=inputs)
        if chosen is None:
            return
        assert self.expect_token is not None  # checked by probe()
        best, self.confirmation = chosen  # kept if the deadline cuts the send short
        claim = best.test.claim

        async def opener(transport: Transport) -> Session:
            # the canary goes the way the test was accepted: claiming the same identity
            return await self.handshake.open(transport, claim=claim)

        self.confirmation = await send_canary(
            best,
            self.confirmation,
            opener=opener,
            canary=canary,
            inputs=inputs,
            settings=self.settings,
            port=self.port,
            expect=self.expect_token,
        )


async def probe(
    address: str,
    port: int,
    settings: ProbeSettings,
    *,
    implicit_tls: bool = False,
    gate: Gate | None = None,
    sock: socket.socket | None = None,
    dial: Dial | None = None,
    expect_token: Expect | None = None,
    control_recipient: str | None = None,
) -> ProbeResult:
    """Probe one address:port within the session deadline; never raises for network outcomes.

    `sock`, when given, is an already connected socket (from discovery) used for the first
    session. `dial` replaces TCP for new connections (the replay tests' recorded servers).
    `expect_token` (confirmation mode: the receiver's `expect`) is told each canary token
    before its DATA is sent. `control_recipient`: the control address of an earlier try
    (a retry after greylisting repeats the same addresses). A `Waiting` in `session.WAITING`
    is kept told what the probe waits for (`check`'s progress line on a terminal).
    """
    if settings.canary is not None and expect_token is None:
        raise ValueError("confirmation mode needs expect_token: the receiver's expect()")
    run = _Probe(
        address,
        port,
        settings,
        implicit_tls=implicit_tls,
        gate=gate,
        dial=dial,
        expect_token=expect_token,
        control_recipient=control_recipient,
    )
    waiting = run.seen.waiting = WAITING.get()
    if waiting is not None:
        waiting.where = endpoint(address, port)
    deadline = asyncio.timeout(settings.session_timeout)
    try:
        async with deadline:
            await run.run(SocketConnection(sock) if sock is not None else None)
    except TimeoutError as exc:
        if not deadline.expired():
            _internal_error(run, exc)  # an inner wait's timeout that escaped: a bug of ours
        elif not run.seen.banner_seen:
            run.status, run.error = (
                ProbeStatus.NO_BANNER,
                f"no greeting within the {settings.session_timeout:g}s session deadline",
            )
        else:
            run.error = (
                f"session deadline of {settings.session_timeout:g}s reached; results are partial"
            )
    except Exception as exc:  # the one place unknown failures become a status, never a crash
        _internal_error(run, exc)
    finally:
        if sock is not None and run.seen.sessions == 0:
            sock.close()
        if waiting is not None:
            waiting.done()
    return run.result()


def _internal_error(run: _Probe, exc: BaseException) -> None:
    run.status, run.error = ProbeStatus.INTERNAL_ERROR, f"internal error: {describe(exc)}"
    # the one log line a probe writes: a bug's traceback, once, where it happened
    _log.error(
        "probe.internal_error",
        address=run.address,
        port=run.port,
        error=run.error,
        exc_info=exc,
    )
