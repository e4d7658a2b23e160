"""Tests for relayaudit.cli: exit codes and exact messages of each subcommand; loopback only."""

from __future__ import annotations

import argparse
import csv
import io
import ipaddress
import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from cli_runner import (
    run_cli,
    run_cli_blocking,
    run_cli_into_closed_pipe,
    run_cli_into_head,
    run_main,
)
from factories import ADDR, T0, make_finding, observe, one_sweep
from loopback import free_port

from relayaudit import demo
from relayaudit.cli import _parser
from relayaudit.config import load_config
from relayaudit.demo import CANARY_DOMAIN
from relayaudit.errors import ExitCode
from relayaudit.evidence import Exchange, Reply
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.owners import load_owners
from relayaudit.records import RECORD_SCHEMA_VERSION
from relayaudit.state import StateStore
from relayaudit.verdict import Confidence, FindingKind, Severity

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "relayaudit.example.toml"
LAB = ROOT / "config" / "lab.toml"
DOC_CONFIG = 'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
RELAY_KINDS = {"open-relay", "relay-campus-sender", "relay-after-starttls"}  # what `sweep` lists


pytestmark = pytest.mark.usefixtures("loopback_only", "fixed_width")


@pytest.fixture
def doc_config(tmp_path: Path) -> Path:
    path = tmp_path / "doc.toml"
    path.write_text(DOC_CONFIG, encoding="utf-8")
    return path


# -- usage errors ----------------------------------------------------------------------------


def _top_usage() -> tuple[str, list[str]]:
    """The top-level usage text (it lists every subcommand, so it grows) and the subcommands."""
    usage = _parser().format_usage()
    match = re.search(r"\{([a-z,]+)\}", usage)
    assert match is not None, usage
    return usage, match.group(1).split(",")


def test_unknown_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    usage, commands = _top_usage()
    assert {"check", "sweep", "config", "demo"} <= set(commands)
    code, out, err = run_main(capsys, "frobnicate")
    assert (code, out) == (2, "")
    error = "relayaudit: error: argument command: invalid choice: 'frobnicate' (choose from "
    # Python 3.12.8+ and 3.13.1+ stopped quoting the choices
    assert err in {
        usage + error + ", ".join(f"'{c}'" for c in commands) + ")\n",
        usage + error + ", ".join(commands) + ")\n",
    }


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (empty for a command that has none)."""
    return next(
        (
            dict(action.choices)
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
        ),
        {},
    )


def _groups() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """`relayaudit` and every command group under it (a command with subcommands)."""
    top = _parser()
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {(): top}
    for name, sub in _subparsers(top).items():
        if _subparsers(sub):
            found[(name,)] = sub
    return found


def test_every_command_group_is_found() -> None:
    assert {(), ("config",), ("canary",), ("deploy",)} <= set(_groups())


@pytest.mark.parametrize("group", list(_groups()), ids=lambda g: " ".join(("relayaudit", *g)))
def test_a_bare_command_group_prints_its_help_and_exits_2(
    capsys: pytest.CaptureFixture[str], group: tuple[str, ...]
) -> None:
    code, out, err = run_main(capsys, *group)
    assert (code, out) == (2, "")
    parser = _groups()[group]
    assert err == parser.format_help()
    assert "_command" not in err and "required" not in err
    assert all(name in err for name in _subparsers(parser))  # every subcommand it has


def _sweep_usage() -> str:
    """sweep's usage as the parser writes it (it grows with each option, e.g. --targets-file)."""
    return _subparsers(_parser())["sweep"].format_usage()


def test_sweep_without_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "sweep") == (
        2,
        "",
        _sweep_usage() + "relayaudit: error: the following arguments are required: --config\n",
    )


def test_check_port_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check", "--port", "smtp", "127.0.0.1")
    assert (code, out) == (2, "")
    assert err.endswith("relayaudit: error: argument --port: invalid int value: 'smtp'\n")


