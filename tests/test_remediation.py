"""The software guess and the remediation data on their own (issue 30): signs weighed from text a
server sent, the data files' rules, docs/remediation.md generated from them, and what people read.
The same against real Postfix, Exim and OpenSMTPD is in tests/test_remediation_verified.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from relayaudit.remediation import (
    FILES,
    RelayWay,
    RemediationRef,
    advice,
    advice_text,
    entries,
    markdown,
    reference,
)
from relayaudit.software import (
    GuessConfidence,
    SignSource,
    Software,
    ehlo_signs,
    greeting_signs,
    guess,
    refusal_signs,
)

ROOT = Path(__file__).resolve().parent.parent

POSTFIX_EHLO = "mx.campus.test\nPIPELINING\nSIZE 10240000\nVRFY\nETRN\nENHANCEDSTATUSCODES\n8BITMIME\nDSN"
POSTFIX_KEYWORDS = ("pipelining", "size", "vrfy", "etrn", "enhancedstatuscodes", "8bitmime", "dsn")
EXCHANGE_EHLO = "mail.campus.test Hello [192.0.2.9]\nSIZE 37748736\nPIPELINING\nX-EXPS GSSAPI NTLM\nXEXCH50"
EXCHANGE_KEYWORDS = ("size", "pipelining", "x-exps", "xexch50")


def test_docs_remediation_md_is_generated_from_the_data() -> None:
    committed = (ROOT / "docs" / "remediation.md").read_text(encoding="utf-8")
    assert committed == markdown(), "run: python -m relayaudit.remediation docs/remediation.md"


def test_the_module_writes_the_page(tmp_path: Path) -> None:
    out = tmp_path / "remediation.md"
    subprocess.run(
        [sys.executable, "-m", "relayaudit.remediation", str(out)], check=True, timeout=60
    )
    assert out.read_text(encoding="utf-8") == markdown()


def test_every_file_every_way_and_vendor_urls() -> None:
    table = entries()
    assert {e.software for e in table.values()} == set(FILES)
    for software in ("generic", "postfix", "exim", "opensmtpd"):  # a text for every way
        assert {e.way for e in table.values() if e.software == software} == {w.value for w in RelayWay}
    for software in ("sendmail", "microsoft"):  # one text and a link
        assert [e.way for e in table.values() if e.software == software] == ["any"]
    vendors = {
        "postfix": {"www.postfix.org"},
        "exim": {"www.exim.org"},
        "opensmtpd": {"man.openbsd.org", "www.opensmtpd.org"},
        "sendmail": {"www.sendmail.org", "www.proofpoint.com"},
        "microsoft": {"learn.microsoft.com"},
        "generic": {"www.rfc-editor.org", "www.postfix.org"},
    }
    for e in table.values():
        url = urlsplit(e.doc_url)
        assert url.scheme == "https" and url.hostname in vendors[e.software], e.id
        assert 100 < len(e.text) < 1000, e.id  # short, and a whole paragraph
        assert not e.verified or e.software in ("postfix", "exim", "opensmtpd"), e.id


def test_postfix_text_is_exact_about_the_percent_hack() -> None:
    text = entries()["postfix/odd-form"].text
    assert "reject_unauth_destination refuses sender-specified routing" in text
    assert "allow_percent_hack = no is not the fix" in text


# -- the guess ------------------------------------------------------------------------------------


def test_the_greeting_counts_its_product_token_not_its_host_name() -> None:
    assert greeting_signs("exchange.campus.example ESMTP Postfix (Debian/GNU)")[0].software is Software.POSTFIX
    assert greeting_signs("postfix.campus.example ESMTP") == []
    assert greeting_signs("exim.campus.example Microsoft ESMTP MAIL Service ready at Mon")[
        0
    ].software is Software.MICROSOFT


def test_two_sources_that_agree_are_high_and_one_is_low() -> None:
    one = guess(greeting_signs("mx ESMTP Postfix"))
    assert (one.name, one.confidence) == ("Postfix", GuessConfidence.LOW)
    two = guess(greeting_signs("mx ESMTP Postfix") + ehlo_signs(POSTFIX_EHLO, POSTFIX_KEYWORDS))
    assert (two.name, two.confidence) == ("Postfix", GuessConfidence.HIGH)
    hidden = guess(
        greeting_signs("mx ESMTP")
        + ehlo_signs(POSTFIX_EHLO, POSTFIX_KEYWORDS)
        + refusal_signs(["5.7.1 <u@d>: Relay access denied"])
    )
    assert (hidden.name, hidden.confidence) == ("Postfix", GuessConfidence.HIGH)
    assert {s.source for s in hidden.signs} == {SignSource.EHLO, SignSource.REFUSAL}
    assert guess([]).confidence is GuessConfidence.UNKNOWN and guess([]).name is None


def test_a_banner_naming_another_product_lowers_the_guess() -> None:
    faked = guess(
        greeting_signs("mx.campus.test Microsoft ESMTP MAIL Service ready")
        + ehlo_signs(POSTFIX_EHLO, POSTFIX_KEYWORDS)
        + refusal_signs(["5.7.1 <u@d>: Relay access denied"])
    )
    assert (faked.name, faked.confidence) == ("Postfix", GuessConfidence.LOW)
    # one against one: the refusal's wording wins over the banner, at low confidence
    tie = guess(greeting_signs("mx ESMTP Exim 4.96") + refusal_signs(["Relay access denied"]))
    assert (tie.name, tie.confidence) == ("Postfix", GuessConfidence.LOW)


def test_exchange_is_named_only_on_a_sign_only_exchange_gives() -> None:
    iis = guess(greeting_signs("mx Microsoft ESMTP MAIL Service, Version: 7.5.7601.17514 ready"))
    assert iis.name == "Microsoft Exchange or IIS SMTP" and iis.confidence is GuessConfidence.LOW
    exchange = guess(
        greeting_signs("mx Microsoft ESMTP MAIL Service ready at Mon, 7 Dec 2026")
        + ehlo_signs(EXCHANGE_EHLO, EXCHANGE_KEYWORDS)
    )
    assert (exchange.name, exchange.confidence) == ("Microsoft Exchange", GuessConfidence.HIGH)
    both = guess(refusal_signs(["5.7.54 SMTP; Unable to relay recipient in non-accepted domain"]))
    assert both.name == "Microsoft Exchange"


def test_sendmail_and_opensmtpd_share_a_greeting_line_but_not_keywords() -> None:
    pleased = "mx.campus.test Hello c.example [192.0.2.1], pleased to meet you"
    sendmail = ehlo_signs(pleased + "\nENHANCEDSTATUSCODES\nETRN\nDELIVERBY\nHELP", ("etrn", "help"))
    assert sendmail[0].software is Software.SENDMAIL
    smtpd = ehlo_signs(pleased + "\n8BITMIME\nDSN\nHELP", ("8bitmime", "dsn", "help"))
    assert smtpd[0].software is Software.OPENSMTPD
    assert refusal_signs(["5.7.1 <u@d>... Relaying denied"])[0].software is Software.SENDMAIL


# -- the reference and the text -------------------------------------------------------------------


@pytest.mark.parametrize("way", list(RelayWay))
def test_a_reference_per_confidence(way: RelayWay) -> None:
    signs = greeting_signs("mx ESMTP Postfix") + ehlo_signs(POSTFIX_EHLO, POSTFIX_KEYWORDS)
    high = reference(guess(signs), way)
    assert high.id == f"postfix/{way.value}" and high.guess_confidence is GuessConfidence.HIGH
    assert advice(high).sections[0][0].startswith("How to fix it in Postfix")
    low = reference(guess(signs[:1]), way)
    assert low.id == high.id and low.guess_confidence is GuessConfidence.LOW
    headings = [h for h, _, _ in advice(low).sections]
    assert headings[0] == "How to fix it, on any mail server"
    assert headings[1].startswith("If it runs Postfix (a guess, low confidence")
    unknown = reference(guess([]), way)
    assert unknown.id == f"generic/{way.value}" and unknown.software is None
    assert len(advice(unknown).sections) == 1
    sendmail = reference(guess(greeting_signs("mx ESMTP Sendmail 8.17.1")), way)
    assert sendmail.id == "sendmail/any"
    qmail = reference(guess(greeting_signs("mx ESMTP qmail")), way)
    assert qmail.id == f"generic/{way.value}" and qmail.software == "qmail"
    assert "looks like qmail" in advice_text(qmail)


def test_an_unknown_id_from_another_release_falls_back_to_the_generic_text() -> None:
    ref = RemediationRef(id="postfix/some-new-way", doc_url="https://www.postfix.org/")
    (section,) = advice(ref).sections
    assert section[0].startswith("How to fix it, on any mail server")
