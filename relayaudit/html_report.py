"""The HTML report: one self-contained page (inline CSS, script and SVG; no remote load).

`render_html` turns a `Page` (html_page.py) into one string. Every string that may hold server
text goes through `_t` (text) or `_a` (attribute): `html.escape(..., quote=True)`, then control
and bidi characters are shown as visible marks instead of acting. The Content-Security-Policy
allows only this page's own style and script, by their hashes: a string that escaped escaping
could neither run nor load anything. The style and script are package data (html_report.css,
html_report.js).
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources

from relayaudit.engine import approval_day
from relayaudit.evidence import endpoint
from relayaudit.export import UNOWNED, ReportFinding
from relayaudit.html_page import Page
from relayaudit.records import FindingStatus, Transition
from relayaudit.remediation import advice
from relayaudit.schedule import local_zone
from relayaudit.software import describe
from relayaudit.text import span
from relayaudit.verdict import FindingKind, Severity

__all__ = ["content_security_policy", "render_html"]


# -- escaping ------------------------------------------------------------------------------------

# C0/C1 controls (newline and tab kept: multi-line replies), bidi embeddings, overrides, isolates
# and marks, zero-width and invisible format characters: a server string shows them as marks
_INERT = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069"
    "\ufeff\ufff9-\ufffb]"
)


def _mark(m: re.Match[str]) -> str:
    return f'<span class="cc" title="U+{ord(m.group()):04X}">U+{ord(m.group()):04X}</span>'


def _t(value: object) -> str:
    """Text content: escaped, with invisible and direction-changing characters made visible."""
    text = html.escape("" if value is None else str(value), quote=True)
    return _INERT.sub(_mark, text) if _INERT.search(text) else text


def _line(value: object) -> str:
    """One line of text: newlines (a multi-line reply) shown as ⏎ where they were."""
    return _t(value).replace("\r", "").replace("\n", '<span class="cc" title="newline">⏎</span>')


def _a(value: object) -> str:
    """An attribute value (always written in double quotes): no markup, marks as `U+XXXX`."""
    text = "" if value is None else str(value)
    text = _INERT.sub(lambda m: f"U+{ord(m.group()):04X}", text).replace("\n", " ")
    return html.escape(text, quote=True)


def _srv(value: object) -> str:
    """Server-provided text on one line inside other text, isolated so that its direction cannot
    spill over. (A table cell or a row's cell is a paragraph of its own: `_line` is enough.)"""
    return f'<bdi class="srv">{_line(value)}</bdi>'


# -- times and numbers -----------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    utc = value.astimezone(UTC)
    return (
        f'<time datetime="{utc.isoformat(timespec="seconds")}">'
        f"{utc.strftime('%Y-%m-%d %H:%M')} UTC</time>"
    )


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


# -- networks ----------------------------------------------------------------------------------------


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _block_of(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    ranges: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> tuple[int, str]:
    """(index of the configured range, its block: a /24 in IPv4, a /64 in IPv6, or the range
    itself when smaller); index -1 for an address outside every range."""
    size = 24 if ip.version == 4 else 64
    for i, net in enumerate(ranges):
        if net.version == ip.version and ip in net:
            if net.prefixlen >= size:
                return i, str(net)
            return i, str(ipaddress.ip_network(f"{ip}/{size}", strict=False))
    return -1, str(ipaddress.ip_network(f"{ip}/{size}", strict=False))


def _net_key(text: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(text)
    return net.version, int(net.network_address), net.prefixlen


# -- the page ------------------------------------------------------------------------------------


@cache
def _asset(name: str) -> str:
    return resources.files("relayaudit").joinpath(name).read_text(encoding="utf-8")


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy() -> str:
    """Only this page's own style and script (by hash) and data: images; nothing remote."""
    return (
        "default-src 'none'; "
        f"style-src {_hash(_asset('html_report.css'))}; "
        f"script-src {_hash(_asset('html_report.js'))}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


_KIND_NAMES = {
    FindingKind.OPEN_RELAY: "open relay",
    FindingKind.RELAY_CAMPUS_SENDER: "relay for a campus sender",
    FindingKind.RELAY_AFTER_STARTTLS: "relay after STARTTLS",
    FindingKind.RELAY_CLAIMED_HELO: "relay for a claimed HELO name",
    FindingKind.RELAY_VIA_XCLIENT: "relay via XCLIENT",
    FindingKind.ACCEPTS_WITHOUT_DELIVERY: "accepts without delivery",
    FindingKind.REFUSES_AT_DATA: "refuses the message at DATA",
    FindingKind.UNAPPROVED_SMTP: "unapproved SMTP",
    FindingKind.AUTH_WITHOUT_TLS: "AUTH without TLS",
    FindingKind.XCLIENT_OFFERED: "XCLIENT offered",
}


# the owner filter's value for a finding nobody owns (an owner's name is never empty)
_NOBODY = "-"


def render_html(page: Page) -> str:
    """The whole page as one string."""
    r = page.report
    out: list[str] = [
        "<!doctype html>\n",
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{_a(content_security_policy())}">\n',
        '<meta name="referrer" content="no-referrer">\n',
        '<meta name="generator" content="relayaudit ',
        _a(r.tool_version),
        '">\n',
        f"<title>relayaudit report, {_t(r.generated_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M'))} UTC</title>\n",
        "<style>",
        _asset("html_report.css"),
        "</style>\n</head>\n<body>\n",
        '<a class="skip" href="#findings">Skip to the findings</a>\n',
    ]
    _header(out, page)
    out.append("<main>\n")
    _summary(out, page)
    _findings(out, page)
    _changes(out, page)
    _trend(out, page)
    _subnets(out, page)
    _approved(out, page)
    _unowned(out, page)
    out.append("</main>\n")
    out.append(
        "<footer><p>Made by relayaudit "
        f"{_t(r.tool_version)} on {_when(r.generated_at)}. One self-contained file: it loads "
        "nothing from anywhere, so it works offline and as an email attachment. Each finding's "
        "whole record: <code>relayaudit show FINDING_ID</code>; the same data as CSV or JSON: "
        "<code>relayaudit report --format csv|json</code>.</p></footer>\n"
    )
    out += ["<script>", _asset("html_report.js"), "</script>\n</body>\n</html>\n"]
    return "".join(out)


def _header(out: list[str], page: Page) -> None:
    r = page.report
    ok, reason = page.health
    out.append('<header>\n<div class="top"><h1>relayaudit report</h1>')
    out.append(
        f'<span class="health {"ok" if ok else "bad"}" role="status">scanner '
        f"{'healthy' if ok else 'unhealthy'}</span></div>\n"
    )
    out.append(
        f'<p class="muted">Generated {_when(r.generated_at)} ({_t(reason)}).</p>\n'
        if reason
        else f'<p class="muted">Generated {_when(r.generated_at)}.</p>\n'
    )
    if page.served_by:
        out.append(f'<p class="warn">{_t(page.served_by)}</p>\n')
    if r.owner_filter is not None:  # report --owner / --unowned: every section is filtered
        who = (
            "nobody owns"
            if r.owner_filter == UNOWNED
            else f"owner <b>{_t(r.owner_filter)}</b> runs"
        )
        out.append(
            f'<p class="warn">Only the findings and SMTP services that {who} '
            "(docs/owners.md): every section below is filtered.</p>\n"
        )
    out.append('<dl class="facts">\n')
    cfg = page.config
    if cfg is not None:
        out.append(f"<dt>Scope</dt><dd>{_t(', '.join(map(str, cfg.scope)))}</dd>\n")
        out.append(f"<dt>Targets</dt><dd>{_t(', '.join(map(str, cfg.targets)))}</dd>\n")
        if cfg.exclude:
            out.append(f"<dt>Excluded</dt><dd>{_t(', '.join(map(str, cfg.exclude)))}</dd>\n")
        out.append(f"<dt>Ports</dt><dd>{_t(', '.join(map(str, cfg.ports)))}</dd>\n")
        out.append(f"<dt>Configuration</dt><dd>{_t(cfg.source)}</dd>\n")
    else:
        out.append(
            "<dt>Scope, targets</dt><dd>not known: give <code>--config FILE</code> to show "
            "them, the approved services and the configured ranges</dd>\n"
        )
    out.append(f"<dt>Read from</dt><dd>{_t(', '.join(r.sources))}</dd>\n")
    out.append("</dl>\n")
    out.append(
        '<div class="scroll"><table>\n<caption class="sr">Each shard\'s last sweep</caption>\n'
        "<thead><tr><th>shard</th><th>last sweep</th><th>started</th><th>ended</th>"
        '<th class="n">duration</th><th class="n">hosts</th><th class="n">probes</th>'
        '<th class="n">errors</th><th>now</th></tr></thead>\n<tbody>\n'
    )
    for view in page.shards:
        last = view.last
        now = (
            f"sweeping since {_when(view.running.started)} "
            f"({view.running.watermark:,} of {view.running.total:,} targets)"
            if view.running is not None
            else "no sweep running"
        )
        if page.served_by is None and view.source.startswith("sweep "):
            now = "one-off sweep: no daemon"
        if last is None:
            out.append(
                f'<tr><td>{_t(view.shard)}</td><td colspan="7">no sweep completed yet</td>'
                f"<td>{now}</td></tr>\n"
            )
            continue
        errors = last.errors
        out.append(
            f'<tr><td>{_t(view.shard)}</td><td class="mono">{_t(last.id)}</td>'
            f"<td>{_when(last.started)}</td><td>{_when(last.finished)}</td>"
            f'<td class="n">{span(last.duration or 0.0)}</td>'
            f'<td class="n">{_t(f"{last.hosts:,}" if last.hosts is not None else "")}</td>'
            f'<td class="n">{_t(f"{last.probes:,}" if last.probes is not None else "")}</td>'
            f'<td class="n">{errors:,}</td><td>{now}</td></tr>\n'
        )
    out.append("</tbody></table></div>\n</header>\n")


def _open(f: ReportFinding) -> bool:
    return f.status is not FindingStatus.RESOLVED


def _summary(out: list[str], page: Page) -> None:
    open_ = [f for f in page.report.findings if _open(f)]
    by_sev = Counter(f.severity for f in open_)
    relays = sum(1 for f in open_ if f.kind.is_relay)
    out.append('<section aria-label="In short"><div class="cards">\n')
    out.append(f'<div class="card"><b>{len(open_):,}</b>open findings</div>\n')
    out.append(f'<div class="card"><b>{relays:,}</b>open relays</div>\n')
    for sev in Severity:
        out.append(
            f'<div class="card"><b class="sev-{sev.value}">{by_sev.get(sev, 0):,}</b>{sev.value}</div>\n'
        )
    if page.services is not None:
        out.append(
            f'<div class="card"><b>{len(page.services):,}</b>SMTP services in the last sweep</div>\n'
        )
    out.append("</div></section>\n")


def _nets_of(page: Page) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], str]:
    if page.config is not None:
        return list(page.config.targets), "configured target range"
    return [], ""


def _findings(out: list[str], page: Page) -> None:
    findings = page.report.findings
    ranges, _ = _nets_of(page)
    open_count = sum(1 for f in findings if _open(f))
    out.append(
        f'<section id="findings" aria-labelledby="h-findings">\n<h2 id="h-findings">'
        f"Findings: {open_count:,} open, {len(findings) - open_count:,} resolved</h2>\n"
    )
    out.append(
        '<p class="muted">Open findings first, by severity, then confidence (the evidence: '
        "confirmed &gt; high &gt; medium &gt; low), then address. Select a row for its evidence "
        "and transcript.</p>\n"
    )
    # filters (shown by the script; without it every finding is listed)
    blocks: dict[str, tuple[int, str]] = {}
    tokens: dict[str, str] = {}
    for f in findings:
        ip = _ip(f.address)
        if ip is None:
            tokens[f.id] = ""
            continue
        index, block = _block_of(ip, ranges)
        blocks[block] = (index, block)
        tokens[f.id] = (f"r{index} " if index >= 0 else "") + f"b{block}"
    kinds = sorted({f.kind for f in findings}, key=lambda k: list(FindingKind).index(k))
    out.append(
        '<form id="filters" class="filters" role="search" aria-label="Filter the findings" hidden>\n'
    )
    out.append('<label>Kind <select id="f-kind"><option value="">any kind</option>')
    out += [f'<option value="{k.value}">{_t(_KIND_NAMES[k])}</option>' for k in kinds]
    out.append("</select></label>\n")
    out.append('<label>Severity <select id="f-sev"><option value="">any severity</option>')
    out += [f'<option value="{s.value}">{s.value}</option>' for s in Severity]
    out.append("</select></label>\n")
    out.append(
        '<label>Status <select id="f-status">'
        '<option value="open" selected>open (new, ongoing, reopened)</option>'
        '<option value="new">new</option><option value="ongoing">ongoing</option>'
        '<option value="reopened">reopened</option><option value="resolved">resolved</option>'
        '<option value="all">all</option></select></label>\n'
    )
    out.append('<label>Owner <select id="f-owner"><option value="">any owner</option>')
    names = sorted({f.owner.name for f in findings if f.owner is not None})
    out += [f'<option value="{_a(name)}">{_t(name)}</option>' for name in names]
    if any(f.owner is None for f in findings):
        out.append(f'<option value="{_a(_NOBODY)}">no owner</option>')
    out.append("</select></label>\n")
    out.append('<label>Subnet <select id="f-net"><option value="">any subnet</option>')
    for i, net in enumerate(ranges):
        out.append(f'<option value="r{i}">{_t(net)} (range)</option>')
    for _, block in sorted(blocks.values(), key=lambda b: (b[0] < 0, _net_key(b[1]))):
        out.append(f'<option value="b{_a(block)}">{_t(block)}</option>')
    out.append("</select></label>\n")
    out.append(
        '<label>Search <input type="search" id="f-text" '
        'placeholder="address, id, title, banner…" autocomplete="off"></label>\n'
        '<button type="reset">Clear filters</button>\n'
        '<output id="shown" aria-live="polite"></output>\n</form>\n'
    )
    out.append(
        '<div class="list" id="list">\n<div class="row head" aria-hidden="true">'
        "<span>severity</span><span>confidence</span><span>address:port</span><span>kind</span>"
        "<span>owner</span><span>title</span><span>status</span><span>last seen</span></div>\n"
    )
    for f in findings:
        _finding(out, page, f, tokens.get(f.id, ""))
    out.append(
        '<p id="none" class="empty" hidden>No finding matches these filters.</p>\n'
        + ("" if findings else '<p class="empty">No findings.</p>\n')
        + "</div>\n</section>\n"
    )


def _finding(out: list[str], page: Page, f: ReportFinding, nets: str) -> None:
    whole = page.details.get(f.id)
    fp = whole.fingerprint if whole is not None else None
    status = f.status.value if f.status is not None else "seen"
    search = " ".join(
        x
        for x in (
            f.id,
            endpoint(f.address, f.port),
            f.kind.value,
            f.title,
            f.summary,
            f.approved_note or "",
            f.owner.name if f.owner is not None else "",
            (fp.banner or "") if fp else "",
            (fp.hostname or "") if fp else "",
            (fp.software or "") if fp else "",
        )
        if x
    ).lower()
    out.append(
        f'<details class="f" id="{_a(f.id)}" data-kind="{f.kind.value}" '
        f'data-sev="{f.severity.value}" data-status="{status}" data-nets="{_a(nets)}" '
        f'data-owner="{_a(f.owner.name if f.owner is not None else _NOBODY)}" '
        f'data-text="{_a(search)}">\n<summary class="row">'
        f'<span class="sev sev-{f.severity.value}">{f.severity.value}</span>'
        f"<span>{f.confidence.value}</span>"
        f'<span class="mono">{_t(endpoint(f.address, f.port))}</span>'
        f"<span>{_t(f.kind.value)}</span>"
        f"<span>{_t(f.owner.name) if f.owner is not None else '<i>no owner</i>'}</span>"
        f'<span class="t">{_line(f.title)}</span>'
        f'<span><span class="st st-{status}">{status}</span></span>'
        f"<span>{_when(f.last_seen)}</span></summary>\n"
    )
    out.append('<div class="d">\n')
    out.append(f"<p>{_srv(f.summary)}</p>\n")
    out.append('<dl class="facts">\n')
    out.append(f'<dt>finding id</dt><dd class="mono">{_t(f.id)}</dd>\n')
    out.append(f"<dt>first seen</dt><dd>{_when(f.first_seen)}</dd>\n")
    sweep = f' (sweep <span class="mono">{_t(f.last_sweep_id)}</span>)' if f.last_sweep_id else ""
    out.append(f"<dt>last seen</dt><dd>{_when(f.last_seen)}{sweep}</dd>\n")
    if f.resolved_at is not None:
        out.append(f"<dt>resolved</dt><dd>{_when(f.resolved_at)}</dd>\n")
    out.append(
        "<dt>approval</dt><dd>"
        + (_srv(f.approved_note) if f.approved_note else "not on the approved list")
        + "</dd>\n"
    )
    if f.owner is not None:
        queue = f", queue {f.owner.queue}" if f.owner.queue else ""
        out.append(
            f"<dt>owner</dt><dd>{_t(f.owner.name)} &lt;{_t(f.owner.contact)}&gt;{_t(queue)}</dd>\n"
        )
    else:
        out.append("<dt>owner</dt><dd>none listed (no owner range holds the address)</dd>\n")
    if f.origin:  # the DNS names the address was found under (a target source, issue 26)
        out.append(f"<dt>found as</dt><dd>{_srv('; '.join(f.origin))}</dd>\n")
    if whole is not None:
        out.append(f"<dt>seen from</dt><dd>{_t(whole.vantage)}</dd>\n")
        if whole.confirmation_token:
            out.append(
                f'<dt>canary token</dt><dd class="mono">{_t(whole.confirmation_token)}</dd>\n'
            )
    if fp is not None:
        if fp.banner:
            out.append(f'<dt>greeting</dt><dd class="mono">{_srv(fp.banner)}</dd>\n')
        if fp.software_guess is not None:  # the weighed guess and the signs it rests on
            out.append(f"<dt>software (a guess)</dt><dd>{_srv(describe(fp.software_guess))}</dd>\n")
        elif fp.software:
            out.append(f"<dt>software (a guess)</dt><dd>{_srv(fp.software)}</dd>\n")
        if fp.tls is not None and (fp.tls.protocol or fp.tls.error):
            tls = fp.tls
            text = ", ".join(
                x
                for x in (
                    tls.protocol,
                    tls.cipher,
                    f"subject {tls.subject}" if tls.subject else None,
                    f"issuer {tls.issuer}" if tls.issuer else None,
                    "self-signed" if tls.self_signed else None,
                    tls.error,
                )
                if x
            )
            out.append(f"<dt>TLS</dt><dd>{_srv(text)}</dd>\n")
    out.append("</dl>\n")
    fix = whole.remediation if whole is not None else f.remediation
    if fix is not None:
        # the vendors' pages as text, not links: the page points nowhere outside itself
        out.append("<h3>How to fix it</h3>\n")
        out += [
            f"<p><strong>{_t(heading)}.</strong> {_t(text)} Documentation: "
            f'<span class="mono">{_t(url)}</span></p>\n'
            for heading, text, url in advice(fix).sections
        ]
    changes = page.history.get(f.id, ())
    if changes:
        out.append("<h3>Status changes</h3>\n<ul>\n")
        out += [
            f"<li>{_when(c.at)}: {_t(c.transition.value)} (sweep "
            f'<span class="mono">{_t(c.sweep_id)}</span>)</li>\n'
            for c in changes
        ]
        out.append("</ul>\n")
    if whole is not None and whole.evidence:
        out.append(
            '<h3>Evidence: each test and the server\'s reply</h3>\n<div class="scroll">'
            '<table class="ev"><thead><tr><th>test</th><th>transport</th><th>MAIL FROM</th>'
            "<th>reply</th><th>RCPT TO</th><th>reply</th><th>outcome</th></tr></thead><tbody>\n"
        )
        for t in whole.evidence:
            mail = str(t.mail) if t.mail is not None else (t.error or "")
            rcpt = str(t.rcpt) if t.rcpt is not None else ""
            acc = ' class="acc"' if t.outcome.value == "accepted" else ""
            # 500 relays have 22 rows each: no markup a row can do without (.ev styles cells)
            out.append(
                f"<tr><td>{_t(t.test.id)}<br><i>{_t(t.test.role.value)}</i></td>"
                f"<td>{_t(t.transport.value)}</td><td>&lt;{_line(t.test.mail_from)}&gt;</td>"
                f"<td>{_line(mail)}</td><td>&lt;{_line(t.test.rcpt_to)}&gt;</td>"
                f"<td>{_line(rcpt)}</td><td{acc}>{_t(t.outcome.value)}</td></tr>\n"
            )
        out.append("</tbody></table></div>\n")
    if whole is not None and whole.transcript:
        out.append(
            f'<details class="tx"><summary>Transcript ({_plural(len(whole.transcript), "exchange")})'
            '</summary><pre class="srv">'
        )
        for ex in whole.transcript:
            if ex.command is not None:
                out.append(f"C: {_t(ex.command)}\n")
            if ex.reply is not None:
                replies = ex.reply.text.split("\n") or [""]
                for i, text in enumerate(replies):
                    sep = "-" if i < len(replies) - 1 else " "
                    out.append(f"S: {ex.reply.code}{sep}{_t(text)}\n")
            if ex.error is not None:
                out.append(f"!  {_t(ex.error)}\n")
        out.append("</pre></details>\n")
    out.append("</div>\n</details>\n")


def _changes(out: list[str], page: Page) -> None:
    r = page.report
    out.append(
        '<section id="changes" aria-labelledby="h-changes">\n<h2 id="h-changes">What changed</h2>\n'
    )
    if r.changes_note:
        out.append(f"<p>{_t(r.changes_note)}</p>\n</section>\n")
        return
    latest = [c for c in r.changes if c.sweep_id in page.latest]
    counts = Counter(c.transition for c in r.changes)
    last_counts = Counter(c.transition for c in latest)

    def said(counter: Counter[Transition]) -> str:
        parts = [f"{counter[t]:,} {t.value}" for t in Transition if counter.get(t)]
        return ", ".join(parts) if parts else "nothing"

    out.append(
        f"<p><b>Since the previous sweep</b> (the last sweep of each shard): {said(last_counts)}."
        f"<br><b>Since {_when(r.since)}</b>: {said(counts)}.</p>\n"
    )
    if not r.changes:
        out.append(
            "<p>No finding was new, reopened, raised in severity or resolved.</p>\n</section>\n"
        )
        return
    out.append(
        '<div class="scroll"><table><thead><tr><th>when</th><th>change</th><th>severity</th>'
        "<th>address:port</th><th>kind</th><th>title</th><th>sweep</th></tr></thead><tbody>\n"
    )
    for c in reversed(r.changes):  # newest first
        mark = " (last sweep)" if c.sweep_id in page.latest else ""
        out.append(
            f"<tr><td>{_when(c.at)}</td><td>{_t(c.transition.value)}</td>"
            f'<td class="sev-{c.severity.value}">{c.severity.value}</td>'
            f'<td class="mono"><a href="#{_a(c.finding_id)}">{_t(endpoint(c.address, c.port))}</a></td>'
            f"<td>{_t(c.kind.value)}</td><td>{_line(c.title)}</td>"
            f'<td><span class="mono">{_t(c.sweep_id)}</span>{mark}</td></tr>\n'
        )
    out.append("</tbody></table></div>\n</section>\n")


def _trend(out: list[str], page: Page) -> None:
    out.append(
        '<section id="trend" aria-labelledby="h-trend">\n<h2 id="h-trend">Open findings per kind '
        "over the sweeps</h2>\n"
    )
    series = page.series
    if len(series) < 2:
        out.append(
            "<p>Not enough history: the chart needs two completed sweeps in a state store "
            "(the daemon's, <code>relayaudit run</code>).</p>\n</section>\n"
        )
        return
    kinds = [k for k in FindingKind if any(point.get(k) for _, point in series)]
    top = max((n for _, point in series for n in point.values()), default=0)
    top = max(top, 1)
    step = _nice_step(top)
    ymax = step * -(-top // step)
    w, h, left, right, upper, lower = 760, 240, 48, 12, 12, 28
    pw, ph = w - left - right, h - upper - lower

    def x(i: int) -> float:
        return left + pw * i / (len(series) - 1)

    def y(v: int) -> float:
        return upper + ph * (1 - v / ymax)

    first, last = series[0][0], series[-1][0]
    out.append(
        f'<figure><svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-labelledby="trend-t trend-d">'
        f'<title id="trend-t">Open findings per kind at the end of each of the last '
        f"{len(series)} sweeps</title>"
        f'<desc id="trend-d">From {_t(first.strftime("%Y-%m-%d %H:%M"))} to '
        f"{_t(last.strftime('%Y-%m-%d %H:%M'))} UTC. Now: "
        + _t(", ".join(f"{series[-1][1].get(k, 0)} {k.value}" for k in kinds))
        + ".</desc>"
    )
    for v in range(0, ymax + 1, step):
        out.append(
            f'<line class="grid" x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v}</text>'
        )
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{upper}" y2="{upper + ph}"/>')
    out.append(
        f'<text x="{left}" y="{h - 8}">{_t(first.strftime("%Y-%m-%d"))}</text>'
        f'<text x="{w - right}" y="{h - 8}" text-anchor="end">{_t(last.strftime("%Y-%m-%d %H:%M"))} UTC</text>'
    )
    for n, k in enumerate(kinds):
        points = " ".join(f"{x(i):.1f},{y(p.get(k, 0)):.1f}" for i, (_, p) in enumerate(series))
        out.append(f'<polyline class="k-{k.value} dash{n % 4}" points="{points}"/>')
    out.append('</svg>\n<figcaption><ul class="legend">')
    for n, k in enumerate(kinds):
        out.append(
            f'<li><svg width="26" height="10" aria-hidden="true"><polyline class="k-{k.value} '
            f'dash{n % 4}" points="1,5 25,5"/></svg>{_t(k.value)}: '
            f"{series[-1][1].get(k, 0):,} now</li>"
        )
    out.append("</ul></figcaption></figure>\n")
    out.append(
        '<details><summary>The chart\'s numbers</summary><div class="scroll"><table>'
        "<thead><tr><th>sweep ended</th>"
        + "".join(f'<th class="n">{_t(k.value)}</th>' for k in kinds)
        + "</tr></thead><tbody>\n"
    )
    for end, point in reversed(series):
        out.append(
            f"<tr><td>{_when(end)}</td>"
            + "".join(f'<td class="n">{point.get(k, 0):,}</td>' for k in kinds)
            + "</tr>\n"
        )
    out.append("</tbody></table></div></details>\n</section>\n")


def _nice_step(top: int) -> int:
    """A grid step of 1, 2 or 5 times a power of ten giving at most 5 lines."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if top / (step * m) <= 5:
                return step * m
        step *= 10


@dataclass
class _Block:
    index: int
    services: set[tuple[str, int]] = field(default_factory=set)
    approved: set[tuple[str, int]] = field(default_factory=set)
    relays: set[tuple[str, int]] = field(default_factory=set)
    findings: int = 0


def _subnets(out: list[str], page: Page) -> None:
    ranges, _ = _nets_of(page)
    out.append(
        '<section id="subnets" aria-labelledby="h-subnets">\n<h2 id="h-subnets">Where: per '
        "subnet</h2>\n"
    )
    blocks: dict[str, _Block] = {}

    def block(address: str) -> _Block | None:
        ip = _ip(address)
        if ip is None:
            return None
        index, name = _block_of(ip, ranges)
        return blocks.setdefault(name, _Block(index))

    cfg = page.config
    today = approval_day(page.report.generated_at, local_zone())
    for s in page.services or ():
        b = block(s.address)
        if b is None:
            continue
        b.services.add((s.address, s.port))
        ip = _ip(s.address)
        if cfg is not None and ip is not None and cfg.is_approved(ip, s.port, day=today):
            b.approved.add((s.address, s.port))
    for f in page.report.findings:
        if not _open(f):
            continue
        b = block(f.address)
        if b is None:
            continue
        b.findings += 1
        if f.kind.is_relay:
            b.relays.add((f.address, f.port))
    explain = (
        "Each configured target range, split into /24s (IPv6: /64s) where a range is larger."
        if ranges
        else "Per /24 (IPv6: /64); the configured ranges are not known without --config."
    )
    known = page.services is not None
    out.append(
        f'<p class="muted">{explain} SMTP services and approved ones as the last sweep saw '
        "them; relays and findings are the open ones. Only subnets with a service or a finding "
        "are listed.</p>\n"
    )
    if not blocks:
        out.append("<p>No SMTP service and no open finding.</p>\n</section>\n")
        return
    top = max(max(len(b.services), b.findings) for b in blocks.values()) or 1
    hot = sorted(
        ((len(b.relays), name) for name, b in blocks.items() if b.relays), key=lambda x: -x[0]
    )[:5]
    if hot:
        out.append(
            "<p>Relays cluster in: "
            + ", ".join(f"<b>{_t(name)}</b> ({n})" for n, name in hot)
            + ".</p>\n"
        )
    groups: list[tuple[str, list[str]]] = []
    for i, net in enumerate(ranges):
        names = sorted((n for n, b in blocks.items() if b.index == i), key=_net_key)
        if names:
            groups.append((f"{net}", names))
    rest = sorted((n for n, b in blocks.items() if b.index < 0), key=_net_key)
    if rest:
        groups.append(("outside the configured targets" if ranges else "", rest))
    for title, names in groups:
        if title:
            out.append(f"<h3>{_t(title)}</h3>\n")
        out.append(
            '<div class="scroll"><table><thead><tr><th>subnet</th>'
            '<th class="n">SMTP services</th><th class="n">approved</th><th class="n">relays</th>'
            '<th class="n">open findings</th><th>services, relays</th><th></th></tr></thead><tbody>\n'
        )
        for name in names:
            b = blocks[name]
            wsvc = 120 * len(b.services) / top
            wrel = 120 * len(b.relays) / top
            wapp = 120 * len(b.approved) / top
            svc = f"{len(b.services):,}" if known else "?"
            app = f"{len(b.approved):,}" if known and cfg is not None else "?"
            hot_row = ' class="hot"' if b.relays else ""
            out.append(
                f'<tr{hot_row}><td class="mono">{_t(name)}</td>'
                f'<td class="n">{svc}</td><td class="n">{app}</td>'
                f'<td class="n">{len(b.relays):,}</td><td class="n">{b.findings:,}</td>'
                f'<td><svg class="bar" width="122" height="10" aria-hidden="true">'
                f'<rect class="b-svc" width="{wsvc:.1f}" height="10"/>'
                f'<rect class="b-app" width="{wapp:.1f}" height="4" y="6"/>'
                f'<rect class="b-rel" width="{wrel:.1f}" height="6"/></svg></td>'
                + (
                    f'<td><button type="button" class="link" data-net="b{_a(name)}">'
                    f"show findings</button></td>"
                    if b.findings
                    else "<td></td>"
                )
                + "</tr>\n"
            )
        out.append("</tbody></table></div>\n")
    out.append("</section>\n")


def _approved(out: list[str], page: Page) -> None:
    out.append(
        '<section id="approved" aria-labelledby="h-approved">\n<h2 id="h-approved">Approved '
        "services</h2>\n"
    )
    cfg = page.config
    if cfg is None:
        out.append("<p>Not known: give <code>--config FILE</code> to list them.</p>\n</section>\n")
        return
    if not cfg.approved:
        out.append("<p>The configuration approves no SMTP service.</p>\n</section>\n")
        return
    if page.services is None:
        out.append(
            '<p class="warn">No sweep completed yet: whether each approved service '
            "answers is not known.</p>\n"
        )
    out.append(
        '<div class="scroll"><table><thead><tr><th>address</th><th>port</th><th>owner</th>'
        "<th>note</th><th>expires</th><th>last sweep</th></tr></thead><tbody>\n"
    )
    stale = 0
    today = approval_day(page.report.generated_at, local_zone())
    for entry in cfg.approved:
        first = str(entry.address.network_address)
        owner = entry.owner or page.owner_of(first)
        wanted = page.report.owner_filter
        if wanted is not None and owner != (None if wanted == UNOWNED else wanted):
            continue  # another owner's service (report --owner / --unowned)
        seen = [
            s
            for s in page.services or ()
            if (ip := _ip(s.address)) is not None and entry.covers(ip, s.port)
        ]
        if page.services is None:
            state = "not known"
        elif seen:
            shown = ", ".join(f"{endpoint(s.address, s.port)} {s.status.value}" for s in seen[:5])
            more = f" and {len(seen) - 5:,} more" if len(seen) > 5 else ""
            state = f"seen: {_t(shown)}{more}"
        else:
            stale += 1
            state = '<b class="sev-high">not seen: stale?</b> No SMTP service answered here'
        if entry.expires is None:
            expires = "never"
        elif entry.valid_on(today):
            days = (entry.expires - today).days
            soon = f' <b class="sev-medium">({days} days left)</b>' if days <= 30 else ""
            expires = f"{_t(entry.expires.isoformat())}{soon}"
        else:
            expires = (
                f'<b class="sev-high">expired after {_t(entry.expires.isoformat())}</b>: its '
                "service is reported unapproved"
            )
        who = _t(owner) if owner is not None else "<i>no owner</i>"
        if entry.owner is None and owner is not None:
            who += " (the range's)"
        out.append(
            f'<tr><td class="mono">{_t(entry.address)}</td>'
            f"<td>{_t(entry.port if entry.port is not None else 'any')}</td>"
            f"<td>{who}</td><td>{_t(entry.note)}</td><td>{expires}</td>"
            f"<td>{state}</td></tr>\n"
        )
    out.append("</tbody></table></div>\n")
    if stale:
        out.append(
            f"<p>{_plural(stale, 'approval')} with no service seen in the last sweep: the "
            "service may be gone, and its approval stale.</p>\n"
        )
    out.append("</section>\n")


def _unowned(out: list[str], page: Page) -> None:
    """The SMTP services of the last sweep that no owner range holds (else the open findings'
    services): nobody can be sent their tickets until the owner table names someone."""
    if page.services is not None:
        services = sorted(
            {(s.address, s.port): s.status.value for s in page.services}.items(),
            key=lambda item: (_addr_key(item[0][0]), item[0][1]),
        )
        if page.owners is not None:
            services = [s for s in services if page.owner_of(*s[0]) is None]
        where = "the last sweep saw"
    else:
        seen = {
            (f.address, f.port): f.kind.value
            for f in page.report.findings
            if f.owner is None and _open(f)
        }
        services = sorted(seen.items(), key=lambda item: (_addr_key(item[0][0]), item[0][1]))
        where = "with an open finding"
    out.append(
        '<section id="unowned" aria-labelledby="h-unowned">\n<h2 id="h-unowned">SMTP services '
        f"with no owner: {len(services):,}</h2>\n"
    )
    if page.owners is None and page.services is not None:
        out.append(
            '<p class="warn">No owner table is known (<code>[[owners]]</code> or '
            "<code>owners_file</code>, docs/owners.md): nobody owns any service.</p>\n"
        )
    if not services:
        out.append(f"<p>Every SMTP service {where} has an owner.</p>\n</section>\n")
        return
    out.append(
        f'<p class="muted">SMTP services {where} that no owner range holds: add their ranges '
        "to the owner table so their findings reach someone.</p>\n"
        '<div class="scroll"><table><thead><tr><th>address:port</th><th>seen as</th>'
        "</tr></thead><tbody>\n"
    )
    for (address, port), what in services:
        out.append(
            f'<tr><td class="mono">{_t(endpoint(address, port))}</td><td>{_t(what)}</td></tr>\n'
        )
    out.append("</tbody></table></div>\n")
    if any(f.owner is None for f in page.report.findings):
        out.append(
            f'<p><button type="button" class="link" data-owner="{_NOBODY}">show the findings '
            "nobody owns</button></p>\n"
        )
    out.append("</section>\n")


def _addr_key(address: str) -> tuple[int, int]:
    ip = _ip(address)
    return (ip.version, int(ip)) if ip is not None else (9, 0)