# -- sweep -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("3/3", "--shard: '3/3' index must be below the shard count 3"),
        ("x", "--shard: 'x' is not of the form i/n"),
        ("1/0", "--shard: '1/0' shard count must be at least 1"),
    ],
)
def test_sweep_bad_shard(
    capsys: pytest.CaptureFixture[str], doc_config: Path, shard: str, message: str
) -> None:
    # the shard is parsed before anything is opened or connected
    assert run_main(capsys, "sweep", "--config", str(doc_config), "--shard", shard) == (
        2,
        "",
        f"relayaudit: {message}\n",
    )


def test_sweep_bad_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(DOC_CONFIG + "ports = [25, 25]\n", encoding="utf-8")
    assert run_main(capsys, "sweep", "--config", str(path)) == (
        ExitCode.CONFIG,
        "",
        f"relayaudit: {path}: ports: line 3: [25, 25] lists a port twice\n",
    )


# -- config check ----------------------------------------------------------------------------


def test_config_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert run_main(capsys, "config", "check", str(path)) == (
        ExitCode.CONFIG,
        "",
        f"relayaudit: {path}: no such file\n",
    )


def test_config_check_bad_file_lists_every_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["198.51.100.0/24"]\n[limits]\nrate = 0\n',
        encoding="utf-8",
    )
    assert run_main(capsys, "config", "check", str(path)) == (
        ExitCode.CONFIG,
        "",
        f"relayaudit: {path}: limits.rate: line 4: Input should be greater than 0 (got 0)\n"
        # a bad field no longer hides the scope check (issue 32): every problem, a line each
        f"relayaudit: {path}: targets[0]: line 2: '198.51.100.0/24' is outside scope "
        "(192.0.2.0/24)\n",
    )


def test_config_check_example_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "config", "check", str(EXAMPLE))
    assert (code, err) == (0, "")
    assert out == (
        f"{EXAMPLE}: valid\n"
        "  target range                                addresses\n"
        "  192.0.2.0/24                                      240\n"  # 256 minus 192.0.2.240/28
        "  198.51.100.0/25                                    64\n"  # 128 minus 198.51.100.64/26
        "  2001:db8:25::/120                                 256\n"
        "  total (after exclusions)                          560\n"
        "  ports 25, 465, 587: 1680 address:port probes per sweep\n"
        "  approved services: 3\n"
    )


def test_config_check_lab_counts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "config", "check", str(LAB))
    assert (code, err) == (0, "")
    assert out == (
        f"{LAB}: valid\n"
        "  target range                                addresses\n"
        "  127.0.10.0/28                                      15\n"  # minus the canary's .14
        "  total (after exclusions)                           15\n"
        "  ports 2525, 4650: 30 address:port probes per sweep\n"
        "  approved services: 1\n"
        f"  owners: 2 (3 ranges; table {load_owners(load_config(LAB)).digest})\n"
    )


# -- check -----------------------------------------------------------------------------------


def test_check_host_outside_scope(capsys: pytest.CaptureFixture[str], doc_config: Path) -> None:
    # the scope check comes before any connection
    assert run_main(capsys, "check", "--config", str(doc_config), "127.0.0.1") == (
        2,
        "",
        f"relayaudit: host '127.0.0.1': 127.0.0.1 is outside scope (192.0.2.0/24) of {doc_config}\n",
    )


def test_check_port_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "check", "--port", "70000", "127.0.0.1") == (
        2,
        "",
        "relayaudit: --port: 70000 is outside 1-65535\n",
    )


def test_check_source_not_an_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "check", "--source", "notanip", "127.0.0.1") == (
        2,
        "",
        "relayaudit: --source: 'notanip' is not an IP address\n",
    )


def test_check_source_of_the_other_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "check", "--source", "::1", "127.0.0.1") == (
        2,
        "",
        "relayaudit: --source: '::1' is IPv6 but host '127.0.0.1' has no IPv6 address\n",
    )


def test_check_name_that_does_not_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "check", "nonexistent.invalid") == (
        2,
        "",
        "relayaudit: host: 'nonexistent.invalid' does not resolve: Name or service not known\n",
    )


