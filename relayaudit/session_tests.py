"""One connection's share of the relay battery: each test lock-step, or in pipelined groups (RFC 2920).

Each test is MAIL FROM and RCPT TO (RSET between tests); a 421, a hang-up or confusion ends
the connection, and the unfinished tests go back to the battery (runner.py) for a fresh one.
Written against the small `Session` protocol (session.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from relayaudit.evidence import (
    RelayTest,
    Reply,
    ReplyClass,
    TestOutcome,
    TestResult,
    Transport,
    built,
    classify_reply,
)
from relayaudit.failures import Broken
from relayaudit.session import Session

__all__ = ["ERROR_BUDGET", "Battery", "run_test", "session_tests"]

_CLOSING = 421
# Postfix slows every reply down once a client has made smtpd_soft_error_limit (10) errors
# (refused commands, a refused hello's included). A connection starts no test that could make
# its tenth: even its QUIT is answered at once, and the tests left go to a fresh connection.
# (An operator who sets more tests per session than this opts out of the budget: runner.py.)
ERROR_BUDGET = 9


@dataclass(slots=True)
class Battery:
    """The tests still to run for one transport, shared by the battery's parallel sessions."""

    queue: deque[RelayTest]
    transport: Transport
    results: list[TestResult]
    attempts: dict[str, int] = field(default_factory=dict)
    sessions_left: int = 0
    # error replies one connection may have before a test; None: no budget
    error_budget: int | None = ERROR_BUDGET
    stop: str | None = None  # set: run nothing more, skip the rest with this reason
    # tests whose MAIL FROM a sender group saw accepted (and reset): they run in lock-step
    mail_first: set[str] = field(default_factory=set)
    last_failure: str = ""

    def ended(self, exc: Broken) -> None:
        self.last_failure = f"not run: {exc.reason}"
        if exc.fatal:
            self.stop = self.last_failure

    def error(self, test: RelayTest, reason: str) -> None:
        self.results.append(
            TestResult(test=test, transport=self.transport, outcome=TestOutcome.ERROR, error=reason)
        )


async def session_tests(
    session: Session, claimed: list[RelayTest], state: Battery
) -> list[RelayTest]:
    """Run the claimed tests on one connection; the ones left unfinished are returned.

    Each test is MAIL, then RCPT, and RSET before the next test when MAIL opened a transaction.
    In lock-step every command waits for its reply, and RCPT goes only after an accepted MAIL.
    Pipelined (RFC 2920, where the server offers it), the host's first test goes as one group,
    and once a group's MAIL was accepted, every test left on the connection goes as one group
    (RSET between tests). A refused MAIL ends whole groups for the rest of the host's battery:
    from then on the MAIL FROMs go in groups of their own (`_senders`: MAIL, RSET, ...), and a
    test whose MAIL was accepted runs again in lock-step; any confusion turns the rest to
    lock-step. No test starts that could make the connection's error replies more than the
    battery's error budget: the tests left are returned for a fresh connection.
    """
    transaction = False  # a MAIL was accepted: RSET before the next test
    i = 0
    while i < len(claimed):
        if not session.connected:
            return claimed[i:]  # closed after the last reply (421 to RSET): not this test's try
        # a test makes one error, as a rule
        budget = state.error_budget
        room = budget - session.refusals if budget is not None else len(claimed) - i
        if room <= 0:
            return claimed[i:]
        if session.pipelining:
            # one test first: a server that refuses MAIL meets one blind RCPT, not a group
            wanted = len(claimed) - i if session.pipelined else 1
            end = i + min(wanted, room)
            # QUIT ends the group that holds the connection's last tests, or the last the
            # error budget allows it
            last = end == len(claimed) or wanted > room
            group = claimed[i:end]
            left, transaction = await _group(session, group, state, rset=transaction, goodbye=last)
            if left is not None:
                return left + claimed[end:]
            if last:
                return claimed[end:]
            i = end
            continue
        if session.sender_groups and claimed[i].id not in state.mail_first:
            # the server refused a MAIL FROM: the MAIL FROMs of the tests from here go as
            # one group, each followed by RSET; a refused one is its test's answer, as in
            # lock-step, an accepted one's test runs again in lock-step, with its RCPT
            end = i
            while end < len(claimed) and end - i < room and claimed[end].id not in state.mail_first:
                end += 1
            group = claimed[i:end]
            left = await _senders(session, group, state, rset=transaction)
            if left is not None:
                return left + claimed[end:]
            claimed = [t for t in group if t.id in state.mail_first] + claimed[end:]
            i, transaction = 0, False
            continue
        test = claimed[i]
        if transaction:
            try:
                await session.command("RSET")
            except Broken as exc:
                state.ended(exc)
                return claimed[i:]
            if not session.connected:
                return claimed[i:]
        state.attempts[test.id] = attempts = state.attempts.get(test.id, 0) + 1
        try:
            result = await run_test(session, test, state.transport)
        except Broken as exc:
            state.ended(exc)
            if exc.fatal or attempts >= 2:
                state.error(test, exc.reason)
                return claimed[i + 1 :]
            return claimed[i:]
        settled = _settle(test, result, attempts, session, state)
        if settled is not None:
            return claimed[i + settled :]
        # RSET ends the transaction MAIL opened; after a refused MAIL none is open
        transaction = result.rcpt is not None
        i += 1
    return []


