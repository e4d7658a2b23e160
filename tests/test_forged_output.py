"""Output a server cannot forge (issue 22, item 3): server text shows its newlines, terminal
escapes and bidi overrides as escapes in every human output, and JSON keeps it exactly."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cli_runner import run_cli, run_main
from factories import make_finding, observe, one_sweep, probe_settings
from hostile import FORGED, HostileServer, forger

from relayaudit.alerts import email_message, render_payload
from relayaudit.config import EmailHook
from relayaudit.probe import probe
from relayaudit.report import FindingBrief, render_table
from relayaudit.state import StateStore
from relayaudit.text import visible
from relayaudit.verdict import FindingKind, judge

pytestmark = pytest.mark.time_limit(60)

RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
# what the forger's greeting is once evidence.writable_text has made its bytes storable
BANNER = f"mx.forger.test ESMTP \\x1b[1A\\x1b[2K\\x0drelay refused {RLO}doog lla\n{FORGED}"
SUBJECT = f"CN=mx{RLO}\n{FORGED}"  # the forger's certificate names, as the probe records them
RCPT = f"2.1.5 Ok {RLO}\\x1b[31m\n{FORGED}"
# a title and summary from a store this version did not write (the title is ours today)
HOSTILE = f"Open relay on 127.0.9.7:25\n{FORGED} \x1b[2J\x1b]0;owned\x07{RLO}dlrow\r\tend"

HEADLINE = re.compile(r"\S+:\d+  [A-Z-]+  \(seen from \S+\)")
CHECK_LINE = re.compile(
    r"\S+:\d+  [A-Z-]+  \(seen from \S+\)"  # the headline
    r"|(findings|relay tests|transcript):"  # a section
    r"|  \S.*"  # a line of the summary or of a section, two spaces in
    r"| {13}\S.*"  # a finding's title and summary
)
SHOW_LINE = re.compile(
    r"ra-[0-9a-f]+  [A-Z]+  [a-z-]+  confidence [a-z]+"  # the finding
    r"|"  # a blank line between parts
    r"|(status changes|evidence \(each test and the server's reply\)|transcript):"
    r"|  \S.*|    \S.*"  # a line of a part
)


def one_line(text: str) -> str:
    """`text` as a table cell shows it: visible, its runs of spaces made one."""
    return " ".join(visible(text).split())


def assert_ours(out: str, *, shape: re.Pattern[str] | None = None) -> list[str]:
    """Every line of `out` is one we print: printable (no ESC, CR, override, ...), of `shape`,
    and none starts with the server's forged line."""
    lines = out.removesuffix("\n").split("\n")
    for line in lines:
        assert line.isprintable(), f"a control or format character reached the output: {line!r}"
        assert not line.lstrip().startswith(FORGED[:12]), f"a forged line: {line!r}"
        if shape is not None:
            assert shape.fullmatch(line), f"not a line of ours: {line!r}"
    return lines


async def test_check_shows_what_a_forging_server_sent_and_json_keeps_it() -> None:
    async with HostileServer(forger) as server:
        code, doc, err = await run_cli("check", "127.0.0.1", "--port", str(server.port), "--json")
        assert (code, err) == (1, "")
        code, out, err = await run_cli("check", "127.0.0.1", "--port", str(server.port))
    assert server.errors == []
    assert (code, err) == (1, "")
    # JSON keeps the text exactly (the encoder escapes what JSON must)
    result = json.loads(doc)["result"]
    assert result["facts"]["banner"]["text"] == BANNER
    assert result["facts"]["tls"]["subject"] == result["facts"]["tls"]["issuer"] == SUBJECT
    assert f"x-{RLO}delivered" in result["facts"]["capabilities"]
    assert {t["rcpt"]["text"] for t in result["tests"]} == {RCPT}
    assert_ours(doc)
    # the text output: every line ours, one headline, the server's text shown as it came
    lines = assert_ours(out, shape=CHECK_LINE)
    assert [line for line in lines if HEADLINE.fullmatch(line)] == [
        f"127.0.0.1:{server.port}  OPEN-RELAY  (seen from 127.0.0.1)"
    ]
    assert f"  greeting: 220 {visible(BANNER)}" in lines
    assert "\\n" + FORGED in visible(BANNER)  # what the analyst reads: the server sent two lines
    assert "  EHLO: 8bitmime starttls x-\\u202edelivered" in lines
    tls = next(line for line in lines if line.startswith("  TLS: "))
    assert f"subject {visible(SUBJECT)}; issuer {visible(SUBJECT)};" in tls
    assert (
        "  S: 220-mx.forger.test ESMTP \\x1b[1A\\x1b[2K\\x0drelay refused \\u202edoog lla" in lines
    )
    assert f"  S: 220 {FORGED}" in lines  # a multi-line reply's lines, each marked as the server's
    assert "  S: 250-2.1.5 Ok \\u202e\\x1b[31m" in lines
    assert any(line.endswith(" 250 2.1.5 Ok \\u202e\\x1b[31m") for line in lines)  # the tests