def test_check_closed_port(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = run_main(capsys, "check", "127.0.0.1", "--port", str(port))
    assert (code, err) == (0, "")
    assert out == f"127.0.0.1:{port}  CLOSED  (seen from default)\n  connection refused\n"


def test_check_closed_port_json(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, out, err = run_main(
        capsys, "check", "--json", "--source", "127.0.0.1", "--port", str(port), "127.0.0.1"
    )
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["result"]["address"] == "127.0.0.1"
    assert doc["result"]["port"] == port
    assert doc["result"]["vantage"] == "127.0.0.1"
    assert doc["result"]["status"] == "closed"
    assert doc["verdict"]["status"] == "closed"
    assert doc["verdict"]["findings"] == []


# -- python -m relayaudit --------------------------------------------------------------------


def test_python_m_config_check() -> None:
    code, out, err = run_cli_blocking("config", "check", "config/lab.toml")
    assert (code, err) == (0, "")
    assert out.startswith("config/lab.toml: valid\n")


def test_python_m_usage_error() -> None:
    code, out, err = run_cli_blocking("sweep")
    assert (code, out) == (2, "")
    # the child formats for COLUMNS as this process does (the fixed_width fixture)
    assert err == (
        _sweep_usage() + "relayaudit: error: the following arguments are required: --config\n"
    )


# -- sweep --config config/lab.toml against the demo's lab ---------------------------------


@pytest.fixture
async def demo_lab() -> AsyncIterator[Lab]:
    async with demo.demo_lab() as lab:
        yield lab


async def test_sweep_lab_config_against_the_demo_lab(demo_lab: Lab, tmp_path: Path) -> None:
    """What an operator does by hand: start the lab, `relayaudit sweep --config config/lab.toml`."""
    # lab.toml writes lab-findings.jsonl into the working directory
    code, out, err = await run_cli("sweep", "--config", str(LAB), cwd=tmp_path, timeout=120)
    assert code == 1, (out, err)  # 1: open relays found
    assert "sweep: 15 hosts, 30 address:port probes" in out
    lines = (tmp_path / "lab-findings.jsonl").read_text(encoding="utf-8").splitlines()
    assert f"{len(lines)} findings written to lab-findings.jsonl" in out
    kinds = {json.loads(line)["kind"] for line in lines}
    assert "open-relay" in kinds
    # it ends naming every relay: each relay finding of the file once, most severe first
    rows = table_after(out, "relay findings, most severe first:")
    assert_table_order(rows)
    relays = {json.loads(line)["id"] for line in lines if json.loads(line)["kind"] in RELAY_KINDS}
    assert sorted(r[4] for r in rows) == sorted(relays)
    assert {r[2] for r in rows} >= {"127.0.10.1:2525", "127.0.10.3:2525", "127.0.10.8:2525"}
    # lab.toml's owner table: the owner column names the department of each relay
    owners = {r[2]: r[5] for r in rows}
    assert owners["127.0.10.1:2525"] == "Central" and owners["127.0.10.8:2525"] == "Chemistry"
    # canary messages went through the lab's relays to the receiver the sweep started itself
    assert any(CANARY_DOMAIN in d.rcpt for d in demo_lab.delivered)
    assert demo_lab.forward_failures == []


def table_after(out: str, title: str) -> list[list[str]]:
    """The rows (split into cells) of the findings table printed after the line `title`."""
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith(title)), None)
    assert start is not None, f"no table {title!r} in:\n{out}"
    assert lines[start + 1].split()[:4] == ["severity", "confidence", "address:port", "kind"]
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        if not line.startswith(" "):  # an approval note is indented under its finding
            rows.append(line.split())
    return rows


def _address_order(cell: str) -> tuple[int, int, int]:
    host, port = cell.rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    return ip.version, int(ip), int(port)


def assert_table_order(rows: list[list[str]]) -> None:
    """Severity, then confidence, then address (numeric, IPv4 before IPv6) and port."""
    keys = [(Severity(r[0]).rank, Confidence(r[1]).rank, _address_order(r[2])) for r in rows]
    assert keys == sorted(keys), rows


