"""`report`, `show` and `--report` from the command line, on a real daemon's store and a real sweep."""

from __future__ import annotations

import csv
import io
import json
import shutil
import signal
from pathlib import Path

import jsonschema
from cli_runner import run_cli
from daemon_harness import DaemonProcess, base_config, write_config

from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.records import RECORD_SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent
PORT = 2726
NET = "127.0.53.0/29"
RELAY, CLOSED = "127.0.53.1", "127.0.53.2"


def _validator() -> jsonschema.protocols.Validator:
    path = ROOT / "schemas" / f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    return jsonschema.validators.validator_for(schema)(schema)


def _specs() -> list[ServerSpec]:
    return [
        ServerSpec(host=RELAY, port=PORT, behaviour=Behaviour.OPEN_RELAY),
        ServerSpec(host=CLOSED, port=PORT, behaviour=Behaviour.CLOSED),
    ]


async def test_a_daemons_store_reports_its_relays_and_shows_one_whole(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data = base_config(tmp_path, NET, PORT)
    data["schedule"] = {"interval": "1h"}
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab(_specs()):
        daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 60, "one sweep")
        await daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code(15) == 0
    # every line of the daemon's findings file validates; the store gave each its status
    lines = (tmp_path / "findings.jsonl").read_text(encoding="utf-8").splitlines()
    check = _validator()
    records = [json.loads(line) for line in lines]
    for record in records:
        check.validate(record)
    assert {r["status"] for r in records} == {"new"}
    relay = next(r for r in records if r["kind"] == "open-relay")
    assert relay["address"] == RELAY and relay["transition"] == "new"

    code, out, err = await run_cli("report", "--format", "csv", "--config", str(cfg))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    relays = [r for r in rows if r["kind"] == "open-relay"]
    assert [(r["address"], r["port"], r["status"]) for r in relays] == [(RELAY, str(PORT), "new")]
    assert relays[0]["id"] == relay["id"] and relays[0]["last_sweep_id"] == relay["sweep_id"]

    code, out, err = await run_cli(
        "report", "--format", "md", "--config", str(cfg), "--since", "1d"
    )
    assert code == 0, err
    assert "## Open findings" in out and f"{RELAY}:{PORT}" in out and "| new |" in out

    # the default: the HTML page, with the header the config and the store give it
    code, out, err = await run_cli(
        "report", "--config", str(cfg), "--output", str(tmp_path / "r.html")
    )
    assert (code, out) == (0, ""), err
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and f'id="{relay["id"]}"' in page
    assert f"{RELAY}:{PORT}" in page and NET in page  # the finding, and the targets
    assert "scanner healthy" in page and relay["sweep_id"] in page  # the shard's last sweep

    code, out, err = await run_cli("show", relay["id"], "--config", str(cfg))
    assert code == 0, err
    assert relay["title"] in out and "status changes:" in out and "transcript:" in out
    assert "RCPT TO:<" in out and "first seen:" in out
    code, out, err = await run_cli("show", relay["id"], "--config", str(cfg), "--json")
    shown = json.loads(out)
    assert shown["finding"]["id"] == relay["id"] and shown["changes"][0]["transition"] == "new"

    code, out, err = await run_cli("show", "ra-0000000000000000", "--config", str(cfg))
    assert code == 2 and "no finding 'ra-0000000000000000'" in err


async def test_sweep_report_writes_the_runs_findings_in_the_suffixs_format(tmp_path: Path) -> None:
    data = base_config(tmp_path, NET, PORT)
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    async with Lab(_specs()):
        code, _, err = await run_cli(
            "sweep", "--config", str(cfg), "--report", str(tmp_path / "report.csv")
        )
    assert code == 1, err  # a relay was found
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    assert [r["address"] for r in rows if r["kind"] == "open-relay"] == [RELAY]
    assert all(r["status"] == "" for r in rows)  # no state store: no lifecycle status
    code, _, err = await run_cli("sweep", "--config", str(cfg), "--report", "x.txt")
    assert code == 2 and "--report: cannot tell the format of 'x.txt'" in err
    for processes in ("1", "2"):  # the HTML page: the findings and the services it saw
        report = tmp_path / f"report-{processes}.html"
        async with Lab(_specs()):
            code, _, err = await run_cli(
                "sweep", "--config", str(cfg), "--processes", processes, "--report", str(report)
            )
        assert code == 1, err
        page = report.read_text(encoding="utf-8")
        assert f"{RELAY}:{PORT}" in page and "one-off sweep" in page
        assert "2</b>SMTP services in the last sweep" in page  # the relay and the closed server


async def test_report_needs_a_store_and_a_valid_since(tmp_path: Path) -> None:
    code, _, err = await run_cli("report")
    assert code == 2 and "--state FILE" in err
    code, _, err = await run_cli("report", "--state", str(tmp_path / "x.sqlite"), "--since", "soon")
    assert code == 2 and ("does not exist" in err or "--since" in err)


async def test_read_only_commands_read_a_release_one_store(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    shutil.copy(Path(__file__).parent / "data" / "state-v1.sqlite", path)
    for command in (("findings",), ("report", "--format", "csv"), ("outbox",)):
        code, out, err = await run_cli(*command, "--state", str(path))
        assert code == 0, (command, err)
        assert "not a relayaudit state file" not in err
    code, out, _ = await run_cli("findings", "--state", str(path), "--json")
    assert len(json.loads(out)) == 19  # every finding of the 0.1.0 store
