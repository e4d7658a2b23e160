"""The whole probe (handshake, battery runner, exception map) replayed from recorded real servers, no sockets.

The transcripts were recorded from the real Postfix, Exim and OpenSMTPD of the test suite
(tests/record_transcripts.py); the real-server tests keep running beside these.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiosmtplib
import pytest
from replay import (
    FIXED_TOKEN,
    Mismatch,
    ReplayConnection,
    ReplayDial,
    ReplayTransport,
    load,
    recordings,
)

from relayaudit.battery import BatteryInputs, build_battery
from relayaudit.evidence import PortState, ProbeStatus, TestOutcome
from relayaudit.failures import (
    OUTCOMES,
    Broken,
    FailureKind,
    NoSession,
    Stage,
    kind_of,
    rule_for,
)
from relayaudit.probe import ProbeSettings, probe, settled
from relayaudit.verdict import VerdictStatus, judge
from relayaudit.wire import Wire


async def replay(name: str) -> tuple[dict[str, Any], Any, ReplayDial]:
    data = load(name)
    fields = data["settings"]
    domains = {k: tuple(fields[k]) for k in ("campus_domains", "external_domains")}
    # recordings made before pipelining are lock-step conversations, and those made before
    # issue 27 have no claimed-identity sessions: replayed as such
    settings = ProbeSettings(
        **{"pipelining": False, "claimed_identity": False, **fields, **domains}
    )
    dial = ReplayDial(data["connections"], (data["address"], data["port"]))
    result = await probe(data["address"], data["port"], settings, dial=dial)
    return data, result, dial


@pytest.mark.parametrize("name", recordings())
@pytest.mark.usefixtures("no_sockets")
async def test_a_recorded_server_replays_to_the_same_verdict(name: str) -> None:
    data, result, dial = await replay(name)
    expected = data["expected"]
    assert result.status.value == expected["status"], result.error
    assert judge(result).status.value == expected["verdict"]
    assert [[t.test.id, t.transport.value, t.outcome.value] for t in result.tests] == expected[
        "tests"
    ]
    assert result.sessions == expected["sessions"]
    assert dial.unused == 0  # every recorded connection was used, in order


def test_the_recordings_cover_the_three_real_servers() -> None:
    names = recordings()
    for server in ("postfix", "exim", "opensmtpd"):
        assert any(n.startswith(server) for n in names), names
    verdicts = {load(n)["expected"]["verdict"] for n in names}
    assert VerdictStatus.RELAY_REFUSED.value in verdicts
    assert VerdictStatus.OPEN_RELAY.value in verdicts


def _server(*chunks: bytes, then: list[tuple[str, bytes]] | None = None) -> ReplayDial:
    events = [("s", c) for c in chunks] + (then or [])
    return ReplayDial([events], ("127.0.0.1", 25))


# the scripts below are lock-step conversations; the pipelined ones set pipelining=True
# the scripted servers below are about one session's framing: no claimed-identity sessions
SETTINGS = ProbeSettings(
    helo_name="relayaudit.campus.test",
    session_timeout=5,
    command_timeout=1,
    pipelining=False,
    claimed_identity=False,
)
ONE_TEST = ProbeSettings(
    helo_name="relayaudit.campus.test",
    session_timeout=5,
    command_timeout=1,
    external_domains=("outside.test",),
    retest_after_starttls=False,
    claimed_identity=False,
)
EHLO_PIPELINING = [
    ("c", b"EHLO relayaudit.campus.test\r\n"),
    ("s", b"250-mx.campus.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
]


def _group(*lines: str) -> tuple[str, bytes]:
    """What a pipelined client writes at once: the lines, CRLF each, in one write."""
    return ("c", b"".join(line.encode() + b"\r\n" for line in lines))


@pytest.mark.usefixtures("no_sockets")
async def test_a_greeting_split_mid_line_and_a_multiline_ehlo_frame_correctly() -> None:
    dial = _server(
        b"220 mx.ca",
        b"mpus.test ESMTP Postfix\r\n",
        then=[
            ("c", b"EHLO relayaudit.campus.test\r\n"),
            ("s", b"250-mx.campus.test\r\n250-PIPE"),
            ("s", b"LINING\r\n250 SIZE 1000\r\n"),
            ("c", b"MAIL FROM:<relayaudit@relayaudit-test.example>\r\n"),
            ("s", b"421 4.7.0 go away\r\n"),
        ],
    )
    result = await probe("127.0.0.1", 25, SETTINGS, dial=dial)
    assert result.facts is not None
    assert result.facts.banner.text == "mx.campus.test ESMTP Postfix"
    assert result.facts.capabilities == ("pipelining", "size")
    assert result.facts.size == 1000 and result.facts.software == "Postfix"
    # 421 closes the session; the recording has no second connection, so the rest is not run
    assert result.tests[0].outcome is TestOutcome.ERROR


@pytest.mark.usefixtures("no_sockets")
async def test_a_garbage_greeting_is_not_smtp_and_a_5xx_greeting_refuses_the_session() -> None:
    result = await probe("127.0.0.1", 25, SETTINGS, dial=_server(b"\x16\x03\x01 junk\r\n"))
    assert result.status is ProbeStatus.NOT_SMTP
    result = await probe("127.0.0.1", 25, SETTINGS, dial=_server(b"554 5.7.1 no service\r\n"))
    assert result.status is ProbeStatus.SESSION_REFUSED
    assert result.error == "greeting 554 5.7.1 no service"


@pytest.mark.usefixtures("no_sockets")
async def test_a_server_that_closes_after_the_greeting_ends_the_session() -> None:
    result = await probe("127.0.0.1", 25, SETTINGS, dial=_server(b"220 mx.campus.test\r\n"))
    assert result.status is ProbeStatus.SMTP
    assert result.error == "server hung up before EHLO"


async def test_the_replay_fails_loudly_when_the_client_strays() -> None:
    transport = ReplayTransport(
        [("s", b"220 hi\r\n"), ("c", b"EHLO a\r\n")], local="127.0.0.1", peer=("127.0.0.1", 25)
    )
    wire = Wire.over(transport)
    transport.serve()
    assert (await wire.greeting()).code == 220
    with pytest.raises(Mismatch):
        transport.write(b"HELO b\r\n")
    assert isinstance(ReplayConnection([], ("127.0.0.1", 25)).local_address(), str)


def test_every_stage_and_kind_has_one_outcome_rule() -> None:
    for stage in Stage:
        for kind in FailureKind:
            assert rule_for(stage, kind).reason
    for (stage, _), rule in OUTCOMES.items():
        # only the stages before a session exists end without one
        assert (rule.status is not None) == (
            stage in (Stage.TLS_HANDSHAKE, Stage.GREETING, Stage.HELLO, Stage.SILENCE)
        )


def test_the_exception_map_knows_network_failures_and_nothing_else() -> None:
    assert kind_of(TimeoutError()) is FailureKind.TIMEOUT
    assert kind_of(aiosmtplib.SMTPServerDisconnected("x")) is FailureKind.DISCONNECTED
    assert kind_of(aiosmtplib.SMTPResponseException(554, "no")) is FailureKind.REFUSED
    assert kind_of(aiosmtplib.SMTPResponseException(-1, "garbage")) is FailureKind.MALFORMED
    assert kind_of(ConnectionResetError()) is FailureKind.TRANSPORT
    assert kind_of(KeyError("bug")) is None
    assert kind_of(asyncio.CancelledError()) is None
    assert issubclass(NoSession, Exception) and issubclass(Broken, Exception)


async def test_a_bug_in_the_probe_is_an_internal_error_not_a_crash() -> None:
    async def broken_dial() -> ReplayConnection:
        raise KeyError("a bug of ours")

    result = await probe("127.0.0.1", 25, SETTINGS, dial=broken_dial)
    assert result.status is ProbeStatus.INTERNAL_ERROR
    assert result.error == "internal error: KeyError: 'a bug of ours'"
    assert judge(result).status is VerdictStatus.INTERNAL_ERROR


def test_every_status_without_a_session_reaches_the_verdict_of_the_same_name() -> None:
    # one outcome contract: closed, filtered, silent and broken ports take the same path as SMTP
    for status in ProbeStatus:
        if status is ProbeStatus.SMTP:
            continue
        result = settled("127.0.0.1", 25, NoSession(status, "why", PortState.OPEN), vantage="x")
        verdict = judge(result)
        assert verdict.status.value == status.value
        assert verdict.summary == "why"


def _battery_lines() -> list[tuple[str, str]]:
    """(MAIL, RCPT) of each test of ONE_TEST's battery against mx.campus.test, in order."""
    inputs = BatteryInputs(
        address="127.0.0.1",
        hostname="mx.campus.test",
        campus_domains=ONE_TEST.campus_domains,
        external_domains=ONE_TEST.external_domains,
        external_local_part=ONE_TEST.external_local_part,
        sender_local_part=ONE_TEST.sender_local_part,
    )
    # the control recipient's random token, as the replay transport rewrites what it is sent
    fixed = FIXED_TOKEN.decode()
    return [
        (f"MAIL FROM:<{t.mail_from}>", f"RCPT TO:<{t.rcpt_to}>")
        for t in build_battery(inputs, control_token=fixed.removeprefix("nx-"))
    ]