async def test_show_and_findings_of_a_forging_servers_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with HostileServer(forger) as server:
        result = await probe("127.0.0.1", server.port, probe_settings())
    verdict = judge(result)
    (relay,) = [f for f in verdict.findings if f.kind is FindingKind.OPEN_RELAY]
    state = tmp_path / "state.sqlite"
    with StateStore(state) as store:
        one_sweep(store, (result, verdict))

    code, out, err = run_main(capsys, "show", relay.id, "--state", str(state))
    assert (code, err) == (0, "")
    lines = assert_ours(out, shape=SHOW_LINE)
    assert f"  greeting:    220 {visible(BANNER)}" in lines
    assert f"    RCPT TO:<relaytest@relay-test.example>  ->  250 {visible(RCPT)}" in lines
    assert f"  S: 220 {FORGED}" in lines

    code, out, err = run_main(capsys, "show", relay.id, "--state", str(state), "--json")
    assert (code, err) == (0, "")
    shown = json.loads(out)["finding"]
    assert shown["fingerprint"]["banner"] == f"220 {BANNER}"
    assert {t["rcpt"]["text"] for t in shown["evidence"]} == {RCPT}

    code, out, err = run_main(capsys, "findings", "--state", str(state))
    assert (code, err) == (0, "")
    assert len(assert_ours(out)) == 1 + len(verdict.findings) + 1  # header, findings, count


def test_reports_and_tables_show_server_text_in_a_stored_title(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finding = make_finding(title=HOSTILE, summary=f"greeted with 220 {HOSTILE}")
    state = tmp_path / "state.sqlite"
    with StateStore(state) as store:
        one_sweep(store, observe(finding))

    code, out, err = run_main(capsys, "report", "--state", str(state), "--format", "md")
    assert (code, err) == (0, "")
    lines = assert_ours(out)
    # one Markdown cell, its spaces collapsed and its backslashes escaped: the page shows
    # `\n`, `\x1b`, `\u202e`
    cell = one_line(HOSTILE).replace("\\", "\\\\")
    assert any(f" | {cell} | " in line for line in lines)

    code, out, err = run_main(capsys, "report", "--state", str(state), "--format", "csv")
    assert (code, err) == (0, "")
    assert len(assert_ours(out.replace("\r\n", "\n"))) == 2  # the header and one row per line
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["title"] == visible(HOSTILE)

    code, out, err = run_main(capsys, "report", "--state", str(state), "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out)["findings"][0]["title"] == HOSTILE

    code, out, err = run_main(capsys, "show", finding.id, "--state", str(state))
    assert (code, err) == (0, "")
    assert f"  {visible(HOSTILE)}" in assert_ours(out, shape=SHOW_LINE)

    # the findings table `sweep` ends with
    table = render_table([FindingBrief.of(finding)])
    assert len(table) == 2
    assert_ours("\n".join(table))
    assert table[1].endswith(f"  {one_line(HOSTILE)}")


def test_outbox_shows_what_a_hooks_server_answered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = f"HTTP 502: bad gateway\n{FORGED} \x1b[2J{RLO}"
    state = tmp_path / "state.sqlite"
    with StateStore(state) as store:
        store.set_channels(["webhook:0"])
        one_sweep(store, observe(make_finding()))
        (item,) = store.due("webhook:0", datetime.now(UTC) + timedelta(days=1))
        store.failed(item, error, next_attempt=datetime.now(UTC), dead=True)

    code, out, err = run_main(capsys, "outbox", "--state", str(state))
    assert (code, err) == (0, "")
    assert assert_ours(out)[-1].endswith(f" attempt(s): {visible(error)}")

    code, out, err = run_main(capsys, "outbox", "list", "--state", str(state))
    assert (code, err) == (0, "")
    assert assert_ours(out)[-1].endswith(one_line(error))

    code, out, err = run_main(capsys, "outbox", "list", "--state", str(state), "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)[0]["last_error"] == error


def test_an_alert_mail_shows_server_text_and_its_json_is_ascii(tmp_path: Path) -> None:
    finding = make_finding(title=HOSTILE, summary=f"greeted with 220 {HOSTILE}")
    with StateStore(tmp_path / "state.sqlite") as store:
        store.set_channels(["email:0"])
        (alert,) = one_sweep(store, observe(finding))
    hook = EmailHook(host="127.0.0.1", mail_from="relayaudit@campus.test", to=("rt@campus.test",))
    body = email_message(hook, alert, render_payload(alert)).get_content()
    summary, _, pretty = body.partition("\n\n-- the alert as JSON")
    assert summary.startswith(f"NEW: {visible(HOSTILE)}\n")
    assert_ours(summary)
    assert pretty.isascii()
    assert json.loads(pretty.split("\n", 1)[1])["title"] == HOSTILE  # the alert v1 keeps it