async def test_sweep_processes_name_every_childs_findings(demo_lab: Lab, tmp_path: Path) -> None:
    # confirmation mode needs one process: the same lab config without it
    config = tmp_path / "lab.toml"
    config.write_text(
        LAB.read_text(encoding="utf-8").replace("enabled = true", "enabled = false"),
        encoding="utf-8",
    )
    code, out, err = await run_cli(
        "sweep", "--config", str(config), "--processes", "2", "--all", cwd=tmp_path, timeout=120
    )
    assert code == 1, (out, err)
    lines = (tmp_path / "lab-findings.jsonl").read_text(encoding="utf-8").splitlines()
    assert f"{len(lines)} findings written to lab-findings.jsonl by 2 processes" in out
    rows = table_after(out, "findings, most severe first:")
    assert_table_order(rows)
    # both children's findings, each once: every line of the findings file is in the table
    assert sorted(r[4] for r in rows) == sorted(json.loads(line)["id"] for line in lines)
    assert "unapproved-smtp" in {r[3] for r in rows}


async def test_check_lists_relays_first_and_shows_the_approval(tmp_path: Path) -> None:
    relay_port, approved_port = free_port(), free_port()
    config = tmp_path / "check.toml"
    config.write_text(
        'scope = ["127.0.88.0/24"]\ntargets = ["127.0.88.0/24"]\n'
        '[identity]\nhelo_name = "relayaudit.campus.test"\n'
        '[relay]\ncampus_domains = ["campus.test"]\n'
        'external_domains = ["relay-test.example", "sender.example"]\n'
        f'[[approved]]\naddress = "127.0.88.1"\nport = {approved_port}\n'
        'note = "ISO-0042 department mail hub"\n'
        '[[owners]]\nname = "Chemistry"\nranges = ["127.0.88.0/25"]\n'
        'contact = "it@chem.campus.test"\nqueue = "chem-it"\n',
        encoding="utf-8",
    )
    specs = [
        ServerSpec(host="127.0.88.1", port=relay_port, behaviour=Behaviour.CAMPUS_SENDER),
        ServerSpec(host="127.0.88.1", port=approved_port, behaviour=Behaviour.CLOSED),
    ]
    async with Lab(specs, local_domains=("campus.test",), campus_domains=("campus.test",)):
        code, out, err = await run_cli(
            "check",
            "127.0.88.1",
            "--port",
            str(relay_port),
            "--port",
            str(approved_port),
            "--config",
            str(config),
            "--no-transcript",
        )
    assert (code, err) == (1, ""), out
    relay, approved = out.split("\n\n")
    assert relay.splitlines()[2] == "  not on the approved list"
    # the relay (high) before the unapproved service (medium), as in the sweep's table
    kinds = [line.split("]")[1].split()[0] for line in relay.splitlines() if line.startswith("  [")]
    assert kinds == ["relay-campus-sender", "unapproved-smtp"]
    # each finding names its owner from the config's table, as a sweep's would (issue 29)
    owner_lines = [line.strip() for line in relay.splitlines() if "owner:" in line]
    assert owner_lines == ["owner: Chemistry <it@chem.campus.test>, queue chem-it"] * 2
    assert approved.splitlines()[0].startswith(f"127.0.88.1:{approved_port}  RELAY-REFUSED  ")
    assert approved.splitlines()[2] == "  approved: ISO-0042 department mail hub"


async def test_check_confirm_reports_a_canary_refused_at_data(tmp_path: Path) -> None:
    port, canary_port = free_port(), free_port()
    config = tmp_path / "check.toml"
    config.write_text(
        'scope = ["127.0.88.0/24"]\ntargets = ["127.0.88.0/24"]\n'
        '[identity]\nhelo_name = "relayaudit.campus.test"\n'
        '[relay]\ncampus_domains = ["campus.test"]\n'
        'external_domains = ["relay-test.example", "sender.example"]\n'
        '[canary]\ndomain = "canary.iso.test"\n'
        f'listen = "127.0.88.3:{canary_port}"\nwait = "2s"\n',
        encoding="utf-8",
    )
    spec = ServerSpec(host="127.0.88.1", port=port, behaviour=Behaviour.REFUSE_AT_DATA)
    async with Lab([spec], mx={"canary.iso.test": ("127.0.88.3", canary_port)}):
        code, out, err = await run_cli(
            "check", "127.0.88.1", "--port", str(port), "--config", str(config), "--confirm"
        )
    assert code == 0, (out, err)  # no relay
    assert out.splitlines()[0].startswith(f"127.0.88.1:{port}  REFUSES-AT-DATA  ")
    assert "refused at DATA: 550 5.7.1" in " ".join(out.split())


