"""The HTML report at campus size: render time and file size, filters in headless Chromium, and
the daemon's /metrics and probe rate while it renders the live page.

    .venv/bin/python bench/report_bench.py [--findings 5000] [--relays 500] [--sweeps 50]
                                           [--rate 2000] [--seconds 20] [--json PATH]

1. Builds a state store through StateStore's own API: `--findings` findings (`--relays` of them
   relay-class, each carrying the evidence and transcript of a real probe of a lab open relay),
   spread over `--sweeps` sweeps six hours apart, with findings resolved and reopened on the way;
   the last sweep sees every finding.
2. Times `relayaudit report --config FILE --output report.html` (a fresh process, as an analyst
   runs it) and, in this process, reading the store and rendering; prints the file's size.
3. Opens the file in Debian's chromium (Playwright, every outside request refused) and times
   each filter: from the input event to the list laid out again (performance.now in the page).
4. Runs the daemon on a copy of the store, sweeping a loopback range of closed ports at
   `--rate`, twice for `--seconds`: once with only /metrics polled (every 0.1 s), once while a
   client also asks for `/` after a SIGHUP each time (each SIGHUP makes the next page render
   afresh, so the daemon renders the 5,000-finding page over and over). Prints /metrics latency
   and the probe rate of both runs side by side.

Loopback only: the findings are data (127.82.0.0/16), the lab relay probed once listens on
127.0.192.1, the daemon sweeps 127.83.0.0/16 where nothing listens. Every wait is bounded.
Nothing is written into the repository (a temporary directory; `--json` writes the figures
where you say).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import browser_missing, launched, open_page

from relayaudit.config import parse_config
from relayaudit.engine import sweep
from relayaudit.evidence import PortState, ProbeResult, ProbeStatus
from relayaudit.html_page import page_from_stores
from relayaudit.html_report import render_html
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.progress import SweepStats
from relayaudit.sinks import Collector
from relayaudit.state import StateStore
from relayaudit.verdict import (
    Confidence,
    Finding,
    FindingKind,
    Severity,
    Verdict,
    VerdictStatus,
    finding_id,
)

ROOT = Path(__file__).resolve().parent.parent
DATA_NET = "127.82"  # the findings' addresses: data only, nothing connects to them
LAB_HOST, LAB_PORT = "127.0.192.1", 2792
SWEEP_NET, SWEEP_PORT = "127.83.0.0/16", 2793  # the daemon's sweep: nothing listens there
GAP = timedelta(hours=6)
OTHER_KINDS = (
    (FindingKind.UNAPPROVED_SMTP, Severity.MEDIUM),
    (FindingKind.AUTH_WITHOUT_TLS, Severity.MEDIUM),
    (FindingKind.ACCEPTS_WITHOUT_DELIVERY, Severity.LOW),
)
RELAY_KINDS = (FindingKind.OPEN_RELAY, FindingKind.RELAY_CAMPUS_SENDER)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- 1. the store ----------------------------------------------------------------------------------


async def real_relay() -> Finding:
    """One real probe of a lab open relay: its finding carries a real battery and transcript."""
    config = parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": [f"{LAB_HOST}/32"],
            "ports": [LAB_PORT],
            "identity": {"helo_name": "relayaudit.campus.test"},
            "relay": {"campus_domains": ["campus.test"]},
            "timeouts": {"connect": "1s", "command": "3s", "session": "30s"},
        }
    )
    collector = Collector()
    spec = ServerSpec(LAB_HOST, LAB_PORT, Behaviour.OPEN_RELAY)
    async with Lab([spec], local_domains=("campus.test",), campus_domains=("campus.test",)):
        await asyncio.wait_for(sweep(config, sinks=[collector]), 60)
    return next(f for f in collector.findings if f.kind is FindingKind.OPEN_RELAY)


def address(i: int) -> str:
    return f"{DATA_NET}.{i // 200}.{i % 200 + 1}"


def finding(template: Finding, i: int, relays: int, findings: int, when: datetime) -> Finding:
    addr = address(i)
    if i < relays:  # relay-class, whole: evidence and transcript of the real probe
        kind = RELAY_KINDS[i % 2]
        confirmed = i % 4 == 0
        return template.model_copy(
            update={
                "id": finding_id(kind, addr, 25),
                "kind": kind,
                "severity": Severity.CRITICAL if confirmed else Severity.HIGH,
                "confidence": Confidence.CONFIRMED if confirmed else Confidence.HIGH,
                "address": addr,
                "port": 25,
                "title": f"Open relay on {addr}:25",
                "observed_at": when,
            }
        )
    kind, severity = OTHER_KINDS[i % 3]
    return Finding(
        id=finding_id(kind, addr, 25),
        kind=kind,
        severity=severity,
        confidence=template.confidence,
        address=addr,
        port=25,
        vantage="127.0.0.1",
        title=f"{kind.value} on {addr}:25",
        summary=f"An SMTP server answers on {addr}:25 (220 mx-{i}.campus.test ESMTP).",
        observed_at=when,
        fingerprint=template.fingerprint,
    )


def observe(f: Finding | None, addr: str, when: datetime) -> tuple[ProbeResult, Verdict]:
    result = ProbeResult(
        address=addr,
        port=25,
        vantage="127.0.0.1",
        started=when,
        finished=when,
        port_state=PortState.OPEN,
        status=ProbeStatus.SMTP,
    )
    status = (
        VerdictStatus.RELAY_REFUSED
        if f is None
        else VerdictStatus.OPEN_RELAY
        if f.kind.is_relay
        else VerdictStatus.RELAY_REFUSED
    )
    verdict = Verdict(
        address=addr, port=25, status=status, summary="bench", findings=(f,) if f else ()
    )
    return result, verdict


def order(findings: int, relays: int) -> list[int]:
    """The finding indexes in the order they first appear: relays spread over the sweeps."""
    step = max(1, findings // max(relays, 1))
    first = list(range(relays))
    rest = list(range(relays, findings))
    out: list[int] = []
    while first or rest:
        if first:
            out.append(first.pop(0))
        out.extend(rest[: step - 1])
        del rest[: step - 1]
    return out


def build_store(path: Path, template: Finding, findings: int, relays: int, sweeps: int) -> None:
    """`sweeps` sweeps, GAP apart, ending now; every sweep brings findings/sweeps new ones,
    resolves a few and reopens a few; the last one sees every finding."""
    start = datetime.now(UTC) - GAP * sweeps
    clock = {"now": start}
    seen_order = order(findings, relays)
    per_sweep = -(-findings // (sweeps - 1))
    with StateStore(path, resolve_after=1, clock=lambda: clock["now"]) as store:
        for k in range(sweeps):
            at = start + GAP * k
            clock["now"] = at
            rec = store.begin_sweep(shard="0/1", config_fingerprint="bench", total=65536)
            if k == sweeps - 1:
                batch = list(range(findings))  # the last sweep sees every finding (ongoing)
                gone: list[int] = []
            else:
                batch = seen_order[k * per_sweep : (k + 1) * per_sweep]
                earlier = seen_order[: k * per_sweep]
                gone = earlier[-(7 * k) % max(len(earlier), 1) :][:20] if k % 3 == 0 else []
                back = earlier[:10] if k % 5 == 4 else []
                batch = batch + back
            for i in gone:
                store.record(rec.id, *observe(None, address(i), at))
            for i in batch:
                f = finding(template, i, relays, findings, at)
                store.record(rec.id, *observe(f, f.address, at))
            stats = SweepStats(started=at, probes=65536 * 3, hosts=65536)
            stats.statuses[VerdictStatus.CLOSED] = 65536 * 3 - len(batch) - len(gone)
            stats.statuses[VerdictStatus.RELAY_REFUSED] = len(gone)
            stats.statuses[VerdictStatus.OPEN_RELAY] = len(batch)
            stats.finished = at + timedelta(minutes=20)
            store.complete_sweep(rec.id, stats)


def config_text(state: Path, out: Path, metrics_port: int, rate: float) -> str:
    return f"""scope = ["127.82.0.0/15"]