GREETING = ("s", b"220 mx.campus.test ESMTP\r\n")
GOODBYE = [("c", b"QUIT\r\n"), ("s", b"221 2.0.0 Bye\r\n")]
OK, DENIED = b"250 2.1.0 Ok\r\n", b"554 5.7.1 Relay access denied\r\n"


def _lockstep(tests: list[tuple[str, str]], *, first_rset: bool = False) -> list[tuple[str, bytes]]:
    """A closed server's answers to these tests in lock-step: MAIL, RCPT, RSET between tests."""
    events: list[tuple[str, bytes]] = []
    for i, (mail, rcpt) in enumerate(tests):
        if i or first_rset:
            events += [("c", b"RSET\r\n"), ("s", b"250 2.0.0 Ok\r\n")]
        events += [("c", mail.encode() + b"\r\n"), ("s", OK)]
        events += [("c", rcpt.encode() + b"\r\n"), ("s", DENIED)]
    return events


def _pipelined(tests: list[tuple[str, str]], answers: list[bytes]) -> list[tuple[str, bytes]]:
    """A pipelining client's writes to a server giving each test these `answers` (MAIL's and
    RCPT's replies): the first test alone, then every other test and QUIT in one write."""
    (mail, rcpt), rest = tests[0], tests[1:]
    lines = [line for pair in rest for line in ("RSET", *pair)]
    return [
        _group(mail, rcpt),
        ("s", answers[0]),
        _group(*lines, "QUIT"),
        ("s", b"".join(b"250 2.0.0 Ok\r\n" + answer for answer in answers[1:]) + b"221 Bye\r\n"),
    ]


