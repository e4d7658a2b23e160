"""The HTML report's page (html_page) and markup (html_report), without a browser: what it shows,
and that server text stays text. tests/test_report_browser.py opens the same pages in Chromium."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

from factories import make_finding, observe

from relayaudit.config import Config, parse_config
from relayaudit.evidence import Exchange, Reply
from relayaudit.html_page import Service, page_from_stores, page_from_sweep
from relayaudit.html_report import content_security_policy, render_html
from relayaudit.progress import SweepStats
from relayaudit.state import StateStore
from relayaudit.verdict import FindingKind, Fingerprint, Severity, TargetOrigin, VerdictStatus

HOSTILE = "mx <script>alert(1)</script></td></bdi><!-- \"dq\" 'sq' &amp; line1\nline2 \u202eevil"


class Markup(HTMLParser):
    """Elements, attributes and text as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.script_text: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._in:
            while self._in and self._in.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] in ("script", "style"):
            self.script_text.append(data)
        else:
            self.text.append(data)

    def count(self, tag: str) -> int:
        return sum(1 for t, _ in self.tags if t == tag)


def parse(page: str) -> Markup:
    m = Markup()
    m.feed(page)
    m.close()
    return m


def config(**extra: object) -> Config:
    return parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": ["127.0.9.0/24", "127.0.20.0/22"],
            "approved": [
                {"address": "127.0.9.9", "port": 25, "note": "ISO-0001 hub"},
                {"address": "127.0.9.10", "note": "ISO-0002 gone"},
            ],
            **extra,
        }
    )


def _stats(probes: int = 3, errors: int = 0) -> SweepStats:
    """A sweep of 42 s that ends now: after the transitions it raised."""
    now = datetime.now(UTC)
    stats = SweepStats(started=now - timedelta(seconds=42), probes=probes, hosts=probes)
    stats.statuses[VerdictStatus.RELAY_REFUSED] = probes - errors
    if errors:
        stats.statuses[VerdictStatus.INTERNAL_ERROR] = errors
    stats.finished = now
    return stats


def _hostile_store(path: Path) -> str:
    """One sweep: a relay whose banner, title, summary and transcript hold HOSTILE."""
    relay = make_finding(
        address="127.0.9.7",
        title=f"open relay at {HOSTILE}",
        summary=f"greeted with ({HOSTILE})",
        transcript=(
            Exchange(command=None, reply=Reply(code=220, text=HOSTILE)),
            Exchange(command="EHLO x", reply=Reply(code=250, text="ok\nPIPELINING")),
        ),
    ).model_copy(update={"fingerprint": Fingerprint(banner=f"220 {HOSTILE}")})
    with StateStore(path) as store:
        sweep = store.begin_sweep(shard="0/1", config_fingerprint="fp", total=3)
        store.record(sweep.id, *observe(relay, address="127.0.9.7"))
        store.record(sweep.id, *observe(address="127.0.9.9", status=VerdictStatus.RELAY_REFUSED))
        store.complete_sweep(sweep.id, _stats())
    return relay.id


def test_server_text_is_escaped_and_marked_in_place(tmp_path: Path) -> None:
    relay_id = _hostile_store(tmp_path / "state.sqlite")
    page = render_html(
        page_from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7), config=config())
    )
    markup = parse(page)
    # the page's own script is the only one; nothing the server sent became an element
    assert markup.count("script") == 1 and markup.count("style") == 1
    assert not any(
        t in ("img", "iframe", "object", "embed", "link", "base") for t, _ in markup.tags
    )
    assert "alert(1)" not in "".join(markup.script_text)
    assert all(not k.startswith("on") for _, attrs in markup.tags for k in attrs)
    text = "".join(markup.text)
    # shown as text, where it belongs: the markup characters and quotes literally
    assert "<script>alert(1)</script></td></bdi><!-- \"dq\" 'sq' &amp; line1" in text
    # no bidi override reaches the page; it is shown as a visible mark instead
    assert "\u202e" not in page
    assert "U+202E" in text
    # the newline of a one-line cell is a visible mark; in the transcript it starts a line
    assert "line1⏎line2" in text
    assert "S: 220-mx <script>alert(1)" in text and "\nS: 220 line2 U+202Eevil" in text
    assert "S: 250-ok\nS: 250 PIPELINING" in text
    # the finding's element carries the id; its search text is an attribute with no markup
    (attrs,) = [a for t, a in markup.tags if t == "details" and a.get("id") == relay_id]
    assert "<script>" in (attrs["data-text"] or "") and "\n" not in (attrs["data-text"] or "")


