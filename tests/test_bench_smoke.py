"""CI smoke test of the benchmark: `bench/run.py --quick --no-nmap` runs and writes the JSON report.

The benchmark is not a test; this only keeps it working. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_the_report(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--no-nmap",
            "--results-dir",
            str(tmp_path),
        ],
        check=False,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = sorted(tmp_path.glob("*.json"))
    assert len(reports) == 1, reports
    doc = json.loads(reports[0].read_text(encoding="utf-8"))

    for key in (
        "schema",
        "timestamp",
        "machine",
        "settings",
        "discovery",
        "profiles",
        "memory_check",
        "rate_check",
        "filtered",
        "table",
        "targets",
        "notes",
    ):
        assert key in doc, key
    assert doc["settings"]["mode"] == "quick"
    assert doc["discovery"]["nmap"] is None  # --no-nmap
    assert doc["discovery"]["relayaudit"]["returncode"] == 0
    assert doc["discovery"]["relayaudit"]["probes_per_s"] > 0
    assert set(doc["profiles"]) == {"instant", "realistic"}
    for name, profile in doc["profiles"].items():
        assert profile["servers"] == 20, name
        for part in ("campus", "relay", "agreement"):
            assert part in profile, (name, part)
        ra = profile["relay"]["relayaudit"]
        assert ra["returncode"] in (0, 1), ra  # 1: relays found
        assert ra["hosts_per_s"] > 0
        assert {"cpu_s", "peak_rss_mb", "wall_s"} <= set(ra)
        agreement = profile["agreement"]
        # every lab server answered and was seen (the verdicts themselves are the benchmark's job)
        assert agreement["open_ports"]["relayaudit_open_total"] == 20, agreement["open_ports"]
        assert agreement["relays"]["truth"] > 0
    assert {"configured_rate", "achieved_rate", "within_5pct"} <= set(doc["rate_check"])
    rows = doc["table"]
    assert rows and {"section", "metric", "relayaudit", "nmap", "ratio"} <= set(rows[0])
    assert "relayaudit vs nmap" in proc.stdout  # the printed table
