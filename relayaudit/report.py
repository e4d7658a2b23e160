"""Human-readable renderings: one probe's verdict with tests and transcript, and sweep summaries."""

from __future__ import annotations

from collections.abc import Iterable

from relayaudit.engine import SweepStats
from relayaudit.evidence import ProbeResult, TestOutcome, TestResult, endpoint
from relayaudit.verdict import Finding, Verdict, VerdictStatus

__all__ = ["render_check", "render_findings", "render_summary"]


def _reply(result: TestResult) -> str:
    if result.rcpt is not None:
        return f"{result.rcpt.code} {result.rcpt.text.splitlines()[0] if result.rcpt.text else ''}"
    if result.mail is not None:
        return f"MAIL {result.mail.code} {result.mail.text.splitlines()[0] if result.mail.text else ''}"
    return result.error or ""


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_findings(findings: Iterable[Finding]) -> list[str]:
    lines = []
    for f in findings:
        lines.append(
            f"  [{f.severity.value:8}] {f.kind.value:24} {f.id}  confidence {f.confidence.value}"
        )
        lines.append(f"             {f.title}")
        lines.append(f"             {f.summary}")
        if f.approved_note:
            lines.append(f"             approved: {f.approved_note}")
    return lines


def render_check(result: ProbeResult, verdict: Verdict, *, transcript: bool = True) -> str:
    lines = [
        f"{endpoint(result.address, result.port)}  {verdict.status.value.upper()}  (seen from {result.vantage})"
    ]
    lines.append(f"  {verdict.summary}")
    facts = result.facts
    if facts is not None:
        lines.append(f"  greeting: {facts.banner}")
        software = f"  software: {facts.software}" if facts.software else ""
        lines.append(
            f"  {'EHLO' if facts.ehlo else 'HELO only'}: {' '.join(facts.capabilities) or '-'}{software}"
        )
        if facts.auth_mechanisms:
            lines.append(f"  AUTH: {' '.join(facts.auth_mechanisms)}")
        tls = facts.tls
        if tls is not None:
            if tls.error:
                lines.append(f"  TLS: failed: {tls.error}")
            else:
                expiry = tls.not_after.date().isoformat() if tls.not_after else "?"
                lines.append(
                    f"  TLS: {tls.protocol} {tls.cipher}; subject {tls.subject}; issuer {tls.issuer}; "
                    f"expires {expiry}{'; self-signed' if tls.self_signed else ''}"
                )
    if verdict.findings:
        lines.append("findings:")
        lines.extend(render_findings(verdict.findings))
    if result.tests:
        lines.append("relay tests:")
        for t in result.tests:
            mark = "ACCEPTED" if t.outcome is TestOutcome.ACCEPTED else t.outcome.value
            lines.append(
                f"  {t.transport.value:12} {t.test.id:28} {mark:14} "
                f"{_clip('<' + t.test.mail_from + '> -> <' + t.test.rcpt_to + '>', 70):70} {_clip(_reply(t), 60)}"
            )
    conf = result.confirmation
    if conf is not None:
        state = {True: "ARRIVED", False: "did not arrive", None: "not known"}[conf.delivered]
        lines.append(
            f"confirmation: token {conf.token} via {conf.test_id} ({conf.transport.value}) to <{conf.rcpt_to}>: "
            f"sent={conf.sent} {state}{'; ' + conf.error if conf.error else ''}"
        )
    if transcript and result.transcript:
        lines.append("transcript:")
        for ex in result.transcript:
            if ex.command is not None:
                lines.append(f"  C: {ex.command}")
            if ex.reply is not None:
                for i, text in enumerate(ex.reply.text.splitlines() or [""]):
                    sep = "-" if i < len(ex.reply.text.splitlines()) - 1 else " "
                    lines.append(f"  S: {ex.reply.code}{sep}{text}")
            if ex.error is not None:
                lines.append(f"  !  {ex.error}")
    return "\n".join(lines)


def render_summary(stats: SweepStats) -> str:
    elapsed = ((stats.finished or stats.started) - stats.started).total_seconds()
    lines = [
        f"sweep: {stats.hosts} hosts, {stats.probes} address:port probes in {elapsed:.1f}s",
        "",
        f"  {'status':28} {'count':>7}",
    ]
    for status in VerdictStatus:
        if stats.statuses.get(status):
            lines.append(f"  {status.value:28} {stats.statuses[status]:>7}")
    if stats.findings:
        lines += ["", f"  {'finding kind':28} {'count':>7}"]
        for kind, count in sorted(stats.findings.items()):
            lines.append(f"  {kind:28} {count:>7}")
    return "\n".join(lines)