def _settle(
    test: RelayTest, result: TestResult, attempts: int, session: Session | None, state: Battery
) -> int | None:
    """Keep a test's result, unless a 421 makes it a question for a fresh connection.

    None: go on with the next test; else the session ends, and the tests from this one's
    position plus the returned offset (0: this one again, 1: the next) are left unfinished.
    `session`: ends also when it is closed (lock-step; a group's answers are all in already).
    """
    closing = _CLOSING in (result.mail and result.mail.code, result.rcpt and result.rcpt.code)
    if closing and attempts < 2:
        # 421 closes the session ("too many errors", connection limits); it is no
        # answer about relaying: ask again on a fresh connection
        return 0
    state.results.append(result)
    if closing or (session is not None and not session.connected):
        return 1
    return None


async def run_test(session: Session, test: RelayTest, transport: Transport) -> TestResult:
    """One test: MAIL FROM, and RCPT TO only if the sender was accepted."""
    mail = await session.command(f"MAIL FROM:<{test.mail_from}>")
    mail_class = classify_reply(mail)
    if mail_class is not ReplyClass.OK:
        return _sender_refused(test, transport, mail, mail_class)
    rcpt = await session.command(f"RCPT TO:<{test.rcpt_to}>")
    return _recipient_answered(test, transport, mail, rcpt)


async def _group(
    session: Session, group: list[RelayTest], state: Battery, *, rset: bool, goodbye: bool
) -> tuple[list[RelayTest] | None, bool]:
    """The tests as one pipelined group: [RSET,] MAIL, RCPT, RSET, MAIL, RCPT, ... [QUIT]
    (`goodbye`: the connection's last tests; RFC 2920 lets QUIT end a group).

    Returns the group's unfinished tests (None: all done) and whether the last test left a
    transaction open. Each result is what lock-step would have recorded: a refused MAIL has
    no RCPT (the reply to the RCPT sent regardless is only in the transcript), a failure
    part-way keeps the answers before it, and counts as an attempt only for the test it hit.
    """
    lines = ["RSET"] if rset else []
    for test in group:
        lines += [f"MAIL FROM:<{test.mail_from}>", f"RCPT TO:<{test.rcpt_to}>", "RSET"]
    lines.pop()  # no RSET after the last test: the next group (or QUIT) starts with it
    if goodbye:
        lines.append("QUIT")
    sent = await _send(session, lines, group, state, rset=rset)
    if isinstance(sent, list):
        return sent, False
    answers, broken = sent
    transaction = False
    for k, test in enumerate(group):
        mail = next(answers, None)
        if mail is None:
            # nothing came for this test: the failure hit it, or the server closed before it
            return (_hit(group, k, broken, state) if broken else group[k:]), False
        state.attempts[test.id] = attempts = state.attempts.get(test.id, 0) + 1
        mail_class = classify_reply(mail)
        if mail_class is not ReplyClass.OK:
            # a server that refuses MAIL answers each pipelined RCPT with an error too: from
            # here on, no RCPT without an accepted MAIL (as in lock-step)
            session.stop_pipelining(f"MAIL FROM answered {mail.code}", senders=True)
            result = _sender_refused(test, state.transport, mail, mail_class)
            next(answers, None)  # the blind RCPT's reply
        else:
            rcpt = next(answers, None)
            if rcpt is None:
                state.attempts[test.id] -= 1  # counted again by _hit
                hung_up = broken or Broken("server hung up after MAIL FROM")
                return _hit(group, k, hung_up, state), False
            result = _recipient_answered(test, state.transport, mail, rcpt)
        left = _settle(test, result, attempts, None, state)
        if left is not None:
            return group[k + left :], False
        transaction = result.rcpt is not None
        if k + 1 < len(group):
            between = next(answers, None)  # the RSET before the next test
            if between is None or between.code // 100 != 2:
                if broken is not None:
                    state.ended(broken)
                elif between is not None and between.code != _CLOSING:
                    session.stop_pipelining(f"RSET answered {between.code}")
                return group[k + 1 :], False
    return None, transaction


