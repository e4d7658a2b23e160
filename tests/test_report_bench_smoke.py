"""Smoke test of bench/report_bench.py at a small size: it runs end to end and writes its figures.

The benchmark is not a test; this only keeps it working. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import require_browser

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.browser


@pytest.mark.time_limit(300)
def test_the_report_bench_runs_small(tmp_path: Path) -> None:
    require_browser()
    figures = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "report_bench.py"),
            *("--findings", "100", "--relays", "10", "--sweeps", "3"),
            *("--seconds", "5", "--repeat", "1", "--json", str(figures)),
        ],
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    doc = json.loads(figures.read_text(encoding="utf-8"))
    assert doc["browser"]["findings_in_page"] == 100
    assert doc["daemon_quiet"]["probe_rate"] > 0 and doc["daemon_report"]["pages"] > 0
    assert "probes/s" in proc.stdout and "file size, MB" in proc.stdout