@pytest.mark.usefixtures("no_sockets")
async def test_a_pipelined_battery_sends_the_rest_in_one_write_to_the_same_verdict() -> None:
    tests = _battery_lines()
    events = [GREETING, *EHLO_PIPELINING, *_pipelined(tests, [OK + DENIED] * len(tests))]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([events], ("127.0.0.1", 25))
    result = await probe("127.0.0.1", 25, settings, dial=dial)
    assert result.pipelined and result.lockstep is None, result.transcript
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * len(tests)
    # three writes (the EHLO, the first test, the rest with QUIT), where lock-step makes one
    # per command
    transport = dial.opened[0].transport
    assert transport is not None and len(transport.sent) == 3
    assert result.transcript[-1].command == "QUIT" and result.transcript[-1].reply is not None
    # the same server in lock-step: the same results
    lockstep = ReplayDial(
        [[GREETING, *EHLO_PIPELINING, *_lockstep(tests), *GOODBYE]], ("127.0.0.1", 25)
    )
    plain = await probe("127.0.0.1", 25, replace(settings, pipelining=False), dial=lockstep)
    assert not plain.pipelined
    assert [(t.test.id, t.outcome, t.mail, t.rcpt) for t in plain.tests] == [
        (t.test.id, t.outcome, t.mail, t.rcpt) for t in result.tests
    ]