def test_demo_names_each_relay_and_cuts_no_summary(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = tmp_path / "report.csv"
    code, out, err = run_main(
        capsys, "demo", "--output", str(tmp_path / "findings.jsonl"), "--report", str(report)
    )
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "findings.jsonl").read_text().splitlines()]
    # every line of the demo's findings file validates against the committed schema
    schema = json.loads(
        (ROOT / "schemas" / f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json").read_text()
    )
    check = jsonschema.validators.validator_for(schema)(schema)
    for r in records:
        check.validate(r)
    # the CSV report names each relay's address:port
    listed = {(r["address"], r["port"]) for r in csv.DictReader(io.StringIO(report.read_text()))}
    relays = {(r["address"], str(r["port"])) for r in records if r["kind"] in RELAY_KINDS}
    assert relays and relays <= listed
    assert f"report: {report}" in out
    # each relay's row carries its summary whole (the demo cut them at 110 characters, mid-word)
    lines = out.splitlines()
    for r in records:
        if r["kind"] in RELAY_KINDS:
            (row,) = [line for line in lines if line.startswith(f"{r['address']}:{r['port']} ")]
            assert row.endswith(r["summary"])
    hub = next(i for i, line in enumerate(lines) if line.startswith("127.0.10.2:2525 "))
    assert lines[hub + 1].strip() == "approved: ISO-0001 campus mail hub"
    rows = table_after(out, "findings, most severe first:")
    assert_table_order(rows)
    assert sorted(r[4] for r in rows) == sorted(r["id"] for r in records)
    # two departments run the lab, and 127.0.10.12 nobody (issue 29): every finding but that
    # address's names its owner, in the file and in the table's owner column
    owner = {r["id"]: (r["owner"] or {}).get("name") for r in records}
    assert {r["address"] for r in records if owner[r["id"]] is None} == {"127.0.10.12"}
    assert {owner[r["id"]] for r in records} == {"Central IT", "Chemistry", None}
    # (a cell is split at spaces: "Central IT" shows as "Central")
    assert {(r[4], r[5]) for r in rows} == {(i, (name or "-").split()[0]) for i, name in owner.items()}


# -- state queries: tables with a header, times with their zone --------------------------------


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    """A store that saw two findings at ADDR and queued an alert for each to one command hook."""
    path = tmp_path / "state.sqlite"
    with StateStore(path) as store:
        store.set_channels(["command:0"])
        one_sweep(
            store,
            observe(make_finding(port=25), port=25),
            observe(make_finding(FindingKind.UNAPPROVED_SMTP, port=587), port=587),
        )
    return path


def test_history_has_a_header_and_times_with_their_zone(
    capsys: pytest.CaptureFixture[str], state_file: Path
) -> None:
    code, out, err = run_main(capsys, "history", ADDR, "--state", str(state_file))
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["observed", "sweep", "shard", "port", "status", "findings"]
    assert [r.split()[:3] for r in rows] == [["2025-01-06", "12:00:00", "UTC"]] * 2
    assert [r.split()[5:] for r in rows] == [
        ["25", "open-relay", "open-relay"],
        ["587", "open-relay", "unapproved-smtp"],
    ]


def test_findings_times_carry_their_zone(
    capsys: pytest.CaptureFixture[str], state_file: Path
) -> None:
    code, out, err = run_main(capsys, "findings", "--state", str(state_file))
    assert (code, err) == (0, "")
    rows = out.splitlines()[1:-1]
    assert len(rows) == 2
    # first seen, last seen, then the owner column (none in this store: "-")
    assert all(r.endswith("2025-01-06 12:00:00 UTC 2025-01-06 12:00:00 UTC -") for r in rows)


def test_outbox_list_shows_every_delivery_in_every_state(
    capsys: pytest.CaptureFixture[str], state_file: Path
) -> None:
    with StateStore(state_file) as store:
        store.set_channels(["command:0"])
        sent, dead = store.due("command:0", T0 + timedelta(days=3650))
        store.delivered(sent)
        store.failed(dead, "exit status 3: ticket system down", next_attempt=T0, dead=True)
        for day in (1, 2):  # the relay is gone from two sweeps: resolved
            one_sweep(store, observe(port=25, when=T0 + timedelta(days=day)))
    state = str(state_file)
    code, out, err = run_main(capsys, "outbox", "list", "--state", state)
    assert (code, err) == (0, "")
    title, header, *rows = out.splitlines()
    assert title == f"{state}: 3 deliveries"
    assert header.split() == [
        "id", "state", "finding", "id", "transition", "hook", "attempts", "next", "try", "last", "error",
    ]  # fmt: skip
    relay, unapproved = make_finding().id, make_finding(FindingKind.UNAPPROVED_SMTP, port=587).id
    assert [r.split()[:6] for r in rows] == [
        ["1", "sent", relay, "new", "command:0", "1"],
        ["2", "dead", unapproved, "new", "command:0", "1"],
        ["3", "pending", relay, "resolved", "command:0", "0"],
    ]
    assert rows[0].split()[6:] == ["-", "-"]
    assert rows[1].split()[6:] == ["-", "exit", "status", "3:", "ticket", "system", "down"]
    # due at once: queued now
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC -", " ".join(rows[2].split()[6:]))

    code, out, err = run_main(
        capsys, "outbox", "list", "--status", "dead", "--state", state, "--json"
    )
    assert (code, err) == (0, "")
    (doc,) = json.loads(out)
    assert {k: doc[k] for k in ("store", "id", "state", "finding_id", "transition", "channel")} == {
        "store": state,
        "id": 2,
        "state": "dead",
        "finding_id": unapproved,
        "transition": "new",
        "channel": "command:0",
    }
    assert (doc["attempts"], doc["last_error"]) == (1, "exit status 3: ticket system down")
    assert (doc["address"], doc["port"]) == (ADDR, 587)

    # the counts and the replay work as before
    code, out, err = run_main(capsys, "outbox", "--state", state)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{state}: 1 pending, 1 sent, 1 dead",
        f"  dead #2 command:0 {unapproved}/new/1 after 1 attempt(s): exit status 3: ticket system down",
    ]
    assert run_main(capsys, "outbox", "--state", state, "--replay")[:2] == (
        0,
        f"{state}: 2 pending, 1 sent, 0 dead\n  1 dead letter(s) requeued\n",
    )
    code, out, err = run_main(capsys, "outbox", "list", "--status", "pending", "--state", state)
    assert out.splitlines()[0] == f"{state}: 2 pending deliveries"