targets = ["127.82.0.0/19", "{SWEEP_NET}"]
ports = [{SWEEP_PORT}]
[identity]
helo_name = "relayaudit.campus.test"
[timeouts]
connect = "1s"
command = "2s"
session = "10s"
[limits]
concurrency = 512
rate = {rate}
subnet_rate = {rate}
[[approved]]
address = "{address(1)}"
port = 25
note = "ISO-0001 campus mail hub"
[[approved]]
address = "{DATA_NET}.30.0/24"
note = "ISO-0002 retired servers"
[state]
path = "{state}"
resolve_after = 1
[schedule]
interval = "1h"
[output]
findings = "{out / "findings.jsonl"}"
[logging]
file = "{out / "daemon.jsonl"}"
stdout = false
[metrics]
listen = "127.0.0.1:{metrics_port}"
"""


# -- 2. rendering ------------------------------------------------------------------------------


def time_cli(cfg: Path, out: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "relayaudit", "report", "--config", str(cfg), "--output", str(out)],
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    return time.monotonic() - started


# -- 3. the browser -----------------------------------------------------------------------------

FILTER_JS = """([sel, value]) => {
  const el = document.querySelector(sel);
  const t0 = performance.now();
  el.value = value;
  el.dispatchEvent(new Event(sel === '#f-text' ? 'input' : 'change', {bubbles: true}));
  document.body.offsetHeight;  // the layout of the filtered list, inside the timing
  return [performance.now() - t0, document.querySelector('#shown').value];
}"""


def browse(report: Path, repeat: int) -> dict[str, Any]:
    filters = (
        ("text search (one address)", "#f-text", "127.82.7.19:25", ""),
        ("text search (a /24's prefix)", "#f-text", "127.82.1.", ""),
        ("kind = open-relay", "#f-kind", "open-relay", ""),
        ("severity = critical", "#f-sev", "critical", ""),
        ("subnet = one /24", "#f-net", "b127.82.3.0/24", ""),
        ("status = all", "#f-status", "all", "open"),
    )
    out: dict[str, Any] = {}
    with launched() as browser:
        started = time.monotonic()
        o = open_page(browser, report.resolve().as_uri(), viewport={"width": 1280, "height": 900})
        out["load_s"] = time.monotonic() - started
        out["findings_in_page"] = o.page.locator("#list > details.f").count()
        for name, selector, value, back in filters:
            times, shown = [], ""
            for _ in range(repeat):  # bounded: `repeat` applications, then the reset
                ms, shown = o.page.evaluate(FILTER_JS, [selector, value])
                times.append(ms)
                o.page.evaluate(FILTER_JS, [selector, back])
            out[name] = {
                "median_ms": statistics.median(times),
                "max_ms": max(times),
                "shown": shown,
            }
        o.assert_clean()
        o.page.context.close()
    return out


# -- 4. the daemon ------------------------------------------------------------------------------


def get(url: str, timeout: float) -> tuple[int, int, float]:
    """(status, bytes, seconds) of one GET, no proxies."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.monotonic()
    with opener.open(url, timeout=timeout) as response:
        body = response.read()
        return response.status, len(body), time.monotonic() - started


