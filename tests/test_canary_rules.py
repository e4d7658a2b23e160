"""Confirmation mode mails only the ISO: canary domain rules, the canary's envelope sender,
`relayaudit canary check` against a loopback DNS server, and the port-25 systemd drop-in."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from cli_runner import ROOT, run_cli, run_main
from dns_stub import DnsStub
from factories import canary_target, probe_settings
from systemd_unit import unit_copy, verify_problems

from relayaudit.battery import BatteryInputs
from relayaudit.canary import CanaryReceiver
from relayaudit.config import load_config, parse_config
from relayaudit.confirm import canary_sender
from relayaudit.demo import demo_config
from relayaudit.engine import await_confirmation
from relayaudit.errors import ConfigError
from relayaudit.evidence import RelayTest, TestCategory, TestRole
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.probe import probe
from relayaudit.settings import CanaryTarget

CANARY_DOMAIN = "canary.iso.test"
BASE = {
    "scope": ["192.0.2.0/24"],
    "targets": ["192.0.2.0/24"],
    "relay": {
        "campus_domains": ["campus.example"],
        "external_domains": ["relay-test.example", "sender.example"],
    },
}


def config_error(canary: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "canary": canary}, source="t.toml")
    return str(info.value)


# -- canary.domain and canary.campus_sender ---------------------------------------------------


def test_a_canary_domain_under_a_campus_domain_needs_a_reason() -> None:
    # a campus server that routes campus subdomains would deliver such a canary itself
    assert config_error({"domain": "canary.iso.campus.example"}) == (
        "t.toml: canary.domain: 'canary.iso.campus.example' lies under the campus domain "
        "'campus.example' (relay.campus_domains[0]): a campus server that routes campus "
        "subdomains would deliver such a canary itself and fake a confirmation. Use a domain "
        'outside campus, or say why this one is safe in canary.campus_domain_reason = "..." '
        "(e.g. its MX is the scanner alone and no campus server routes it)"
    )
    reason = "its only MX is the scanner; the hub routes listed subdomains only"
    config = parse_config(
        {**BASE, "canary": {"domain": "canary.iso.campus.example", "campus_domain_reason": reason}}
    )
    assert config.canary.campus_domain_reason == reason
    # the campus domain itself: every campus server delivers it, no reason helps
    assert "is the campus domain relay.campus_domains[0]" in config_error(
        {"domain": "campus.example", "campus_domain_reason": reason}
    )


@pytest.mark.parametrize("domain", ["relay-test.example", "x.relay-test.example", "sender.example"])
def test_a_canary_domain_may_not_be_or_lie_under_an_external_test_domain(domain: str) -> None:
    assert f"canary.domain: {domain!r} is or lies under the external test domain" in (
        config_error({"domain": domain})
    )


def test_the_campus_sender_is_a_campus_address() -> None:
    assert "canary.campus_sender: 'iso@elsewhere.example' is not an address in one of" in (
        config_error({"domain": CANARY_DOMAIN, "campus_sender": "iso@elsewhere.example"})
    )
    assert "is not a plain address" in config_error({"campus_sender": "not an address"})
    config = parse_config({**BASE, "canary": {"campus_sender": "ISO@Dept.Campus.Example"}})
    assert config.canary.campus_sender == "ISO@dept.campus.example"


def test_the_shipped_and_demo_canary_domains_lie_outside_campus() -> None:
    for config in (
        demo_config(Path("f.jsonl")),
        load_config(ROOT / "config" / "lab.toml"),
        load_config(ROOT / "config" / "relayaudit.example.toml"),
    ):
        domain = config.canary.domain
        assert not any(domain.endswith("." + c) for c in config.relay.campus_domains), domain
        assert config.canary.campus_sender is not None


def test_config_check_warns_about_a_wildcard_listen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    for listen, warned in (("0.0.0.0:25", True), ("[::]:25", True), ("192.0.2.250:25", False)):
        path.write_text(
            f'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n[canary]\nlisten = "{listen}"\n'
        )
        code, out, err = run_main(capsys, "config", "check", str(path))
        assert code == 0 and out.startswith(f"{path}: valid")
        assert ("warning: canary.listen" in err) is warned, err
        if warned:
            assert "is every address of this host" in err


# -- the canary's envelope sender ---------------------------------------------------------------

INPUTS = BatteryInputs(
    address="192.0.2.7",
    hostname="mx.campus.example",
    campus_domains=("campus.example",),
    external_domains=("relay-test.example", "sender.example"),
    external_local_part="relaytest",
    sender_local_part="relayaudit",
)
TARGET = CanaryTarget(
    local_part="c", domain=CANARY_DOMAIN, contact="", campus_sender="iso@campus.example"
)


def _test(role: TestRole, mail_from: str) -> RelayTest:
    category = TestCategory.SENDER if role.plain_recipient else TestCategory.RECIPIENT
    return RelayTest(id="t", category=category, role=role, mail_from=mail_from, rcpt_to="u@d.test")


@pytest.mark.parametrize(
    ("role", "accepted_sender", "canary"),
    [
        # what was accepted, kept: no bounce can leave for a test domain from these
        (TestRole.NULL_SENDER, "", ""),
        (TestRole.LOCAL_SENDER, "relayaudit@mx.campus.example", "relayaudit@mx.campus.example"),
        (TestRole.LOCAL_SENDER, "relayaudit@[192.0.2.7]", "relayaudit@[192.0.2.7]"),
        (TestRole.LOCAL_SENDER, "relayaudit@localhost", "relayaudit@localhost"),
        (TestRole.LOCAL_SENDER, "relayaudit", "relayaudit"),
        # a relay for campus senders: the ISO's own campus address
        (TestRole.LOCAL_SENDER, "postmaster@campus.example", "iso@campus.example"),
        # an outside sender (plain and odd forms): the canary domain, never the test domain
        (TestRole.PLAIN, "relayaudit@sender.example", f"relayaudit@{CANARY_DOMAIN}"),
        (TestRole.ODD_FORM, "relayaudit@sender.example", f"relayaudit@{CANARY_DOMAIN}"),
    ],
)
def test_the_canary_sender_never_names_a_test_domain(
    role: TestRole, accepted_sender: str, canary: str
) -> None:
    assert canary_sender(_test(role, accepted_sender), canary=TARGET, inputs=INPUTS) == canary


def test_without_a_campus_sender_a_campus_only_relay_gets_no_canary() -> None:
    bare = dataclasses.replace(TARGET, campus_sender=None)
    test = _test(TestRole.LOCAL_SENDER, "postmaster@campus.example")
    assert canary_sender(test, canary=bare, inputs=INPUTS) is None


@pytest.fixture
async def receiver() -> AsyncIterator[CanaryReceiver]:
    async with CanaryReceiver("127.0.0.1", 0, domain=CANARY_DOMAIN) as canary:
        yield canary


async def _confirm(behaviour: Behaviour, canary: CanaryReceiver) -> tuple[str, str]:
    """(MAIL FROM of the canary as sent, envelope sender it arrived with) through a lab server."""
    spec = ServerSpec(host="127.0.0.1", port=0, behaviour=behaviour, hostname="mx.campus.test")
    settings = dataclasses.replace(
        probe_settings(command_timeout=3.0, session_timeout=30.0),
        canary=canary_target(CANARY_DOMAIN),
    )
    async with Lab([spec], mx={CANARY_DOMAIN: ("127.0.0.1", canary.port)}) as lab:
        host, port = lab.address_of(0)
        result = await probe(host, port, settings, expect_token=canary.expect)
        result = await await_confirmation(result, canary, 5.0)
    conf = result.confirmation
    assert conf is not None and conf.delivered is True, conf
    arrival = canary.arrived(conf.token)
    assert arrival is not None
    sent = [
        ex.command
        for ex in result.transcript
        if ex.command is not None and ex.command.startswith("MAIL FROM:")
    ][-1]  # the canary's session is the last
    return sent, arrival.mail_from


async def test_a_canary_through_an_open_relay_is_sent_from_the_canary_domain(
    receiver: CanaryReceiver,
) -> None:
    # before issue 20 it repeated the accepted test's sender, relayaudit@sender.example: a
    # bounce would have gone to the external test domain
    sent, arrived = await _confirm(Behaviour.OPEN_RELAY, receiver)
    assert (sent, arrived) == (
        f"MAIL FROM:<relayaudit@{CANARY_DOMAIN}>",
        f"relayaudit@{CANARY_DOMAIN}",
    )


async def test_a_canary_through_a_campus_sender_relay_is_sent_from_the_iso(
    receiver: CanaryReceiver,
) -> None:
    sent, arrived = await _confirm(Behaviour.CAMPUS_SENDER, receiver)
    assert (sent, arrived) == ("MAIL FROM:<iso@campus.test>", "iso@campus.test")


async def test_a_bounce_quoting_a_token_confirms_nothing(receiver: CanaryReceiver) -> None:
    token = "relayaudit-" + "ab" * 16
    bounce = f"Subject: Undelivered Mail\r\n\r\nYour message {token} could not be delivered.\r\n"
    receiver.expect(token)  # even a token the scanner waits for
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=receiver.port, timeout=5) as client:
        # a bounce goes to the canary's envelope sender: an address of the canary domain
        await client.sendmail("", [f"relayaudit@{CANARY_DOMAIN}"], bounce.encode())
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=receiver.port, timeout=5) as client:
        await client.sendmail(
            "", [f"canary+{token}@{CANARY_DOMAIN}"], b"Subject: x\r\n\r\nno token here\r\n"
        )
    assert receiver.arrived(token) is None


# -- relayaudit canary check ----------------------------------------------------------------------


def _config(tmp_path: Path, listen: str, domain: str = CANARY_DOMAIN) -> Path:
    path = tmp_path / "canary.toml"
    path.write_text(
        'scope = ["127.0.77.0/24"]\ntargets = ["127.0.77.0/24"]\n'
        f'[canary]\nenabled = true\ndomain = "{domain}"\nlisten = "{listen}"\n',
        encoding="utf-8",
    )
    return path


ZONE = {
    (CANARY_DOMAIN, "MX"): ["10 mx.iso.test."],
    ("mx.iso.test", "A"): ["127.0.77.25"],
    ("mx.iso.test", "AAAA"): [],
    ("elsewhere.test", "MX"): ["10 mx.elsewhere.test.", "20 mx.iso.test."],
    ("mx.elsewhere.test", "A"): ["192.0.2.10"],
}


async def canary_check(tmp_path: Path, listen: str, *extra: str, **kw: str) -> tuple[int, str]:
    async with DnsStub(ZONE) as stub:
        code, out, err = await run_cli(
            "canary",
            "check",
            "--config",
            str(_config(tmp_path, listen, **kw)),
            "--nameserver",
            f"127.0.0.1:{stub.port}",
            *extra,
        )
    assert err == "", err
    return code, out


async def test_canary_check_passes_when_the_mx_leads_to_this_receiver(tmp_path: Path) -> None:
    code, out = await canary_check(tmp_path, "127.0.77.25:25")
    assert code == 0, out
    assert "ok    canary.listen 127.0.77.25:25 is on port 25" in out
    assert "ok    127.0.77.25 is an address of this host" in out
    assert f"ok    {CANARY_DOMAIN} MX: mx.iso.test (preference 10): 127.0.77.25" in out
    assert f"ok    the preferred MX of {CANARY_DOMAIN} is 127.0.77.25" in out
    assert out.endswith(f"canary check: mail for {CANARY_DOMAIN} reaches this receiver\n")


async def test_canary_check_fails_off_port_25_unless_a_redirect_is_declared(
    tmp_path: Path,
) -> None:
    code, out = await canary_check(tmp_path, "127.0.77.25:2526")
    assert code == 1
    assert "FAIL  canary.listen is on port 2526, but an MX cannot name a port" in out
    code, out = await canary_check(tmp_path, "127.0.77.25:2526", "--redirected")
    assert code == 0, out
    assert "which you say a port redirect on this host sends to 2526 (not checked)" in out


@pytest.mark.parametrize(
    ("listen", "domain", "failure"),
    [
        # the MX names another address
        ("127.0.77.26:25", CANARY_DOMAIN, "no MX of canary.iso.test points at canary.listen's"),
        # a documentation address: not one of this host's, and the MX does not name it
        ("192.0.2.250:25", CANARY_DOMAIN, "192.0.2.250 is not an address of this host"),
        # only the backup MX is ours: relays try the preferred one first
        ("127.0.77.25:25", "elsewhere.test", "is only a less preferred MX of elsewhere.test"),
        ("127.0.77.25:25", "nowhere.test", "canary.domain nowhere.test does not exist in DNS"),
    ],
)
async def test_canary_check_names_what_is_wrong(
    tmp_path: Path, listen: str, domain: str, failure: str
) -> None:
    code, out = await canary_check(tmp_path, listen, domain=domain)
    assert code == 1, out
    assert failure in out, out
    assert "canary check: " in out and "problem(s)" in out


async def test_canary_check_refuses_a_bad_nameserver(tmp_path: Path) -> None:
    code, out, err = await run_cli(
        "canary",
        "check",
        "--config",
        str(_config(tmp_path, "127.0.77.25:25")),
        "--nameserver",
        "dns.example",
    )
    assert (code, out) == (2, "")
    assert err == "relayaudit: --nameserver: 'dns.example' is not ADDRESS or ADDRESS:PORT\n"


# -- receiving on port 25 without root: the systemd drop-in ---------------------------------------

UNIT = ROOT / "deploy" / "systemd" / "relayaudit.service"
DROP_IN = ROOT / "deploy" / "systemd" / "relayaudit.service.d" / "canary-port-25.conf"


def _drop_in_keys() -> dict[str, str]:
    keys = {}
    for line in DROP_IN.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys[key] = value
    return keys


def test_the_drop_in_grants_only_binding_low_ports() -> None:
    # the unit empties both sets; the ambient capability needs the bounding set to hold it
    assert _drop_in_keys() == {
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    }


def _unit_dir(tmp_path: Path, drop_in: str) -> Path:
    return unit_copy(tmp_path, {DROP_IN.name: drop_in})


def test_systemd_analyze_verifies_the_unit_with_the_port_25_drop_in(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed; the drop-in's keys are checked above")
    # verify reads the drop-in beside the unit: a bad line in it must show (the check checks)
    broken = _unit_dir(
        tmp_path / "broken", DROP_IN.read_text() + "AmbientCapability=CAP_NET_BIND_SERVICE\n"
    )
    proc = subprocess.run(
        [exe, "verify", str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert DROP_IN.name in proc.stderr and "AmbientCapability" in proc.stderr, proc.stderr
    unit = _unit_dir(tmp_path / "good", DROP_IN.read_text())
    problems = verify_problems(exe, unit)
    assert problems == "", problems


def test_the_drop_in_takes_effect_and_exposure_stays_low(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    unit = _unit_dir(tmp_path, DROP_IN.read_text())
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no offline security review: {proc.stderr.strip()}")
    lines = proc.stdout.splitlines()
    # both sets now hold the capability (the unit alone has neither: test_deploy_manifests)
    assert any("✗ AmbientCapabilities=" in line for line in lines), proc.stdout
    assert any("✗ CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE" in line for line in lines)
    # and nothing else: every other capability stays out of the bounding set
    assert sum("✗ CapabilityBoundingSet=" in line for line in lines) == 1, proc.stdout
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert level is not None and float(level.group(1)) <= 2.0, proc.stdout
