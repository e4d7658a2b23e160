"""relayaudit.text: server text made visible; clipping and wrapping never cut a word; every time
names its zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayaudit.html_report import _a, _line, _t
from relayaudit.text import clip, utc_time, visible, wrap

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


# -- visible: server text cannot forge or reorder a line ---------------------------------------------

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_visible_keeps_printable_text_as_it_is() -> None:
    for text in ("", "220 mx.campus.test ESMTP Postfix", "Grüße, 中文, café", r"C:\path \x1b"):
        assert visible(text) == text


def test_visible_names_newline_return_and_tab() -> None:
    assert visible("220 x\r\n127.0.0.1:25  RELAY-REFUSED\tok") == (
        "220 x\\r\\n127.0.0.1:25  RELAY-REFUSED\\tok"
    )


def test_visible_shows_terminal_escapes_as_evidence_writes_them() -> None:
    assert visible("\x1b[2J\x1b]0;owned\x07\x00\x7f\x85\x9b") == (
        "\\x1b[2J\\x1b]0;owned\\x07\\x00\\x7f\\x85\\x9b"
    )


def test_visible_shows_bidi_invisible_and_separator_characters() -> None:
    assert visible("abc\u202edef") == "abc\\u202edef"
    assert visible(BIDI) == "".join(f"\\u{ord(c):04x}" for c in BIDI)
    assert visible("a\u200bb\u2060c\ufeffd\u2028e\u2029f") == (
        "a\\u200bb\\u2060c\\ufeffd\\u2028e\\u2029f"
    )


def test_visible_shows_lone_surrogates_so_output_can_be_encoded() -> None:
    shown = visible("mx \udcff")
    assert shown == "mx \\udcff"
    shown.encode("utf-8")


def test_visible_is_idempotent() -> None:
    once = visible("a\n\x1b\u202e\\x")
    assert visible(once) == once


def test_visible_shows_other_invisible_characters_as_repr_does() -> None:
    assert visible("a\xa0b\u00adc\U000e0041d\ue000") == "a\\xa0b\\xadc\\U000e0041d\\ue000"


@given(text=st.text(max_size=80))
def test_visible_output_is_one_printable_line(text: str) -> None:
    shown = visible(text)
    assert shown.isprintable()  # no control, format, separator, surrogate or private character
    assert len(shown.splitlines()) <= 1
    shown.encode("utf-8")
    # printable characters kept, each other one escaped as repr() writes it
    assert shown == "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def test_the_html_report_neutralises_what_visible_does() -> None:
    # html_report escapes on its own (newline kept for <pre>, shown as a mark in one-line cells)
    for char in BIDI + "\x1b\x00\x7f\x85\u200b\ufeff":
        assert char not in _t(char) and char not in _line(char) and char not in _a(char)
