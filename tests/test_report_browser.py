"""The HTML report files in headless Chromium: they open with no console error and no request
outside the page, every filter works, a finding opens its details, and hostile banners from the
lab render inert and in place. Screenshots go to pytest's temporary folders.

A missing browser fails these tests (RELAYAUDIT_REQUIRE_BROWSER=0 makes it a skip).
tests/test_report_live_browser.py opens the daemon's live page.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from browser import Opened, expect, launched, open_page, require_browser
from factories import make_finding, observe

from relayaudit.cli import main
from relayaudit.config import Config, parse_config
from relayaudit.demo import report_text
from relayaudit.engine import sweep
from relayaudit.html_page import page_from_stores
from relayaudit.html_report import render_html
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.sinks import Collector
from relayaudit.state import StateStore
from relayaudit.verdict import FindingKind, Severity, VerdictStatus

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator

pytestmark = pytest.mark.browser

RELAY_KINDS = {"open-relay", "relay-campus-sender", "relay-after-starttls"}
HOSTILE_PORT = 2790
# what a hostile server may say: markup, a table cell's end, quotes, a second line, and a
# right-to-left override that would show "evil.exe" as "exe.live" if it acted
OUTSIDE = "http://outside.invalid/x.png"  # a .invalid name: never resolves, never routes
HOSTILE = (
    f'mx.campus.test <script>alert("banner")</script></td></tr></table><img src="{OUTSIDE}">'
    " \"dq\" 'sq'\nsecond line \u202eexe.live\u202c"
)


@dataclass(frozen=True)
class Reports:
    demo: Path
    demo_findings: list[dict[str, Any]]
    store: Path
    hostile: Path


def _store_report(tmp: Path) -> Path:
    """Two sweeps over two /24s: a relay that was fixed, one that is new, an unapproved server."""
    path = tmp / "state.sqlite"
    fixed = make_finding(address="127.0.9.7", title="relay since fixed")
    fresh = make_finding(address="127.0.21.5", severity=Severity.CRITICAL, title="new relay")
    other = make_finding(FindingKind.UNAPPROVED_SMTP, address="127.0.21.9", port=587)
    with StateStore(path, resolve_after=1) as store:
        first = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=3)
        store.record(first.id, *observe(fixed, address="127.0.9.7"))
        store.record(first.id, *observe(fresh, address="127.0.21.5"))
        store.complete_sweep(first.id, _finished())
        second = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=3)
        store.record(second.id, *observe(address="127.0.9.7", status=VerdictStatus.RELAY_REFUSED))
        store.record(second.id, *observe(fresh, address="127.0.21.5"))
        store.record(second.id, *observe(other, address="127.0.21.9", port=587))
        store.complete_sweep(second.id, _finished())
    config = parse_config({"scope": ["127.0.0.0/8"], "targets": ["127.0.9.0/24", "127.0.20.0/22"]})
    page = render_html(page_from_stores([path], since=timedelta(days=7), config=config))
    out = tmp / "store.html"
    out.write_text(page, encoding="utf-8")
    return out


def _finished() -> Any:
    from relayaudit.progress import SweepStats  # noqa: PLC0415

    stats = SweepStats()
    stats.finished = stats.started
    return stats


def _hostile_config() -> Config:
    return parse_config(
        {
            "scope": ["127.0.190.0/24"],
            "targets": ["127.0.190.0/29"],
            "ports": [HOSTILE_PORT],
            "identity": {"helo_name": "relayaudit.campus.test"},
            "relay": {"campus_domains": ["campus.test"]},
            "timeouts": {"connect": "1s", "command": "3s", "session": "20s"},
            "limits": {"rate": 500, "subnet_rate": 200},
        }
    )


async def _hostile_report(out: Path) -> Path:
    """A real sweep of lab servers whose greetings are hostile: a relay and an unapproved one."""
    specs = [
        ServerSpec("127.0.190.1", HOSTILE_PORT, Behaviour.OPEN_RELAY, banner=HOSTILE),
        ServerSpec("127.0.190.2", HOSTILE_PORT, Behaviour.CLOSED, banner=HOSTILE),
    ]
    config = _hostile_config()
    collector = Collector()
    async with Lab(specs, local_domains=("campus.test",), campus_domains=("campus.test",)):
        stats = await sweep(config, sinks=[collector])
    out.write_text(report_text(out, config, collector, stats, "hostile0001"), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Reports:
    """Every page, made before the browser starts (Playwright's sync API owns the thread's loop)."""
    require_browser()
    tmp = tmp_path_factory.mktemp("reports")
    demo = tmp / "demo.html"
    code = main(["demo", "--output", str(tmp / "findings.jsonl"), "--report", str(demo)])
    assert code == 0
    findings = [
        json.loads(line) for line in (tmp / "findings.jsonl").read_text().splitlines() if line
    ]
    hostile = asyncio.run(_hostile_report(tmp / "hostile.html"))
    return Reports(demo, findings, _store_report(tmp), hostile)


@pytest.fixture(scope="module")
def browser(reports: Reports) -> Iterator[Browser]:
    with launched() as b:
        yield b


@pytest.fixture
def opened(browser: Browser, request: pytest.FixtureRequest) -> Any:
    """open(path, **context options): the page, closed when the test ends."""

    def _open(path: Path, **options: Any) -> Opened:
        o = open_page(
            browser, path.resolve().as_uri(), viewport={"width": 1280, "height": 900}, **options
        )
        request.addfinalizer(o.page.context.close)
        return o

    return _open


def shown(o: Opened) -> Locator:
    return o.page.locator("#list > details.f").filter(visible=True)


def test_the_demo_report_opens_clean_and_names_every_relay(
    opened: Any, reports: Reports, tmp_path: Path
) -> None:
    o = opened(reports.demo)
    relays = [f for f in reports.demo_findings if f["kind"] in RELAY_KINDS]
    assert relays
    for f in relays:
        row = o.page.locator(f"details#{f['id']} > summary")
        assert row.is_visible()
        assert f"{f['address']}:{f['port']}" in row.inner_text()
    expect(shown(o)).to_have_count(len(reports.demo_findings))
    assert o.page.locator("#shown").inner_text() == (
        f"{len(reports.demo_findings)} of {len(reports.demo_findings)} findings shown"
    )
    o.page.screenshot(path=tmp_path / "demo.png", full_page=True)
    o.assert_clean()


def test_each_filter_narrows_the_list(opened: Any, reports: Reports) -> None:
    o = opened(reports.demo)
    page, everything = o.page, len(reports.demo_findings)
    for key, control in (("kind", "#f-kind"), ("severity", "#f-sev")):
        for value, n in Counter(f[key] for f in reports.demo_findings).items():
            page.select_option(control, value)
            expect(shown(o)).to_have_count(n)
            assert all(
                el.get_attribute("data-kind" if key == "kind" else "data-sev") == value
                for el in shown(o).all()
            )
        page.select_option(control, "")
        expect(shown(o)).to_have_count(everything)
    # the owner filter (issue 29): each of the demo's two departments, and nobody (.12)
    owners = Counter((f["owner"] or {}).get("name", "-") for f in reports.demo_findings)
    assert set(owners) == {"Central IT", "Chemistry", "-"}
    for value, n in owners.items():
        page.select_option("#f-owner", value)
        expect(shown(o)).to_have_count(n)
        assert all(el.get_attribute("data-owner") == value for el in shown(o).all())
    page.select_option("#f-owner", "")
    # the unowned section's button shows the findings nobody owns
    page.click("#unowned button[data-owner]")
    expect(shown(o)).to_have_count(owners["-"])
    page.select_option("#f-owner", "")
    expect(shown(o)).to_have_count(everything)
    page.select_option("#f-status", "new")  # a one-off sweep keeps no lifecycle
    expect(shown(o)).to_have_count(0)
    expect(page.locator("#none")).to_be_visible()
    page.select_option("#f-status", "all")
    page.select_option("#f-net", "b127.0.10.0/28")  # the demo's one target range
    expect(shown(o)).to_have_count(everything)
    relay = next(f for f in reports.demo_findings if f["kind"] == "open-relay")
    page.fill("#f-text", relay["id"])
    expect(shown(o)).to_have_count(1)
    page.fill("#f-text", f"{relay['address']}:{relay['port']}")
    expected = sum(1 for f in reports.demo_findings if f["address"] == relay["address"])
    expect(shown(o)).to_have_count(expected)
    page.click("button[type=reset]")
    expect(shown(o)).to_have_count(everything)
    o.assert_clean()


def test_a_finding_opens_its_evidence_and_folded_transcript(
    opened: Any, reports: Reports, tmp_path: Path
) -> None:
    o = opened(reports.demo)
    relay = next(f for f in reports.demo_findings if f["kind"] == "open-relay")
    finding = o.page.locator(f"details#{relay['id']}")
    finding.locator("> summary").click()
    assert finding.get_attribute("open") == ""
    rows = finding.locator("table.ev tbody tr")
    assert rows.count() == len(relay["evidence"])
    assert "accepted" in rows.first.inner_text() or "accepted" in finding.inner_text()
    transcript = finding.locator("details.tx")
    assert transcript.get_attribute("open") is None
    assert not transcript.locator("pre").is_visible()
    transcript.locator("> summary").click()
    assert transcript.locator("pre").is_visible()
    assert "RCPT TO:<" in transcript.locator("pre").inner_text()
    o.page.screenshot(path=tmp_path / "finding.png", full_page=False)
    # the keyboard opens and closes a finding too
    finding.locator("> summary").focus()
    o.page.keyboard.press("Enter")
    assert finding.get_attribute("open") is None
    o.assert_clean()


def test_status_subnet_and_change_links_on_a_stores_report(opened: Any, reports: Reports) -> None:
    o = opened(reports.store)
    page = o.page
    expect(shown(o)).to_have_count(2)  # open by default: the new relay and the unapproved server
    page.select_option("#f-status", "resolved")
    expect(shown(o)).to_have_count(1)
    expect(shown(o).first).to_contain_text("relay since fixed")
    page.select_option("#f-status", "open")
    page.select_option("#f-net", "b127.0.9.0/24")
    expect(shown(o)).to_have_count(0)
    expect(page.locator("#none")).to_be_visible()
    page.select_option("#f-net", "r1")  # the range 127.0.20.0/22
    expect(shown(o)).to_have_count(2)
    # the subnet view's button sets the subnet filter
    page.select_option("#f-net", "")
    page.click('button[data-net="b127.0.21.0/24"]')
    assert page.locator("#f-net").input_value() == "b127.0.21.0/24"
    expect(shown(o)).to_have_count(2)
    # a change's link opens its finding, clearing the filters that hide it (resolved)
    fixed_link = page.locator("#changes a", has_text="127.0.9.7:25").first
    fixed_link.click()
    fixed = page.locator("details.f", has_text="relay since fixed")
    assert fixed.is_visible() and fixed.get_attribute("open") == ""
    assert page.locator("#f-status").input_value() == "all"
    # the trend has one line per kind seen, and its numbers
    assert page.locator("#trend svg.chart polyline").count() == 2
    o.assert_clean()


def test_hostile_banners_render_inert_and_in_place(
    opened: Any, reports: Reports, tmp_path: Path
) -> None:
    o = opened(reports.hostile)
    page = o.page
    # nothing the servers sent became markup: one script (the page's), no image, no frame
    assert page.evaluate("document.scripts.length") == 1
    assert page.evaluate("document.images.length") == 0
    assert page.evaluate("document.querySelectorAll('iframe, object, embed, link').length") == 0
    findings = page.locator("#list > details.f")
    kinds = {findings.nth(i).get_attribute("data-kind") for i in range(findings.count())}
    assert {"open-relay", "unapproved-smtp"} <= kinds
    for i in range(findings.count()):
        finding = findings.nth(i)
        assert finding.locator("> summary > span").count() == 8  # the row kept its cells
        finding.locator("> summary").click()
        greeting = finding.locator("dt", has_text="greeting").locator(
            "xpath=following-sibling::dd[1]"
        )
        text = greeting.inner_text()
        # in place and literal: the markup as text, the second line after a newline mark, the
        # override shown as a mark, so "exe.live" reads as sent
        assert '<script>alert("banner")</script></td></tr></table><img src=' in text
        assert "⏎second line U+202Eexe.liveU+202C" in text
        assert "\u202e" not in greeting.inner_html()
    # the summary of the unapproved server quotes the banner, inert too
    unapproved = page.locator('details.f[data-kind="unapproved-smtp"] .d > p').first
    assert '<script>alert("banner")</script>' in unapproved.inner_text()
    # and the search finds it as text
    page.fill("#f-text", "<script>alert")
    expect(shown(o)).to_have_count(findings.count())
    page.screenshot(path=tmp_path / "hostile.png", full_page=True)
    o.assert_clean()  # no dialog, no request to outside.invalid, no error


def test_the_checks_catch_an_outside_reference(
    opened: Any, reports: Reports, tmp_path: Path
) -> None:
    """If the page ever referenced something outside, the CSP would block it (a console error)
    and, without the CSP, the route guard would see it: either fails the tests above."""
    bad = tmp_path / "bad.html"
    page = reports.demo.read_text(encoding="utf-8")
    bad.write_text(page.replace("</body>", f'<img src="{OUTSIDE}"></body>'), encoding="utf-8")
    o = opened(bad)
    assert o.outside == []
    assert any("Content Security Policy" in t for t in o.console_errors)
    o = opened(bad, bypass_csp=True)
    assert o.outside == [OUTSIDE]
