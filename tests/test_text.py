"""relayaudit.text: clipping and wrapping never cut a word; every time names its zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayaudit.text import clip, utc_time, wrap

SUMMARY = (
    "16 of the relay tests accepted, e.g. MAIL FROM:<relayaudit@sender.example> -> 250 "
    "RCPT TO:<relaytest@relay-test.example> -> 250 2.1.5 Ok."
)


def test_clip_keeps_text_that_fits() -> None:
    assert clip("Open relay on 192.0.2.7:25", 26) == "Open relay on 192.0.2.7:25"
    assert clip("Open relay on 192.0.2.7:25", None) == "Open relay on 192.0.2.7:25"


def test_clip_ends_after_a_whole_word() -> None:
    # the old report._clip gave "16 of the relay tests accepted, e.g. MAIL FROM:<relayaudit@se…"
    assert clip(SUMMARY, 60) == "16 of the relay tests accepted, e.g. MAIL…"
    assert clip("Open relay on 192.0.2.7:25", 20) == "Open relay on…"
    assert clip("Open relay on 192.0.2.7:25", 14) == "Open relay on…"
    assert clip("Open relay on 192.0.2.7:25", 13) == "Open relay…"


def test_clip_leaves_no_dangling_comma() -> None:
    assert clip("accepted, e.g. MAIL FROM", 12) == "accepted…"


def test_clip_makes_one_line() -> None:
    assert clip("250-mx.campus.test\n250-PIPELINING\r\n250 8BITMIME", None) == (
        "250-mx.campus.test 250-PIPELINING 250 8BITMIME"
    )


def test_clip_cuts_inside_only_a_first_word_longer_than_the_width() -> None:
    assert clip("<relaytest%relay-test.example@[192.0.2.7]> refused", 12) == "<relaytest%…"
    assert clip("abc", 1) == "…"
    assert clip("abc", 0) == ""


@given(text=st.text(alphabet=st.sampled_from("ab \n"), max_size=60), width=st.integers(1, 40))
def test_clip_never_cuts_a_word_it_could_keep(text: str, width: int) -> None:
    words = text.split()
    got = clip(text, width)
    assert len(got) <= width
    if not got.endswith("…"):
        assert got == " ".join(words)
        return
    kept = got[:-1].split()
    if len(words[0]) + 1 > width:  # no whole word fits: the only case a word is cut
        assert len(kept) <= 1 and words[0].startswith("".join(kept))
        return
    assert kept == words[: len(kept)]  # whole words, from the first on


def test_wrap_breaks_between_words_and_keeps_long_words_whole() -> None:
    lines = wrap(SUMMARY, 40, indent="  ")
    assert lines == [
        "  16 of the relay tests accepted, e.g.",
        "  MAIL FROM:<relayaudit@sender.example>",
        "  -> 250 RCPT",
        "  TO:<relaytest@relay-test.example> ->",
        "  250 2.1.5 Ok.",
    ]
    assert " ".join(line.strip() for line in lines) == SUMMARY
    # at least 20 columns of text a line, and the address stands whole past them
    assert wrap("RCPT TO:<relaytest@relay-test.example>", 10) == [
        "RCPT",
        "TO:<relaytest@relay-test.example>",
    ]


def test_wrap_without_a_width_is_one_line() -> None:
    assert wrap(SUMMARY, None, indent="  ") == ["  " + SUMMARY]
    assert wrap("", 40, indent="  ") == ["  "]


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 6, 23, 41, 7, 512, tzinfo=UTC),
        datetime(2026, 12, 7, 0, 41, 7, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_utc_time_names_its_zone(when: datetime) -> None:
    assert utc_time(when) == "2026-12-06 23:41:07 UTC"
