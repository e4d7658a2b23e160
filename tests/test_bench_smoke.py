"""CI smoke test of the benchmark: `bench/run.py --quick --no-nmap` runs and writes the JSON report.

The benchmark is not a test; this only keeps it working. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`bench/run.py ARGS` as a child of this checkout (`path`: its PATH)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), *args],
        check=False,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_quick_writes_the_report(tmp_path: Path) -> None:
    proc = _bench("--quick", "--no-nmap", "--results-dir", str(tmp_path))
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


def test_the_client_cpu_bound_divides_the_cores_by_a_hosts_cpu() -> None:
    """The instant bound line: cores x hosts / (client CPU + lab CPU), with the profile's
    heaviest frames named; no line without nmap's rate to compare with."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = run  # its dataclasses look their module up
    sys.path.insert(0, str(REPO / "bench"))  # its own imports (agreement, lab) are beside it
    try:
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(REPO / "bench"))
    relay = {
        "hosts": 1000,
        "relayaudit": {"cpu_s": 3.0, "lab_cpu_s": 1.0, "hosts_per_s": 400.0},
        "nmap": {"hosts_per_s": 800.0},
    }
    top = [{"frame": "record (relayaudit/session.py)", "samples": 90, "pct": 9.0}]
    doc = {
        "machine": {"cpus": 2},
        "profiles": {"instant": {"relay": relay, "py_spy": {"top_own": top}}},
    }
    bound = run.bounds(doc)["instant_client_cpu"]
    assert bound["best_hosts_per_s"] == 500.0 and bound["best_ratio"] == 0.62
    assert bound["text"].endswith("py-spy, own time: record (relayaudit/session.py) 9 %")
    del relay["nmap"]
    assert "instant_client_cpu" not in run.bounds(doc)


def test_the_serial_floor_counts_the_start_up_before_the_slowest_host() -> None:
    """Realistic without tarpits: the run takes at least its start-up and exit plus the slowest
    host's serial exchanges (before, the bound left the start-up out and promised more)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = run
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(run)
    finally:
        sys.path.remove(str(REPO / "bench"))
    ra: dict[str, object] = {"slowest_host_exchanges_s": 1.75}
    rest = {"hosts": 1000, "relayaudit": ra, "nmap": {"hosts_per_s": 50.0}}
    doc = {
        "machine": {"cpus": 2},
        "relayaudit_startup": {"wall_s": 0.25},
        "settings": {"relayaudit": {"sessions_per_host": 1}},
        "profiles": {"realistic": {"relay": {"without_tarpits": rest}}},
    }
    floor = run.bounds(doc)["realistic_serial_floor"]
    assert floor["best_hosts_per_s"] == 500.0 and floor["best_ratio"] == 10.0
    assert "start-up and exit outside the sweep 0.25 s" in floor["text"]
    # the run's own: its wall time less its sweep's
    ra.update({"wall_s": 2.2, "summary": {"elapsed_s": 1.8}})
    floor = run.bounds(doc)["realistic_serial_floor"]
    assert floor["startup_wall_s"] == 0.4 and floor["best_hosts_per_s"] == round(1000 / 2.15, 1)


def test_the_two_tools_runs_alternate(tmp_path: Path) -> None:
    """Issue 25 asks for medians of alternating runs: relayaudit's run i, then nmap's run i
    (the machine's speed drifts; the runs once went all of relayaudit's, then all of nmap's).
    nmap here is a stand-in on PATH that writes nothing: only the order is looked at."""
    fake = tmp_path / "bin"
    fake.mkdir()
    nmap = fake / "nmap"
    nmap.write_text('#!/bin/sh\necho "Nmap version 7.93 ( stand-in )"\n', encoding="utf-8")
    nmap.chmod(0o755)
    proc = _bench(
        "--quick",
        "--repeat",
        "2",
        "--profile",
        "instant",
        "--results-dir",
        str(tmp_path / "out"),
        path=f"{fake}:{os.environ['PATH']}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    done = [
        line.split(":")[0].removeprefix("== ")
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith("== ") and "s wall," in line
    ]
    for phase in ("discovery", "instant-relay"):
        runs = [name for name in done if name.startswith(f"{phase}-") and name[-2] == "-"]
        assert runs == [
            f"{phase}-relayaudit-1",
            f"{phase}-nmap-1",
            f"{phase}-relayaudit-2",
            f"{phase}-nmap-2",
        ], done