async def _send(
    session: Session, lines: list[str], group: list[RelayTest], state: Battery, *, rset: bool
) -> list[RelayTest] | tuple[Iterator[Reply], Broken | None]:
    """Send a group's lines; the replies to read (and the failure that cut them short, if one
    did), or the group's unfinished tests when its opening RSET (`rset`) was not answered 2xx:
    the server closed or refused it, and the group goes again on a fresh connection."""
    broken: Broken | None = None
    try:
        replies = await session.pipeline(lines)
    except Broken as exc:
        broken, replies = exc, exc.partial
    answers = iter(replies)
    if rset:
        reply = next(answers, None)
        if reply is None and broken is not None:
            return _hit(group, 0, broken, state)
        if reply is None or reply.code // 100 != 2:
            if reply is not None and reply.code != _CLOSING:
                session.stop_pipelining(f"RSET answered {reply.code}")
            return group
    return answers, broken


async def _senders(
    session: Session, group: list[RelayTest], state: Battery, *, rset: bool
) -> list[RelayTest] | None:
    """The tests' MAIL FROMs as one pipelined group: [RSET,] MAIL, RSET, MAIL, RSET, ...

    For a server that refused a MAIL FROM (AUTH or STARTTLS first, a sender policy): no RCPT
    goes blind. A refused MAIL is that test's result, what lock-step would record; an accepted
    one's transaction is reset at once, and its test is put in `state.mail_first` to run again
    in lock-step. Returns the tests a failure left unfinished (None: all answered), as _group.
    """
    lines = ["RSET"] if rset else []
    for test in group:
        lines += [f"MAIL FROM:<{test.mail_from}>", "RSET"]
    sent = await _send(session, lines, group, state, rset=rset)
    if isinstance(sent, list):
        return sent
    answers, broken = sent
    for k, test in enumerate(group):
        mail = next(answers, None)
        if mail is None:
            return _hit(group, k, broken, state) if broken else group[k:]
        mail_class = classify_reply(mail)
        if mail_class is ReplyClass.OK:
            state.mail_first.add(test.id)  # no attempt yet: the RSET below ends it unanswered
        else:
            state.attempts[test.id] = attempts = state.attempts.get(test.id, 0) + 1
            result = _sender_refused(test, state.transport, mail, mail_class)
            left = _settle(test, result, attempts, None, state)
            if left is not None:
                return group[k + left :]
        reset = next(answers, None)  # the RSET after this MAIL
        if reset is None or reset.code // 100 != 2:
            if broken is not None:
                state.ended(broken)
            elif reset is not None and reset.code != _CLOSING:
                session.stop_pipelining(f"RSET answered {reset.code}")
            # the accepted ones go again (their MAIL was never followed by a RCPT)
            return [t for t in group[: k + 1] if t.id in state.mail_first] + group[k + 1 :]
    return None


def _hit(group: list[RelayTest], k: int, broken: Broken, state: Battery) -> list[RelayTest]:
    """A failure hit the group's test k: an attempt for it (a second one, or a fatal failure,
    ends it as an error); the unfinished tests are returned."""
    test = group[k]
    state.ended(broken)
    state.attempts[test.id] = attempts = state.attempts.get(test.id, 0) + 1
    if broken.fatal or attempts >= 2:
        state.error(test, broken.reason)
        return group[k + 1 :]
    return group[k:]


def _sender_refused(
    test: RelayTest, transport: Transport, mail: Reply, mail_class: ReplyClass
) -> TestResult:
    return built(
        TestResult,
        {
            "test": test,
            "transport": transport,
            "mail": mail,
            "rcpt": None,
            "outcome": _outcome(mail_class, sender=True),
            "error": None,
        },
    )


def _recipient_answered(
    test: RelayTest, transport: Transport, mail: Reply, rcpt: Reply
) -> TestResult:
    rcpt_class = classify_reply(rcpt)
    outcome = (
        TestOutcome.ACCEPTED if rcpt_class is ReplyClass.OK else _outcome(rcpt_class, sender=False)
    )
    return built(
        TestResult,
        {
            "test": test,
            "transport": transport,
            "mail": mail,
            "rcpt": rcpt,
            "outcome": outcome,
            "error": None,
        },
    )


_REFUSAL_OUTCOME = {
    ReplyClass.TEMPFAIL: TestOutcome.TEMPFAIL,
    ReplyClass.DISCONNECT: TestOutcome.TEMPFAIL,
    ReplyClass.AUTH_REQUIRED: TestOutcome.AUTH_REQUIRED,
    ReplyClass.TLS_REQUIRED: TestOutcome.TLS_REQUIRED,
    ReplyClass.INVALID: TestOutcome.ERROR,
    ReplyClass.DOMAIN_UNKNOWN: TestOutcome.DOMAIN_UNKNOWN,
}


def _outcome(kind: ReplyClass, *, sender: bool) -> TestOutcome:
    return _REFUSAL_OUTCOME.get(kind, TestOutcome.SENDER_REFUSED if sender else TestOutcome.REFUSED)
