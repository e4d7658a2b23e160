"""`relayaudit deploy render`: the committed drop-in and NetworkPolicy, validated and held to a sweep.

The committed files must be what the command prints. The drop-in is checked by
`systemd-analyze verify`, the policy by the Kubernetes schemas; a real sweep of the demo lab,
watched by an audit hook, connects to nothing outside the drop-in's IPAddressAllow list; and
where systemd runs, the daemon runs under the drop-in with `systemd-run`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ROOT, run_main
from connect_audit import loopback
from systemd_unit import unit_copy, verify_problems
from toml_writer import toml_value

from relayaudit.config import Config, load_config, parse_config
from relayaudit.demo import CANARY, DEMO_LAB, demo_lab
from relayaudit.deploy import nameservers, render
from relayaudit.errors import ConfigError
from relayaudit.lab import Behaviour, Lab, ServerSpec

TESTS = Path(__file__).resolve().parent
EXAMPLE = ROOT / "config" / "relayaudit.example.toml"
LAB_CONFIG = ROOT / "config" / "lab.toml"
UNIT = ROOT / "deploy" / "systemd" / "relayaudit.service"
DROP_IN = ROOT / "deploy" / "systemd" / "relayaudit.service.d" / "scope.conf"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
POLICY = ROOT / "deploy" / "kubernetes" / "networkpolicy.yaml"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed(drop_in: str) -> list[Network]:
    """The IPAddressAllow= networks of a drop-in, after an IPAddressDeny=any."""
    lines = [x.strip() for x in drop_in.splitlines() if x.strip() and not x.startswith("#")]
    assert lines[:2] == ["[Service]", "IPAddressDeny=any"], lines[:2]
    nets: list[Network] = []
    for line in lines[2:]:
        key, _, value = line.partition("=")
        assert key == "IPAddressAllow" and value, line  # an empty value would reset the list
        nets += [ipaddress.ip_network(v) for v in value.split()]
    return nets


def configmap_config(tmp_path: Path) -> Path:
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")
    doc = yaml.safe_load(CONFIGMAP.read_text())
    path = tmp_path / "relayaudit.toml"
    path.write_text(doc["data"]["relayaudit.toml"], encoding="utf-8")
    return path


def no_dns(name: str) -> list[Any]:
    raise AssertionError(f"render looked up {name!r}")


# -- the committed files ----------------------------------------------------------------------


@pytest.mark.usefixtures("loopback_only")  # no name is looked up: the configs pin them
def test_committed_drop_in_and_policy_are_what_render_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_main(
        capsys, "deploy", "render", "--config", str(EXAMPLE), "--for", "systemd"
    )
    assert (code, err) == (0, "")
    assert out == DROP_IN.read_text(), (
        f"{DROP_IN.relative_to(ROOT)} is stale: relayaudit deploy render --config "
        "config/relayaudit.example.toml --for systemd > it"
    )
    monkeypatch.setenv("RELAYAUDIT_WEBHOOK_TOKEN", "test-token")
    cfg = configmap_config(tmp_path)
    code, out, err = run_main(
        capsys, "deploy", "render", "--config", str(cfg), "--for", "kubernetes"
    )
    assert (code, err) == (0, "")
    assert out == POLICY.read_text(), (
        f"{POLICY.relative_to(ROOT)} is stale: render it from configmap.yaml's relayaudit.toml"
    )


def test_drop_in_allows_exactly_what_the_example_talks_to() -> None:
    config = load_config(EXAMPLE)
    nets = allowed(DROP_IN.read_text())
    expected = [
        *config.scope,
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
        *(ipaddress.ip_network(a) for a in config.deploy.resolvers or ()),
        ipaddress.ip_network("203.0.113.80/32"),  # rt.campus.example, the webhook
        ipaddress.ip_network("192.0.2.25/32"),  # mail.campus.example, the email hook
        *config.deploy.allow_from,
    ]
    assert nets == expected
    text = DROP_IN.read_text()
    assert "alerts.webhook[0].url: rt.campus.example:443 -> 203.0.113.80 (deploy.hosts)" in text
    assert "alerts.command[0]: /usr/local/bin/iso-ticket: list the hosts it reaches" in text


def test_policy_matches_the_configmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")
    monkeypatch.setenv("RELAYAUDIT_WEBHOOK_TOKEN", "test-token")
    config = load_config(configmap_config(tmp_path))
    policy = yaml.safe_load(POLICY.read_text())
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "relayaudit"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    (metrics,) = spec["ingress"]  # canary off: the metrics port only
    assert metrics["ports"] == [{"protocol": "TCP", "port": config.metrics.listen[1]}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": dict(config.deploy.monitoring_namespace_labels)}}
    ]
    scope, dns, webhook = spec["egress"]
    assert [b["ipBlock"]["cidr"] for b in scope["to"]] == [str(n) for n in config.scope]
    assert [p["port"] for p in scope["ports"]] == list(config.ports)
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert webhook == {
        "to": [{"ipBlock": {"cidr": "203.0.113.80/32"}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }
    # the pods it selects are relayaudit's: the StatefulSet's and the Job's
    for path in ("statefulset.yaml", "oneshot/sweep-job.yaml"):
        for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / path).read_text()):
            if doc["kind"] in ("StatefulSet", "Job"):
                labels = doc["spec"]["template"]["metadata"]["labels"]
                assert spec["podSelector"]["matchLabels"].items() <= labels.items()


# -- validation -------------------------------------------------------------------------------


def _unit_dir(tmp_path: Path, drop_in: str) -> Path:
    return unit_copy(tmp_path, {"scope.conf": drop_in})


def test_systemd_analyze_verifies_the_unit_with_the_drop_in(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed; the drop-in's keys are checked by allowed()")
    unit = _unit_dir(tmp_path, DROP_IN.read_text())
    # verify reads the drop-in beside the unit: a bad line in it must show (the check checks)
    broken = _unit_dir(tmp_path / "broken", DROP_IN.read_text() + "IPAddressAllow=not-an-address\n")
    proc = subprocess.run(
        [exe, "verify", str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "scope.conf" in proc.stderr and "not-an-address" in proc.stderr, proc.stderr
    problems = verify_problems(exe, unit)
    assert problems == "", problems


def test_rendered_policies_validate_against_the_kubernetes_schemas(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")
    kv = pytest.importorskip(
        "kubernetes_validate.utils", reason="kubernetes-validate is not installed"
    )
    variants = [
        POLICY.read_text(),
        render(_canary_config(), "kubernetes", resolver=no_dns),
        render(
            parse_config(
                {
                    "scope": ["127.0.0.0/8"],
                    "targets": ["127.0.0.0/30"],
                    "metrics": {"enabled": False},
                }
            ),
            "kubernetes",
            resolver=no_dns,
        ),
    ]
    for text in variants:
        doc = yaml.safe_load(text)
        for version in ("1.28.0", kv.latest_version()):
            kv.validate(doc, version, strict=True)
    # metrics off, canary off: no ingress at all
    assert yaml.safe_load(variants[2])["spec"]["ingress"] == []


def _canary_config() -> Config:
    return parse_config(
        {
            "scope": ["192.0.2.0/24", "2001:db8:25::/120"],
            "targets": ["192.0.2.0/25"],
            "canary": {
                "enabled": True,
                "domain": "canary.campus.example",
                "listen": "192.0.2.250:25",
            },
            "metrics": {"listen": "0.0.0.0:9425"},
            "alerts": {
                "webhook": [{"url": "http://[2001:db8:25::80]:8080/hook"}],
                "email": [
                    {
                        "host": "192.0.2.26",
                        "mail_from": "a@campus.example",
                        "to": ["t@campus.example"],
                    }
                ],
                "command": [{"argv": ["/usr/bin/ticket"]}],
            },
            "deploy": {
                "allow_from": ["198.51.100.7"],
                "hosts": {"proxy.campus.example": ["198.51.100.8"]},
                "monitoring_namespace_labels": {"team": "monitoring", "example.com/scrape": "true"},
            },
        },
        source="canary.toml",
    )


def test_kubernetes_policy_with_canary_hooks_and_labels() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (comes with kubernetes-validate)")
    spec = yaml.safe_load(render(_canary_config(), "kubernetes", resolver=no_dns))["spec"]
    metrics, canary = spec["ingress"]
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {
        "team": "monitoring",
        "example.com/scrape": "true",  # quoted: a label value is a string
    }
    assert [b["ipBlock"]["cidr"] for b in canary["from"]] == [
        "192.0.2.0/24",
        "2001:db8:25::/120",
        "198.51.100.7/32",
    ]
    assert canary["ports"] == [{"protocol": "TCP", "port": 25}]
    _, _, webhook, email, proxy = spec["egress"]
    assert webhook["to"] == [{"ipBlock": {"cidr": "2001:db8:25::80/128"}}]
    assert webhook["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert email["ports"] == [{"protocol": "TCP", "port": 25}]
    assert proxy == {"to": [{"ipBlock": {"cidr": "198.51.100.8/32"}}]}  # any port


# -- names, resolvers ---------------------------------------------------------------------------


def _hooked(url: str, **deploy: Any) -> Config:
    return parse_config(
        {
            "scope": ["192.0.2.0/24"],
            "targets": ["192.0.2.0/28"],
            "alerts": {"webhook": [{"url": url}]},
            "deploy": {"resolvers": ["192.0.2.53"], **deploy},
        },
        source="hooks.toml",
    )


def test_hook_names_are_resolved_at_render_time_and_listed() -> None:
    looked_up: list[str] = []

    def resolver(name: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        looked_up.append(name)
        return [ipaddress.ip_address("198.51.100.80"), ipaddress.ip_address("2001:db8::80")]

    text = render(_hooked("https://Tickets.Campus.Example./hook"), "systemd", resolver=resolver)
    assert looked_up == ["tickets.campus.example"]
    assert (
        "#   alerts.webhook[0].url: tickets.campus.example:443 -> 198.51.100.80 2001:db8::80 "
        "(resolved at render time)\nIPAddressAllow=198.51.100.80/32 2001:db8::80/128\n"
    ) in text


def test_a_name_that_does_not_resolve_is_an_error_naming_the_hook() -> None:
    def resolver(name: str) -> list[Any]:
        raise ConfigError(f"{name!r} does not resolve here: Name or service not known")

    with pytest.raises(ConfigError) as info:
        render(_hooked("https://tickets.campus.example/hook"), "kubernetes", resolver=resolver)
    assert str(info.value) == (
        "hooks.toml: alerts.webhook[0].url: 'tickets.campus.example' does not resolve here: "
        "Name or service not known; list its addresses in deploy.hosts"
    )


def test_a_hook_resolving_to_unusable_space_is_refused() -> None:
    def resolver(name: str) -> list[Any]:
        return [ipaddress.ip_address("192.0.2.80"), ipaddress.ip_address("169.254.169.254")]

    with pytest.raises(ConfigError) as info:
        render(_hooked("https://metadata.campus.example/"), "systemd", resolver=resolver)
    assert str(info.value) == (
        "hooks.toml: alerts.webhook[0].url: 'metadata.campus.example' resolves to "
        "'169.254.169.254' overlaps 169.254.0.0/16, IPv4 link-local (RFC 3927): no campus host "
        "can hold those addresses, so relayaudit never connects to them"
    )


def test_resolvers_come_from_resolv_conf_unless_configured(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch campus.example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
        "nameserver ::ffff:198.51.100.53\nnameserver junk\noptions edns0\n"
    )
    assert [str(a) for a in nameservers(conf.read_text())] == ["192.0.2.53", "198.51.100.53"]
    config = parse_config({"scope": ["192.0.2.0/24"], "targets": ["192.0.2.0/28"]})
    text = render(config, "systemd", resolver=no_dns, resolv_conf=conf)
    assert (
        f"# DNS resolvers ({conf} where this was rendered)\nIPAddressAllow=192.0.2.53/32 198.51.100.53/32\n"
        in text
    )
    text = render(config, "systemd", resolver=no_dns, resolv_conf=tmp_path / "missing")
    assert "where this was rendered)\n#   (none)\n" in text
    assert allowed(text)  # the scope and loopback still; never an empty IPAddressAllow=


@pytest.mark.parametrize(
    ("deploy", "message"),
    [
        (
            {"hosts": {"bad name": ["192.0.2.1"]}},
            "deploy.hosts.\"bad name\": line 4: 'bad name' is not a valid host",
        ),
        (
            {"hosts": {"a.example": []}},
            'deploy.hosts."a.example": line 4: Tuple should have at least 1 item',
        ),
        (
            {"resolvers": ["fe80::1%eth0"]},
            "deploy.resolvers[0]: line 4: 'fe80::1%eth0' has a zone id",
        ),
        (
            {"monitoring_namespace_labels": {}},
            "deploy.monitoring_namespace_labels: line 4: must name at least one label",
        ),
        (
            {"monitoring_namespace_labels": {"team": "a b"}},
            "deploy.monitoring_namespace_labels: line 4: 'team': 'a b' is not a Kubernetes "
            "label value",
        ),
        (
            {"monitoring_namespace_labels": {"-bad": "x"}},
            "deploy.monitoring_namespace_labels: line 4: '-bad' is not a Kubernetes label key",
        ),
        ({"allow_to": ["192.0.2.1"]}, "deploy.allow_to: line 4: unknown key (got ['192.0.2.1'])"),
    ],
)
def test_deploy_keys_are_validated(tmp_path: Path, deploy: dict[str, Any], message: str) -> None:
    path = tmp_path / "relayaudit.toml"
    path.write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/28"]\n[deploy]\n'
        + "".join(f"{k} = {toml_value(v)}\n" for k, v in deploy.items())
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


# -- the kernel's list, held to a real sweep ---------------------------------------------------


async def test_a_lab_sweep_connects_only_inside_the_rendered_allow_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An audit hook sees every connect and bind of `relayaudit sweep --config config/lab.toml`
    (confirmation on: the canary receiver binds, the lab's servers relay to it); each address is
    in the IPAddressAllow list `deploy render` gives for that config."""
    code, drop_in, err = run_main(
        capsys, "deploy", "render", "--config", str(LAB_CONFIG), "--for", "systemd"
    )
    assert code == 0, err
    nets = allowed(drop_in)
    record = tmp_path / "record.json"
    async with demo_lab():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(TESTS / "connect_audit.py"), str(record), "relayaudit",
            "sweep", "--config", str(LAB_CONFIG),
            cwd=tmp_path,  # lab.toml's findings file is relative
            env={**os.environ, "PYTHONPATH": f"{TESTS}:{ROOT}"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, errb = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1, out.decode() + errb.decode()  # 1: relays found
    seen = [tuple(r) for r in json.loads(record.read_text())]
    outside = [r for r in seen if not any(ipaddress.ip_address(r[2]) in n for n in nets)]
    assert not outside, f"outside the drop-in's IPAddressAllow={nets}: {outside}"
    # the hook saw the sweep: every lab host, and the canary receiver's listener
    connected = {r[2] for r in seen if r[0] == "socket.connect"}
    assert {f"127.0.10.{octet}" for octet, *_ in DEMO_LAB} <= connected
    assert ("socket.bind", "AF_INET", CANARY[0], CANARY[1]) in seen
    assert all(loopback(r[2]) for r in seen if r[0] == "socket.connect")


# -- the daemon under the drop-in, where systemd runs ---------------------------------------------


def _systemd_unavailable() -> str | None:
    if shutil.which("systemd-run") is None or shutil.which("systemctl") is None:
        return "systemd-run is not installed"
    if not Path("/run/systemd/system").is_dir():
        return "systemd is not the init system here (no /run/systemd/system)"
    if os.geteuid() != 0:
        return "transient system units need root"
    return None


async def test_the_daemon_runs_under_the_rendered_drop_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under systemd-run with the drop-in's properties, the daemon sweeps its scope and finds
    the relay, while a connect from the same sandbox to a loopback address outside the list
    gets EPERM from the kernel."""
    reason = _systemd_unavailable()
    if reason is not None:
        pytest.skip(
            f"{reason}: the daemon was not run under the rendered drop-in here "
            "(the drop-in is still verified, and held to a real sweep by an audit hook)"
        )
    port = 2725
    cfg = tmp_path / "relayaudit.toml"
    cfg.write_text(
        f"""
scope = ["127.0.125.0/24"]
targets = ["127.0.125.0/29"]
ports = [{port}]
[deploy]
resolvers = []
[timeouts]
connect = "1s"
command = "3s"
session = "20s"
[schedule]
interval = "1h"
[state]
path = "{tmp_path / "state.sqlite"}"
[output]
findings = "{tmp_path / "findings.jsonl"}"
[logging]
file = "{tmp_path / "log.jsonl"}"
stdout = false
[metrics]
enabled = false
"""
    )
    code, drop_in, err = run_main(
        capsys, "deploy", "render", "--config", str(cfg), "--for", "systemd"
    )
    assert code == 0, err
    props = [
        f"--property={line}"
        for line in drop_in.splitlines()
        if line.startswith(("IPAddressDeny=", "IPAddressAllow="))
    ]
    unit = f"relayaudit-test-{uuid.uuid4().hex[:8]}"
    env = f"--setenv=PYTHONPATH={ROOT}"
    outside = ("127.0.126.1", port)  # loopback, but in no IPAddressAllow= line
    async with Lab(
        [
            ServerSpec(host="127.0.125.1", port=port, behaviour=Behaviour.OPEN_RELAY),
            ServerSpec(host=outside[0], port=port, behaviour=Behaviour.OPEN_RELAY),
        ]
    ):
        probe = subprocess.run(
            ["systemd-run", "--wait", "--pipe", "--quiet", "--collect", *props, env,
             sys.executable, "-c",
             "import socket, sys\n"
             "s = socket.socket()\n"
             f"try:\n    s.connect({outside!r})\nexcept OSError as e:\n    sys.exit(e.errno)\n"
             "sys.exit(0)"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert probe.returncode == 1, probe.stdout + probe.stderr  # EPERM from the cgroup filter
        started = subprocess.run(
            ["systemd-run", f"--unit={unit}", "--collect", *props, env,
             sys.executable, "-m", "relayaudit", "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        try:
            log = tmp_path / "log.jsonl"

            def summary() -> bool:
                return log.exists() and '"sweep.summary"' in log.read_text()

            deadline = time.monotonic() + 60
            while not summary():
                assert time.monotonic() < deadline, "no sweep under the drop-in within 60 s"
                await asyncio.sleep(0.2)
        finally:
            subprocess.run(
                ["systemctl", "stop", unit], capture_output=True, timeout=60, check=False
            )
    kinds = {json.loads(x)["kind"] for x in (tmp_path / "findings.jsonl").read_text().splitlines()}
    assert "open-relay" in kinds