def probes_total(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("relayaudit_probes_total{")
    )


def metrics(port: int) -> tuple[float, float]:
    """(seconds the GET took, probes so far)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started = time.monotonic()
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return time.monotonic() - started, probes_total(text)


def events(path: Path, name: str) -> Iterator[dict[str, Any]]:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == name:
                yield e


def daemon_run(
    store: Path, work: Path, rate: float, seconds: float, with_report: bool
) -> dict[str, Any]:
    """One daemon on a fresh copy of the store; polls /metrics, and asks for / if told to."""
    from loopback import free_port  # noqa: PLC0415

    work.mkdir(parents=True)
    state = work / "state.sqlite"
    shutil.copy(store, state)
    port = free_port()
    cfg = work / "relayaudit.toml"
    cfg.write_text(config_text(state, work, port, rate), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayaudit", "run", "--config", str(cfg)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latencies: list[float] = []
    samples: list[tuple[float, float]] = []
    pages: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 60
        while not any(events(work / "daemon.jsonl", "sweep.start")):
            if time.monotonic() > deadline or proc.poll() is not None:
                why = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"daemon did not start a sweep: {why}")
            time.sleep(0.1)
        time.sleep(1.0)  # past start-up: the pacer at its rate

        async def poll() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # bounded by time; 10 polls a second
                took, probes = await asyncio.to_thread(metrics, port)
                latencies.append(took)
                samples.append((time.monotonic(), probes))
                await asyncio.sleep(0.1)

        async def pages_loop() -> None:
            end = time.monotonic() + seconds
            for _ in range(10_000):  # bounded by count and time
                if time.monotonic() >= end:
                    return
                os.kill(proc.pid, signal.SIGHUP)  # the next page renders afresh
                await asyncio.sleep(0.05)
                status, size, took = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/", 120)
                assert status == 200
                pages.append((took, size))

        async def both() -> None:
            tasks = [poll()] + ([pages_loop()] if with_report else [])
            await asyncio.gather(*tasks)

        asyncio.run(both())
        done = list(events(work / "daemon.jsonl", "sweep.summary"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (t0, p0), (t1, p1) = samples[0], samples[-1]
    return {
        "probe_rate": (p1 - p0) / (t1 - t0),
        "metrics_median_ms": statistics.median(latencies) * 1000,
        "metrics_p95_ms": sorted(latencies)[int(len(latencies) * 0.95) - 1] * 1000,
        "metrics_max_ms": max(latencies) * 1000,
        "metrics_polls": len(latencies),
        "pages": len(pages),
        "page_median_s": statistics.median(t for t, _ in pages) if pages else None,
        "page_bytes": pages[0][1] if pages else None,
        "sweep_ended_early": bool(done),
    }


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--findings", type=int, default=5000, choices=range(100, 20001), metavar="100-20000"
    )
    parser.add_argument("--relays", type=int, default=500)
    parser.add_argument("--sweeps", type=int, default=50, choices=range(2, 201), metavar="2-200")
    parser.add_argument("--rate", type=float, default=2000.0, help="the daemon's limits.rate")
    parser.add_argument("--seconds", type=float, default=20.0, help="each daemon run's window")
    parser.add_argument("--repeat", type=int, default=5, help="applications of each filter")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not 0 <= args.relays <= args.findings:
        parser.error("--relays must be between 0 and --findings")
    if not 5 <= args.seconds <= 120:
        parser.error("--seconds must be between 5 and 120")
    missing = browser_missing()
    if missing is not None:
        parser.error(missing)
    figures: dict[str, Any] = {
        "findings": args.findings,
        "relays": args.relays,
        "sweeps": args.sweeps,
    }
    fast = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs: the fsyncs are free
    with tempfile.TemporaryDirectory(prefix="relayaudit-report-bench-", dir=fast) as tmp:
        work = Path(tmp)
        log("probing one lab open relay for a real finding ...")
        template = asyncio.run(real_relay())
        store = work / "bench.sqlite"
        started = time.monotonic()
        log(
            f"building a store: {args.findings} findings, {args.relays} relays, {args.sweeps} sweeps ..."
        )
        build_store(store, template, args.findings, args.relays, args.sweeps)
        figures["store_build_s"] = time.monotonic() - started
        figures["store_bytes"] = store.stat().st_size
        cfg = work / "report.toml"
        cfg.write_text(config_text(store, work, 9425, args.rate), encoding="utf-8")
        report = work / "report.html"
        log("relayaudit report (3 runs, a fresh process each) ...")
        figures["cli_s"] = statistics.median(time_cli(cfg, report) for _ in range(3))
        figures["html_bytes"] = report.stat().st_size
        config = parse_config(
            __import__("tomllib").loads(cfg.read_text(encoding="utf-8")), source=str(cfg)
        )
        t0 = time.monotonic()
        page = page_from_stores([store], since=timedelta(days=7), config=config)
        t1 = time.monotonic()
        html = render_html(page)
        t2 = time.monotonic()
        figures["read_store_s"], figures["render_s"] = t1 - t0, t2 - t1
        figures["chart_points"] = len(page.series)
        log("filters in headless Chromium ...")
        figures["browser"] = browse(report, args.repeat)
        del html
        log(f"daemon: {args.seconds:g} s without report requests ...")
        figures["daemon_quiet"] = daemon_run(store, work / "quiet", args.rate, args.seconds, False)
        log(f"daemon: {args.seconds:g} s rendering / over and over ...")
        figures["daemon_report"] = daemon_run(store, work / "busy", args.rate, args.seconds, True)
    show(figures, args)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def show(f: dict[str, Any], args: argparse.Namespace) -> None:
    mb = 1024 * 1024
    row = "  {:58} {:>12} {:>12}   {}"
    print(
        f"HTML report of a store with {f['findings']:,} findings ({f['relays']:,} relay-class "
        f"with transcripts) and {f['sweeps']} sweeps ({f['store_bytes'] / mb:.1f} MB)"
    )
    print(
        row.format("relayaudit report --config, fresh process, s", f"{f['cli_s']:.2f}", "", "< 5")
    )
    print(row.format("  of which: read the store, s", f"{f['read_store_s']:.2f}", "", ""))
    print(row.format("  of which: render the page, s", f"{f['render_s']:.2f}", "", ""))
    print(row.format("file size, MB", f"{f['html_bytes'] / mb:.2f}", "", "< 20"))
    b = f["browser"]
    print(f"headless Chromium: load {b['load_s']:.2f} s, {b['findings_in_page']:,} findings")
    print(row.format("filter (input to layout done), ms", "median", "max", "issue: < 200"))
    for name, v in b.items():
        if isinstance(v, dict):
            median, most = f"{v['median_ms']:.1f}", f"{v['max_ms']:.1f}"
            print(row.format(f"{name}: {v['shown']}", median, most, ""))
    q, r = f["daemon_quiet"], f["daemon_report"]
    change = r["probe_rate"] / q["probe_rate"] - 1
    print(f"daemon sweeping {SWEEP_NET} at limits.rate = {args.rate:g}/s, {args.seconds:g} s each:")
    print(row.format("", "no report", "rendering /", "issue"))
    rate_q, rate_r = f"{q['probe_rate']:.0f}", f"{r['probe_rate']:.0f}"
    print(row.format("probes/s", rate_q, rate_r, f"{change:+.1%} (within 5 %)"))
    for key, label in (
        ("metrics_median_ms", "/metrics median, ms"),
        ("metrics_p95_ms", "/metrics p95, ms"),
        ("metrics_max_ms", "/metrics max, ms"),
    ):
        print(row.format(label, f"{q[key]:.1f}", f"{r[key]:.1f}", "< 200"))
    print(row.format("/metrics polls", q["metrics_polls"], r["metrics_polls"], ""))
    if r["pages"]:
        each = f"median {r['page_median_s']:.2f} s each, {r['page_bytes'] / mb:.1f} MB"
        print(row.format("pages rendered afresh and served", "", r["pages"], each))


if __name__ == "__main__":
    main()