@pytest.mark.usefixtures("no_sockets")
async def test_a_group_cut_short_keeps_the_answers_before_the_hang_up() -> None:
    tests = _battery_lines()
    first = [GREETING, *EHLO_PIPELINING, *_pipelined(tests, [OK + DENIED] * len(tests))]
    # the server answers three tests of the big group, then hangs up
    first[-1] = ("s", (b"250 2.0.0 Ok\r\n" + OK + DENIED) * 3)
    # a fresh connection: pipelining is proven on this host, so the rest goes as one group
    rest = tests[4:]
    lines = [line for i, pair in enumerate(rest) for line in (["RSET"] if i else []) + [*pair]]
    answers = b"250 2.0.0 Ok\r\n".join(OK + DENIED for _ in rest)
    second = [GREETING, *EHLO_PIPELINING, _group(*lines, "QUIT"), ("s", answers + b"221 Bye\r\n")]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([first, second], ("127.0.0.1", 25))
    result = await probe("127.0.0.1", 25, settings, dial=dial)
    # the four tests answered before the hang-up are not asked again
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * len(tests), result.tests
    assert result.sessions == 2 and result.lockstep is None
    assert judge(result).status is VerdictStatus.RELAY_REFUSED


@pytest.mark.usefixtures("no_sockets")
async def test_a_reply_too_many_inside_a_group_is_confusion_not_a_shifted_answer() -> None:
    tests = _battery_lines()
    first = [GREETING, *EHLO_PIPELINING, *_pipelined(tests, [OK + DENIED] * len(tests))]
    # an extra "250" after the second test's MAIL reply: read in order, that test's RCPT
    # would be "accepted", a relay; the reply left over at the end shows the group out of step
    first[-1] = (
        "s",
        b"250 2.0.0 Ok\r\n"
        + OK
        + b"250 2.1.5 Ok\r\n"
        + DENIED
        + b"".join(b"250 2.0.0 Ok\r\n" + OK + DENIED for _ in tests[2:])
        + b"221 Bye\r\n",
    )
    second = [GREETING, *EHLO_PIPELINING, *_lockstep(tests[1:]), *GOODBYE]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([first, second], ("127.0.0.1", 25))
    result = await probe("127.0.0.1", 25, settings, dial=dial)
    assert result.lockstep is not None and result.lockstep.startswith("confused: ")
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * len(tests)
    assert judge(result).status is VerdictStatus.RELAY_REFUSED


@pytest.mark.usefixtures("no_sockets")
async def test_a_reply_too_many_turns_the_rest_of_the_battery_to_lock_step() -> None:
    tests = _battery_lines()
    (mail, rcpt), rest = tests[0], tests[1:]
    first = [
        GREETING,
        *EHLO_PIPELINING,
        _group(mail, rcpt),
        ("s", OK + DENIED + b"250 2.0.0 one reply too many\r\n"),
        _group("RSET", *rest[0]),  # what would come next: the recorded server waits for it
    ]
    # the next group is never sent, and the answers of the confused one are not kept: a fresh
    # connection runs the whole battery in lock-step
    second = [GREETING, *EHLO_PIPELINING, *_lockstep(tests), *GOODBYE]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([first, second], ("127.0.0.1", 25))
    result = await probe("127.0.0.1", 25, settings, dial=dial)
    assert result.lockstep is not None and result.lockstep.startswith("confused: "), result.lockstep
    assert result.sessions == 2
    assert judge(result).status is VerdictStatus.RELAY_REFUSED
    assert [t.outcome for t in result.tests] == [TestOutcome.REFUSED] * len(tests)
    assert any(
        e.error and e.error.startswith("pipelining stopped (confused") for e in result.transcript
    )