# -- a reader that leaves early (`| head`) ------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["history", ADDR, "--json", "--state", "{state}"],
        ["history", ADDR, "--state", "{state}"],
        ["findings", "--state", "{state}"],
        ["outbox", "list", "--state", "{state}"],
        ["outbox", "--state", "{state}"],
        ["config", "check", str(LAB)],
    ],
    ids=["history-json", "history", "findings", "outbox-list", "outbox", "config-check"],
)
def test_a_reader_that_left_ends_the_command_quietly(state_file: Path, command: list[str]) -> None:
    args = [a.replace("{state}", str(state_file)) for a in command]
    # as a command that SIGPIPE ended: 128 + 13, and no traceback
    assert run_cli_into_closed_pipe(*args) == (141, "")


def test_piped_into_head_exits_quietly(tmp_path: Path) -> None:
    # more than a pipe holds (64 KiB): head leaves while relayaudit is still writing
    path = tmp_path / "state.sqlite"
    long_transcript = tuple(
        Exchange(
            command=f"RCPT TO:<relaytest{i}@relay-test.example>",
            reply=Reply(code=250, text="Ok " * 40),
        )
        for i in range(60)
    )
    with StateStore(path) as store:
        one_sweep(
            store,
            *(
                observe(make_finding(port=p, transcript=long_transcript), port=p)
                for p in range(1, 41)
            ),
        )
    code, out, err = run_cli_into_head("findings", "--json", "--state", str(path))
    assert (code, out, err) == (141, "[\n", "")