def test_the_policy_allows_only_the_pages_own_style_and_script(tmp_path: Path) -> None:
    _hostile_store(tmp_path / "state.sqlite")
    page = render_html(page_from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7)))
    markup = parse(page)
    (meta,) = [
        a
        for t, a in markup.tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    policy = meta["content"] or ""
    assert policy == content_security_policy()
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    style, script = (re.search(rf"<{t}>(.*?)</{t}>", page, re.S) for t in ("style", "script"))
    assert style is not None and script is not None
    for body in (style.group(1), script.group(1)):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    # nothing points outside the page: links are fragments
    refs = [v for _, a in markup.tags for k, v in a.items() if k in ("src", "href", "action")]
    assert refs and all((v or "").startswith("#") for v in refs), refs


def test_header_findings_changes_and_pictures(tmp_path: Path) -> None:
    """Two shards; sweep 2 of shard 0 finds a new relay and resolves another."""
    paths = [tmp_path / "shard-0.sqlite", tmp_path / "shard-1.sqlite"]
    gone = make_finding(address="127.0.9.20")
    fresh = make_finding(address="127.0.21.5", severity=Severity.CRITICAL)
    other = make_finding(FindingKind.UNAPPROVED_SMTP, address="127.0.9.30", port=587)
    with StateStore(paths[0], resolve_after=1) as store:
        s1 = store.begin_sweep(shard="0/2", config_fingerprint="fp", total=2)
        store.record(s1.id, *observe(gone, address="127.0.9.20"))
        store.complete_sweep(s1.id, _stats())
        s2 = store.begin_sweep(shard="0/2", config_fingerprint="fp", total=2)
        store.record(s2.id, *observe(address="127.0.9.20", status=VerdictStatus.RELAY_REFUSED))
        store.record(s2.id, *observe(fresh, address="127.0.21.5"))
        store.complete_sweep(s2.id, _stats(probes=7, errors=2))
    with StateStore(paths[1]) as store:
        s = store.begin_sweep(shard="1/2", config_fingerprint="fp", total=2)
        store.record(s.id, *observe(other, address="127.0.9.30", port=587))
        store.record(s.id, *observe(address="127.0.9.9", status=VerdictStatus.RELAY_REFUSED))
        store.complete_sweep(s.id, _stats())
    page = page_from_stores(paths, since=timedelta(days=7), config=config())
    # the header: each shard's last sweep, with its probes and errors; the scanner is healthy
    assert [(v.shard, v.last.probes, v.last.errors) for v in page.shards if v.last] == [
        ("0/2", 7, 2),
        ("1/2", 3, 0),
    ]
    assert page.health[0] is True
    # the trend replays the store's transitions at the end of each sweep
    assert [dict(p) for _, p in page.series] == [
        {FindingKind.OPEN_RELAY: 1},
        {FindingKind.OPEN_RELAY: 1},
        {FindingKind.OPEN_RELAY: 1, FindingKind.UNAPPROVED_SMTP: 1},
    ]
    text = "".join(parse(render_html(page)).text)
    assert "Scope127.0.0.0/8" in text and "Targets127.0.9.0/24, 127.0.20.0/22" in text
    # open findings first, most severe first; the resolved relay after them
    order = [f.address for f in page.report.findings]
    assert order == ["127.0.21.5", "127.0.9.30", "127.0.9.20"]
    # what changed since the previous sweep: shard 0's sweep 2 and shard 1's only sweep
    assert "Since the previous sweep (the last sweep of each shard): 2 new, 1 resolved." in text
    # per subnet: the /24s of the configured ranges, with services, approvals and relays
    html_text = render_html(page)
    assert "127.0.21.0/24" in html_text and "Relays cluster in: 127.0.21.0/24 (1)." in text
    # approved services: the hub answered, the other approval is stale
    assert "seen: 127.0.9.9:25 relay-refused" in text
    assert "not seen: stale?" in text


def test_a_stale_store_makes_the_scanner_unhealthy(tmp_path: Path) -> None:
    _hostile_store(tmp_path / "state.sqlite")
    later = datetime.now(UTC) + timedelta(days=3)
    page = page_from_stores([tmp_path / "state.sqlite"], since=timedelta(days=7), now=later)
    ok, reason = page.health
    assert not ok and "longer than the expected 13.0 h" in reason
    assert "scanner unhealthy" in "".join(parse(render_html(page)).text)


def test_a_sweeps_page_has_no_history_but_its_services(tmp_path: Path) -> None:
    relay = make_finding(address="127.0.9.7")
    page = page_from_sweep(
        [relay],
        sweep_id="abc123",
        stats=_stats(probes=5, errors=1),
        config=config(),
        services=[
            Service("127.0.9.7", 25, VerdictStatus.OPEN_RELAY),
            Service("127.0.9.9", 25, VerdictStatus.RELAY_REFUSED),
        ],
    )
    assert page.health == (
        False,
        "1 probe(s) ended in internal-error: a relayaudit bug, see the log",
    )
    text = "".join(parse(render_html(page)).text)
    assert "A single sweep keeps no state store" in text
    assert "Not enough history" in text
    assert "seen: 127.0.9.9:25 relay-refused" in text and "one-off sweep: no daemon" in text


def test_a_finding_found_through_dns_names_its_name(tmp_path: Path) -> None:
    """A target source's DNS name (issue 26) is shown with the finding, escaped as server text."""
    origin = TargetOrigin(source="mx campus.test", name="mx1.campus.test<b>", record="A")
    relay = make_finding(address="127.0.9.7").model_copy(update={"origin": (origin,)})
    page = page_from_sweep(
        [relay], sweep_id="abc123", stats=_stats(), config=config(), services=[]
    )
    html = render_html(page)
    assert "found as" in "".join(parse(html).text)
    assert "mx1.campus.test&lt;b&gt; A (mx campus.test)" in html