@pytest.mark.usefixtures("no_sockets")
async def test_a_refused_mail_sends_no_more_rcpt_only_groups_of_mail_from() -> None:
    """After a refused MAIL FROM no RCPT goes blind: the other tests' MAIL FROMs go in one
    group, each followed by RSET, and each refusal is its test's answer."""
    tests = _battery_lines()
    refused = b"530 5.7.0 Authentication required\r\n"
    rest = tests[1:]
    events = [
        GREETING,
        *EHLO_PIPELINING,
        _group(*tests[0]),
        ("s", refused + b"503 5.5.1 Error: need MAIL command\r\n"),
        _group(*(line for mail, _ in rest for line in (mail, "RSET"))),
        ("s", (refused + b"250 2.0.0 Ok\r\n") * len(rest)),
    ]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([[*events, *GOODBYE]], ("127.0.0.1", 25))
    result = await probe("127.0.0.1", 25, settings, dial=dial)
    assert result.lockstep == "MAIL FROM answered 530"
    assert all(t.rcpt is None and t.mail.code == 530 for t in result.tests)  # type: ignore[union-attr]
    assert len(result.tests) == len(tests)
    assert judge(result).status is VerdictStatus.AUTH_REQUIRED


@pytest.mark.usefixtures("no_sockets")
async def test_a_mail_accepted_in_a_group_of_senders_runs_again_with_its_rcpt() -> None:
    """A sender policy that refuses most senders but accepts one: the accepted MAIL FROM is
    reset unanswered, then its test runs in lock-step (MAIL, RCPT), recorded as lock-step
    would, and the MAIL FROMs after it go on in a group."""
    tests = _battery_lines()[:4]
    refused = b"553 5.7.1 Sender address rejected\r\n"
    reset = b"250 2.0.0 Ok\r\n"
    (m0, r0), (m1, r1), (m2, _), (m3, _) = tests
    events = [
        GREETING,
        *EHLO_PIPELINING,
        _group(m0, r0),
        ("s", refused + b"503 5.5.1 Error: need MAIL command\r\n"),
        _group(m1, "RSET", m2, "RSET", m3, "RSET"),
        ("s", OK + reset + refused + reset + refused + reset),
        ("c", m1.encode() + b"\r\n"),
        ("s", OK),
        ("c", r1.encode() + b"\r\n"),
        ("s", DENIED),
    ]
    settings = replace(ONE_TEST, max_tests_per_session=len(tests))
    dial = ReplayDial([[*events, *GOODBYE]], ("127.0.0.1", 25))
    battery = await probe("127.0.0.1", 25, settings, dial=dial)
    ran = battery.tests[: len(tests)]
    assert [t.test.mail_from for t in ran] == [m[len("MAIL FROM:<") : -1] for m, _ in tests]
    assert [t.mail.code for t in ran] == [553, 250, 553, 553]  # type: ignore[union-attr]
    assert ran[1].rcpt is not None and ran[1].rcpt.code == 554  # what lock-step records


# -- a greeting wait that ends with nothing (issue 32): QUIT, and what comes back says why.
# Each server below says nothing until the client speaks; "(silence)" is a client line the
# probe never sends, so the recorded connection stays open without a word.
SILENT = replace(SETTINGS, command_timeout=0.3)  # the greeting wait and the answer wait
QUIT = ("c", b"QUIT\r\n")
STAYS_OPEN = ("c", b"(silence)")
# answers to "QUIT\r\n": an HTTP/1.x server's status line (the form nginx and Apache send);
# Python's http.server, recorded on loopback, which takes "QUIT" for an HTTP/0.9 request and
# sends the error page without a status line; a TLS stack that answers a first record that is
# no TLS with a fatal protocol_version alert (OpenSSL 3 sends none: it hangs up, see
# tests/test_silent_services.py)
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\n"
HTTP_09_PAGE = b'<!DOCTYPE HTML>\n<html lang="en">\n    <head>\n        <meta charset="utf-8">\n'
TLS_ALERT = b"\x15\x03\x01\x00\x02\x02\x46"
# real Exim 4.96 after its 12 s connect-ACL delay, recorded: the first 64 bytes of its greeting
EXIM_LATE = b"220 mx-greet-delay.campus.test ESMTP Exim 4.96 Mon, 07 Dec 2026 "


