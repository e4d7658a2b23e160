"""Reply framing on bytes alone: whole one-line replies (the fast path), continuation lines,
replies split across reads at every byte, replies out of turn, and the bounds."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtplib.errors import SMTPResponseException

from relayaudit.framing import MAX_LINE, MAX_REPLY, Framing

PIPELINED = b"250 2.1.0 Ok\r\n554 5.7.1 <a@b.example>: Relay access denied\r\n250 2.0.0 Ok\r\n"
MIXED = b"250-mx.campus.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n221 2.0.0 Bye\r\n"


def framed(chunks: list[bytes], expected: int) -> Framing:
    framing = Framing(asyncio.new_event_loop())
    framing.expected = expected
    for chunk in chunks:
        framing.data_received(chunk)
    framing.loop.close()
    return framing


def replies(framing: Framing) -> list[tuple[int, str]]:
    return [(r.code, r.message) for r in framing.replies]


@pytest.mark.parametrize(
    ("stream", "expected", "want"),
    [
        (b"220 mx ESMTP\r\n", 1, [(220, "mx ESMTP")]),
        (
            PIPELINED,
            3,
            [
                (250, "2.1.0 Ok"),
                (554, "5.7.1 <a@b.example>: Relay access denied"),
                (250, "2.0.0 Ok"),
            ],
        ),
        (MIXED, 2, [(250, "mx.campus.test\nPIPELINING\n8BITMIME"), (221, "2.0.0 Bye")]),
        (b"250\r\n250 \t ok \r\n", 2, [(250, ""), (250, "ok")]),  # no text; blanks stripped
        (b"250 ok\n", 1, [(250, "ok")]),  # a bare newline ends a line too
        (b"250 caf\xc3\xa9 \xff\r\n", 1, [(250, "caf\u00e9 \udcff")]),  # bytes kept
    ],
)
def test_replies_are_the_same_however_the_bytes_arrive(
    stream: bytes, expected: int, want: list[tuple[int, str]]
) -> None:
    assert replies(framed([stream], expected)) == want  # all at once
    for cut in range(1, len(stream)):  # and in two reads, split at every byte
        assert replies(framed([stream[:cut], stream[cut:]], expected)) == want, cut
    one_by_one = framed([stream[i : i + 1] for i in range(len(stream))], expected)
    assert replies(one_by_one) == want and not one_by_one.buffer


def test_replies_out_of_turn_are_counted_not_kept() -> None:
    framing = framed([PIPELINED], 2)
    assert [code for code, _ in replies(framing)] == [250, 554]
    assert framing.unsolicited == 1 and framing.expected == 0
    assert not framing.buffer


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"250 ok\r\nhello\r\n", "Malformed SMTP response line: hello"),
        (b"2x0 ok\r\n", "Malformed SMTP response line"),
        (b"250 " + b"x" * MAX_LINE + b"\r\n", "Response too long"),
        (b"250-" + b"x" * 8000 + b"\r\n", None),  # a long continuation line: still waiting
    ],
)
def test_malformed_and_too_long_replies_fail_the_framing(
    stream: bytes, error: str | None
) -> None:
    framing = framed([stream], 2)
    if error is None:
        assert framing.failure is None and not framing.replies and framing.buffer
        return
    assert isinstance(framing.failure, SMTPResponseException)
    assert error in framing.failure.message


def test_a_reply_longer_than_the_bound_fails_even_in_whole_lines() -> None:
    line = b"250-" + b"x" * (MAX_LINE - 10) + b"\r\n"
    stream = line * (MAX_REPLY // len(line) + 1) + b"250 end\r\n"
    framing = framed([stream], 1)
    assert isinstance(framing.failure, SMTPResponseException)
    assert "Response too long" in framing.failure.message
