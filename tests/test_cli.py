"""Tests for relayaudit.cli: exit codes and exact messages of each subcommand; loopback only."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_runner import run_cli, run_cli_blocking, run_main
from loopback import free_port

from relayaudit.cli import _parser
from relayaudit.demo import CANARY, CANARY_DOMAIN, DEMO_LAB
from relayaudit.lab import Lab, ServerSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "relayaudit.example.toml"
LAB = ROOT / "config" / "lab.toml"
DOC_CONFIG = 'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'


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


def test_no_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    usage, _ = _top_usage()
    assert run_main(capsys) == (
        2,
        "",
        usage + "relayaudit: error: the following arguments are required: command\n",
    )


def test_sweep_without_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "sweep") == (
        2,
        "",
        "usage: relayaudit sweep [-h] --config CONFIG [--shard SHARD]\n"
        "                        [--processes PROCESSES]\n"
        "relayaudit: error: the following arguments are required: --config\n",
    )


def test_check_port_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "check", "--port", "smtp", "127.0.0.1")
    assert (code, out) == (2, "")
    assert err.endswith("relayaudit: error: argument --port: invalid int value: 'smtp'\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "--version") == (0, "relayaudit 0.1.0\n", "")


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
        2,
        "",
        f"relayaudit: {path}: ports: [25, 25] lists a port twice\n",
    )


# -- config check ----------------------------------------------------------------------------


def test_config_check_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert run_main(capsys, "config", "check", str(path)) == (
        2,
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
        2,
        "",
        f"relayaudit: {path}: limits.rate: Input should be greater than 0 (got 0)\n",
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
    assert err == (
        "usage: relayaudit sweep [-h] --config CONFIG [--shard SHARD]\n"
        "                        [--processes PROCESSES]\n"
        "relayaudit: error: the following arguments are required: --config\n"
    )


# -- sweep --config config/lab.toml against the demo's lab ---------------------------------


@pytest.fixture
async def demo_lab() -> AsyncIterator[Lab]:
    specs = [
        ServerSpec(
            host=f"127.0.10.{octet}",
            port=port,
            behaviour=behaviour,
            implicit_tls=tls,
            hostname=f"mx{octet}.campus.test",
        )
        for octet, port, behaviour, tls in DEMO_LAB
    ]
    async with Lab(
        specs,
        local_domains=("campus.test",),
        campus_domains=("campus.test",),
        mx={CANARY_DOMAIN: CANARY},
    ) as lab:
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
    # canary messages went through the lab's relays to the receiver the sweep started itself
    assert any(CANARY_DOMAIN in d.rcpt for d in demo_lab.delivered)
    assert demo_lab.forward_failures == []