async def _silent(*answer: tuple[str, bytes]) -> Any:
    dial = ReplayDial([[QUIT, *answer]], ("127.0.0.1", 25))
    return await probe("127.0.0.1", 25, SILENT, dial=dial)


@pytest.mark.usefixtures("no_sockets")
async def test_a_silent_service_that_answers_quit_in_http_is_not_smtp() -> None:
    result = await _silent(("s", HTTP_400))
    assert result.status is ProbeStatus.NOT_SMTP, result.error
    assert result.error.startswith(
        "not SMTP: no greeting within 0.3s, then an HTTP response in answer to QUIT: "
        '"HTTP/1.1 400 Bad Request\\x0d\nServer: nginx'
    ), result.error  # the bytes as other server text is kept: \r escaped, \n for reports
    assert judge(result).status is VerdictStatus.NOT_SMTP
    assert [ex.command for ex in result.transcript] == [None, "QUIT"]
    page = await _silent(("s", HTTP_09_PAGE))
    assert page.status is ProbeStatus.NOT_SMTP
    assert 'bytes that are no SMTP reply in answer to QUIT: "<!DOCTYPE HTML>' in page.error


@pytest.mark.usefixtures("no_sockets")
async def test_a_silent_service_that_answers_quit_with_a_tls_record_is_not_smtp() -> None:
    result = await _silent(("s", TLS_ALERT))
    assert result.status is ProbeStatus.NOT_SMTP, result.error
    assert result.error == (
        "not SMTP: no greeting within 0.3s, then a TLS alert record in answer to QUIT: "
        '"\\x15\\x03\\x01\\x00\\x02\\x02F"'
    )
    handshake = await _silent(("s", b"\x16\x03\x03\x00\x30" + b"\x00" * 8))
    assert handshake.status is ProbeStatus.NOT_SMTP
    assert "a TLS handshake record in answer to QUIT" in handshake.error


@pytest.mark.usefixtures("no_sockets")
async def test_other_bytes_in_answer_to_quit_are_not_smtp_escaped() -> None:
    result = await _silent(("s", b"\xff\xfe\x1b[2Jhello\n"))
    assert result.status is ProbeStatus.NOT_SMTP
    assert result.error.endswith(
        'bytes that are no SMTP reply in answer to QUIT: "\\xff\\xfe\\x1b[2Jhello\n"'
    ), result.error


@pytest.mark.usefixtures("no_sockets")
async def test_an_smtp_reply_to_quit_is_a_server_that_greets_late() -> None:
    for answer in (EXIM_LATE, b"554 5.5.0 you spoke before my greeting\r\n"):
        result = await _silent(("s", answer))
        assert result.status is ProbeStatus.NO_BANNER, result.error
        assert result.error.endswith(": greets late; raise timeouts.greeting"), result.error
        first = answer.split(b"\r\n")[0].decode().strip()
        assert f'an SMTP reply in answer to QUIT: "{first}"' in result.error
        assert judge(result).status is VerdictStatus.NO_BANNER


@pytest.mark.usefixtures("no_sockets")
async def test_silence_after_quit_is_no_banner_and_a_hang_up_too() -> None:
    silent = await _silent(STAYS_OPEN)
    assert silent.status is ProbeStatus.NO_BANNER
    assert silent.error == "no greeting within 0.3s; no answer to QUIT either"
    # a hang-up: a second connection tries a TLS handshake; this recorded server takes none
    hung_up = await _silent()
    assert hung_up.status is ProbeStatus.NO_BANNER
    assert hung_up.error == "no greeting within 0.3s; hung up after QUIT without a word"


@pytest.mark.usefixtures("no_sockets")
async def test_the_answer_to_quit_is_read_for_at_most_64_bytes() -> None:
    result = await _silent(("s", b"x" * 200))
    assert result.status is ProbeStatus.NOT_SMTP
    assert '"' + "x" * 64 + '"' in result.error and "x" * 65 not in result.error
