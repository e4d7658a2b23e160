"""The scope guard: unusable space refused, IPv4 written in IPv6 read as IPv4, zone ids refused, large scopes bounded.

The property tests draw scopes, targets, exclusions and address forms; one of them sweeps and
checks on loopback in a child process whose audit hook sees every connect (tests/connect_audit.py).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ROOT, run_cli, run_main
from connect_audit import records
from daemon_harness import DaemonProcess, base_config, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayaudit.cli import main
from relayaudit.config import load_config, parse_config
from relayaudit.errors import ConfigError, ExitCode
from relayaudit.targets import TargetSpace

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TESTS = Path(__file__).resolve().parent

# The rule, written out here independently of relayaudit/scope.py.
UNUSABLE_TEXT = (
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "240.0.0.0/4",
    "169.254.0.0/16",
    "fe80::/10",
)
UNUSABLE = [ipaddress.ip_network(n) for n in UNUSABLE_TEXT]


def v4_of(net: Network) -> Network | None:
    """The IPv4 addresses an IPv6 network reaches in IPv4-mapped or IPv4-compatible form."""
    if net.version == 4:
        return net
    value, prefix = int(net.network_address), net.prefixlen
    for top in (0xFFFF << 32, 0):  # ::ffff:0:0/96, then ::/96
        if prefix >= 96 and value >> 32 == top >> 32 and net != ipaddress.ip_network("::1/128"):
            return ipaddress.IPv4Network((value & 0xFFFFFFFF, prefix - 96))
        if prefix < 96 and (top >> (128 - prefix)) == (value >> (128 - prefix)):
            return ipaddress.IPv4Network("0.0.0.0/0")
    return None


def reached(net: Network) -> list[Network]:
    """Every network `net` can connect to: itself, and the IPv4 it holds."""
    v4 = v4_of(net)
    return [net] if v4 is None or v4 is net else [net, v4]


def unusable(net: Network) -> bool:
    return any(n.version == u.version and n.overlaps(u) for n in reached(net) for u in UNUSABLE)


def inside(address: Address, nets: list[Network]) -> bool:
    return any(address in n for n in nets)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relayaudit.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- the rule: space no campus host can hold ----------------------------------------------------

RULES = {
    "0.0.0.0/8": '"this network" (RFC 1122)',
    "::/128": "the unspecified address (RFC 4291)",
    "224.0.0.0/4": "IPv4 multicast (RFC 5771)",
    "ff00::/8": "IPv6 multicast (RFC 4291)",
    "240.0.0.0/4": "reserved, with the broadcast address 255.255.255.255 (RFC 1112)",
    "169.254.0.0/16": "IPv4 link-local (RFC 3927)",
    "fe80::/10": "IPv6 link-local (RFC 4291)",
}
TAIL = ": no campus host can hold those addresses, so relayaudit never connects to them"


@pytest.mark.parametrize(
    ("written", "rule"),
    [
        ("0.0.0.0/0", "0.0.0.0/8"),
        ("0.0.0.0/32", "0.0.0.0/8"),
        ("::/0", "::/128"),
        ("::/128", "::/128"),
        ("224.0.0.0/24", "224.0.0.0/4"),
        ("ff02::1/128", "ff00::/8"),
        ("255.255.255.255/32", "240.0.0.0/4"),
        ("240.0.0.0/4", "240.0.0.0/4"),
        ("169.254.169.254/32", "169.254.0.0/16"),
        ("fe80::/64", "fe80::/10"),
    ],
)
def test_unusable_scope_is_refused_with_range_rule_and_line(
    tmp_path: Path, written: str, rule: str
) -> None:
    path = write(
        tmp_path,
        f'# campus\nscope = [\n  "192.0.2.0/24",\n  "{written}",\n]\ntargets = ["192.0.2.0/24"]\n',
    )
    net = ipaddress.ip_network(written)
    assert error_of(path).splitlines() == [
        f"{path}: scope[1]: line 4: '{net}' overlaps {rule}, {RULES[rule]}{TAIL}",
        f"{path}: targets: not checked against scope, as scope is invalid",
    ]


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        (
            "targets",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24", "224.0.0.0/28"]\n',
            "targets[1]: line 2: '224.0.0.0/28' overlaps 224.0.0.0/4",
        ),
        (
            "exclude",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n\nexclude = ["0.0.0.0/32"]\n',
            "exclude[0]: line 4: '0.0.0.0/32' overlaps 0.0.0.0/8",
        ),
        (
            "approved",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
            '[[approved]]\naddress = "192.0.2.25"\n[[approved]]\nport = 25\naddress = "fe80::1"\n',
            "approved[1].address: line 7: 'fe80::1/128' overlaps fe80::/10",
        ),
        (
            "allow_from",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
            '[deploy]\nallow_from = ["198.51.100.0/24", "0.0.0.0/0"]\n',
            "deploy.allow_from[1]: line 4: '0.0.0.0/0' overlaps 0.0.0.0/8",
        ),
        (
            "mapped supernet",
            'scope = ["192.0.2.0/24", "::8000:0:0/81"]\ntargets = ["192.0.2.0/24"]\n',
            "scope[1]: line 1: '::8000:0:0/81' holds ::ffff:0:0/96, all of IPv4 written in IPv6, "
            "and so overlaps 0.0.0.0/8",
        ),
        (
            "mapped multicast",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\nexclude = ["::ffff:224.0.0.0/100"]\n',
            "exclude[0]: line 3: '::ffff:e000:0/100' (IPv4 224.0.0.0/4 written in IPv6) overlaps "
            "224.0.0.0/4",
        ),
        (
            "compat this-network",
            'scope = ["192.0.2.0/24", "::/96"]\ntargets = ["192.0.2.0/24"]\n',
            "scope[1]: line 1: '::/96' overlaps ::/128",
        ),
        (
            "zone id",
            'scope = ["192.0.2.0/24", "2001:db8::1%eth0/128"]\ntargets = ["192.0.2.0/24"]\n',
            "scope[1]: line 1: '2001:db8::1%eth0/128' has a zone id (%eth0): zone ids are refused",
        ),
        (
            "zone id in source_address",
            'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\nsource_address = "2001:db8::1%2"\n',
            "source_address: line 3: '2001:db8::1%2' has a zone id (%2)",
        ),
    ],
)
def test_every_range_key_is_guarded(tmp_path: Path, key: str, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path).startswith(f"{path}: {message}"), key


def test_loopback_private_and_documentation_ranges_stay_allowed(tmp_path: Path) -> None:
    nets = [
        "127.0.0.0/9",
        "::1/128",
        "10.0.0.0/10",
        "192.168.0.0/16",
        "fd00::/32",
        "192.0.2.0/24",
        "2001:db8::/32",
    ]
    config = load_config(
        write(tmp_path, f"scope = {json.dumps(nets)}\ntargets = ['127.0.0.0/28']\n")
    )
    assert [str(n) for n in config.scope] == nets


# -- IPv4 written in IPv6 ------------------------------------------------------------------


def test_ipv4_written_in_ipv6_is_read_as_ipv4(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            'scope = ["::ffff:192.0.2.0/120", "::198.51.100.0/120"]\n'
            'targets = ["192.0.2.0/28", "::ffff:198.51.100.0/124"]\n'
            'exclude = ["::ffff:192.0.2.5/128", "198.51.100.7/32"]\n'
            'source_address = "::ffff:192.0.2.200"\n'
            '[[approved]]\naddress = "::ffff:c000:219"\n',
        )
    )
    assert [str(n) for n in config.scope] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert [str(n) for n in config.targets] == ["192.0.2.0/28", "198.51.100.0/28"]
    assert [str(n) for n in config.exclude] == ["192.0.2.5/32", "198.51.100.7/32"]
    assert [str(a) for a in config.source_address] == ["192.0.2.200"]
    assert str(config.approved[0].address) == "192.0.2.25/32"
    walked = {str(a) for _, a in TargetSpace(config.targets, config.exclude).iter_shard()}
    assert "192.0.2.5" not in walked and "198.51.100.7" not in walked and len(walked) == 30
    # an address in any form is checked as the IPv4 it reaches
    assert config.in_scope(ipaddress.ip_address("::ffff:192.0.2.9"))
    assert config.in_scope(ipaddress.ip_address("::192.0.2.9"))
    assert not config.in_scope(ipaddress.ip_address("::ffff:203.0.113.9"))
    assert config.is_approved(ipaddress.ip_address("::ffff:192.0.2.25"), 25) is not None


def test_ipv6_scope_no_longer_holds_ipv4_hosts(tmp_path: Path) -> None:
    """The review's case: an IPv6 scope holding ::ffff:a.b.c.d let `check` reach any IPv4 host."""
    path = write(
        tmp_path, 'scope = ["127.0.122.0/24", "::ffff:0:0/96"]\ntargets = ["127.0.122.0/28"]\n'
    )
    assert error_of(path).splitlines() == [
        f"{path}: scope[1]: line 1: '::ffff:0:0/96' (IPv4 0.0.0.0/0 written in IPv6) overlaps "
        f"0.0.0.0/8, {RULES['0.0.0.0/8']}{TAIL}",
        f"{path}: targets: not checked against scope, as scope is invalid",
    ]


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A listening socket on 127.0.123.5 that never accepts: a connect shows in its queue."""
    sock = socket.socket()
    sock.bind(("127.0.123.5", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.mark.usefixtures("loopback_only")
def test_check_of_mapped_address_under_ipv6_scope_connects_nowhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    cfg = write(
        tmp_path,
        'scope = ["127.0.122.0/24", "::ffff:0:0/96"]\ntargets = ["127.0.122.0/28"]\n'
        '[timeouts]\nconnect = "1s"\ncommand = "1s"\ngreeting = "1s"\nsession = "2s"\n',
    )
    code, out, err = run_main(
        capsys, "check", "::ffff:127.0.123.5", "--config", str(cfg), "--port", str(port)
    )
    assert (code, out) == (ExitCode.CONFIG, ""), err  # the config's scope is at fault
    assert "overlaps 0.0.0.0/8" in err
    assert not connected(sock)


@pytest.mark.usefixtures("loopback_only")
def test_check_of_mapped_address_is_checked_as_ipv4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    cfg = write(tmp_path, 'scope = ["127.0.122.0/24"]\ntargets = ["127.0.122.0/28"]\n')
    for form in ("::ffff:127.0.123.5", "::127.0.123.5", "::ffff:7f00:7b05"):
        code, _, err = run_main(capsys, "check", form, "--config", str(cfg), "--port", str(port))
        assert code == 2 and err == (
            f"relayaudit: host {form!r}: 127.0.123.5 is outside scope (127.0.122.0/24) of {cfg}\n"
        )
    assert not connected(sock)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("fe80::1%eth0", "'fe80::1%eth0' has a zone id (%eth0): zone ids are refused"),
        ("::1%1", "'::1%1' has a zone id (%1): zone ids are refused"),
        ("224.0.0.251", "'224.0.0.251' overlaps 224.0.0.0/4, IPv4 multicast (RFC 5771)"),
        ("255.255.255.255", "'255.255.255.255' overlaps 240.0.0.0/4"),
        ("::ffff:0.0.0.1", "'::ffff:0:1' (IPv4 0.0.0.1 written in IPv6) overlaps 0.0.0.0/8"),
        ("169.254.169.254", "'169.254.169.254' overlaps 169.254.0.0/16"),
    ],
)
@pytest.mark.usefixtures("loopback_only")
def test_check_refuses_unusable_addresses_and_zone_ids(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, host: str, message: str
) -> None:
    # a loopback scope: code without this guard stops at the scope check, never connects
    cfg = write(tmp_path, 'scope = ["127.0.0.0/8", "::1/128"]\ntargets = ["127.0.122.0/28"]\n')
    code, out, err = run_main(capsys, "check", host, "--config", str(cfg), "--port", "2")
    assert (code, out) == (2, "")
    assert err.startswith(f"relayaudit: host {host!r}: {message}"), err


@pytest.mark.usefixtures("loopback_only")
def test_check_without_config_probes_the_ipv4_address(
    capsys: pytest.CaptureFixture[str], listener: tuple[socket.socket, int]
) -> None:
    sock, port = listener
    sock.close()  # refused: a quick "closed"
    code, out, _ = run_main(capsys, "check", "::ffff:127.0.123.5", "--port", str(port), "--json")
    assert code == 0
    assert json.loads(out)["result"]["address"] == "127.0.123.5"


# -- how large a scope may be -----------------------------------------------------------------


HINT = (
    '; set allow_large_scope = "<reason>" if that is meant (the reason is logged with every sweep)'
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'scope = ["10.0.0.0/8", "172.16.0.0/12"]\ntargets = ["10.0.0.0/24"]\n',
            "scope: line 1: the IPv4 ranges (10.0.0.0/8, 172.16.0.0/12) hold 17,825,792 "
            "addresses, more than 16,777,216 (a /8)" + HINT,
        ),
        (
            'scope = ["10.0.0.0/8", "2001:db8::/31"]\ntargets = ["10.0.0.0/24"]\n',
            "scope[1]: line 1: '2001:db8::/31' is larger than a /32, a campus's IPv6 "
            "allocation" + HINT,
        ),
        (
            'scope = ["2001:db8::/32"]\ntargets = [\n  "2001:db8::/104",\n  "2001:db8:1::/104",\n]\n',
            "targets: line 2: the IPv6 target ranges (2001:db8::/104, 2001:db8:1::/104) hold "
            "33,554,432 addresses after exclusions, more than the 16,777,216 (2**24) a sweep "
            "enumerates" + HINT,
        ),
        (
            'scope = ["10.0.0.0/8"]\ntargets = ["10.0.0.0/8"]\n[deploy]\nallow_from = ["11.0.0.0/8", "12.0.0.0/16"]\n',
            "deploy.allow_from: line 4: the IPv4 ranges (11.0.0.0/8, 12.0.0.0/16) hold "
            "16,842,752 addresses, more than 16,777,216 (a /8)" + HINT,
        ),
    ],
)
def test_large_scopes_need_a_reason(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {message}"
    config = load_config(
        write(tmp_path, 'allow_large_scope = "ISO-0042: the whole university"\n' + text)
    )
    assert config.allow_large_scope == "ISO-0042: the whole university"


def test_the_bounds_themselves_are_allowed(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            'scope = ["10.0.0.0/8", "2001:db8::/32"]\n'
            'targets = ["10.0.0.0/8", "2001:db8::/104"]\n'
            'exclude = []\n[deploy]\nallow_from = ["11.0.0.0/8", "2001:db8:ffff::/48"]\n',
        )
    )
    assert len(TargetSpace(config.targets, config.exclude)) == 2 * 2**24
    # exclusions bring targets under the bound
    config = load_config(
        write(
            tmp_path,
            'scope = ["2001:db8::/32"]\ntargets = ["2001:db8::/104", "2001:db8:1::/120"]\n'
            'exclude = ["2001:db8::/120"]\n',
        )
    )
    assert len(TargetSpace(config.targets, config.exclude)) == 2**24


@pytest.mark.parametrize("reason", ["", "   ", "line\nbreak", "x" * 201])
def test_allow_large_scope_must_be_a_reason(tmp_path: Path, reason: str) -> None:
    path = write(
        tmp_path,
        f'allow_large_scope = {json.dumps(reason)}\nscope = ["10.0.0.0/8"]\ntargets = ["10.0.0.0/8"]\n',
    )
    assert error_of(path).startswith(f"{path}: allow_large_scope: ")


async def test_the_reason_is_printed_with_every_sweep(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        'allow_large_scope = "ISO-0042: lab test"\nscope = ["127.0.122.0/24"]\n'
        f'targets = ["127.0.122.0/30"]\nports = [2722]\n[output]\nfindings = "{tmp_path / "f.jsonl"}"\n',
    )
    code, _, err = await run_cli("sweep", "--config", str(cfg))
    assert code == 0
    assert "relayaudit: a large scope, allowed: ISO-0042: lab test\n" in err


async def test_the_daemon_logs_the_reason_with_every_sweep(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data = base_config(tmp_path, "127.0.122.0/30", 2722)
    data["allow_large_scope"] = "ISO-0042: lab test"
    daemon = DaemonProcess(write_config(tmp_path / "relayaudit.toml", data), tmp_path / "log.jsonl")
    daemons.append(daemon)
    await daemon.start()
    await daemon.wait_for(lambda: len(daemon.events("sweep.start")) >= 2, 30, "two sweeps")
    assert await daemon.stop() == 0
    starts = daemon.events("sweep.start")
    assert [e["allow_large_scope"] for e in starts] == ["ISO-0042: lab test"] * len(starts)


# -- properties ---------------------------------------------------------------------------------


def _forms(net: Network) -> list[str]:
    """Ways to write `net` (IPv4 also as IPv4-mapped and IPv4-compatible IPv6)."""
    if net.version == 6:
        return [str(net)]
    value = int(net.network_address)
    return [
        str(net),
        f"::ffff:{net.network_address}/{net.prefixlen + 96}",
        f"{ipaddress.IPv6Address((0xFFFF << 32) | value)}/{net.prefixlen + 96}",
        f"::{net.network_address}/{net.prefixlen + 96}",
    ]


@st.composite
def written_networks(draw: st.DrawFn) -> str:
    """A network as an operator might write one: campus, unusable, mapped, huge, zoned."""
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "unusable", "wide", "zone"]))
    if kind == "v4":
        base = draw(st.sampled_from(["192.0.2.0", "198.51.100.0", "127.0.0.0", "10.1.2.0"]))
        prefix = draw(st.integers(26, 32))
        offset = draw(st.integers(0, 255)) >> (32 - prefix) << (32 - prefix)
        net = ipaddress.IPv4Network((int(ipaddress.IPv4Address(base)) + offset, prefix))
        return draw(st.sampled_from(_forms(net)))
    if kind == "v6":
        prefix = draw(st.integers(122, 128))
        offset = draw(st.integers(0, 255)) >> (128 - prefix) << (128 - prefix)
        return str(
            ipaddress.IPv6Network((int(ipaddress.IPv6Address("2001:db8::")) + offset, prefix))
        )
    if kind == "unusable":
        bad = ipaddress.ip_network(draw(st.sampled_from(UNUSABLE_TEXT)))
        prefix = draw(st.integers(bad.prefixlen, bad.max_prefixlen))
        sub = ipaddress.ip_network((bad.network_address, prefix))
        return draw(st.sampled_from(_forms(sub)))
    if kind == "wide":
        return draw(
            st.sampled_from(
                [
                    "0.0.0.0/0",
                    "::/0",
                    "::ffff:0:0/96",
                    "::/96",
                    "::8000:0:0/81",
                    "128.0.0.0/1",
                    "::/64",
                ]
            )
        )
    return draw(st.sampled_from(["2001:db8::1%eth0/128", "fe80::%lo/64", "::1%1/128"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scope=st.lists(written_networks(), min_size=1, max_size=3),
    targets=st.lists(written_networks(), min_size=1, max_size=3),
    exclude=st.lists(written_networks(), max_size=2),
    probes=st.lists(
        st.sampled_from(
            [
                "::ffff:192.0.2.9",
                "::192.0.2.9",
                "192.0.2.9",
                "::ffff:7f00:1",
                "::1",
                "fe80::1%eth0",
                "::ffff:198.51.100.7",
                "2001:db8::5",
            ]
        ),
        max_size=3,
    ),
)
def test_an_accepted_config_walks_only_inside_its_scope(
    scope: list[str], targets: list[str], exclude: list[str], probes: list[str]
) -> None:
    """Whatever was written: an accepted config never holds unusable space, and its walk never
    leaves the scope nor enters an exclusion, read with IPv4 written in IPv6 as that IPv4."""
    try:
        config = parse_config({"scope": scope, "targets": targets, "exclude": exclude})
    except ConfigError as exc:
        assert all(line.startswith("<memory>: ") for line in str(exc).splitlines())
        return
    written_scope = [n for text in scope for n in reached(ipaddress.ip_network(text))]
    written_exclude = [n for text in exclude for n in reached(ipaddress.ip_network(text))]
    for net in (*config.scope, *config.targets, *config.exclude):
        assert not unusable(net), net
        assert v4_of(net) in (None, net), f"{net}: still IPv4 written in IPv6"
        assert "%" not in str(net), f"{net}: a zone id"
    space = TargetSpace(config.targets, config.exclude)
    for _, address in itertools.islice(space.iter_shard(), 4096):
        assert inside(address, written_scope), f"{address} outside the scope written"
        assert not inside(address, written_exclude), f"{address} is excluded"
    for text in probes:
        address = ipaddress.ip_address(text)
        if config.in_scope(address):
            assert inside(address, written_scope) or any(
                v4 is not None and v4.network_address in n
                for v4 in [v4_of(ipaddress.ip_network(address))]
                for n in written_scope
            )


# -- the same, with real connects on loopback, seen by an audit hook in a child process -----------

LOOP_PORT = 2724
LOOP = ipaddress.IPv4Network("127.0.124.0/23")


@st.composite
def loopback_plans(draw: st.DrawFn) -> dict[str, Any]:
    """Scope, targets and exclusions inside 127.0.124.0/24, each written in a random form.

    The plan's own networks are what must be connected to; `extra` is a wide entry a careless
    operator might add to the scope (all of IPv4 written in IPv6), which must be refused.
    """

    def block(within: ipaddress.IPv4Network, smallest: int) -> ipaddress.IPv4Network:
        prefix = draw(st.integers(max(within.prefixlen, smallest), 32))
        subnets = list(within.subnets(new_prefix=prefix))
        return draw(st.sampled_from(subnets))

    scope = [
        block(ipaddress.IPv4Network("127.0.124.0/24"), 26) for _ in range(draw(st.integers(1, 2)))
    ]
    targets = [block(draw(st.sampled_from(scope)), 27) for _ in range(draw(st.integers(1, 2)))]
    exclude = [block(draw(st.sampled_from(targets)), 29) for _ in range(draw(st.integers(0, 2)))]
    checks = draw(st.lists(st.integers(0, 511), min_size=1, max_size=3))
    check_forms = [
        draw(
            st.sampled_from(
                [
                    str(a),
                    f"::ffff:{a}",
                    f"::{a}",
                    str(ipaddress.IPv6Address((0xFFFF << 32) | int(a))),
                    f"::ffff:{a}%lo",
                ]
            )
        )
        for a in (LOOP[c] for c in checks)
    ]
    return {
        "scope": scope,
        "targets": targets,
        "exclude": exclude,
        "written": {
            "scope": [draw(st.sampled_from(_forms(n))) for n in scope]
            + draw(st.sampled_from([[], [], ["::ffff:0:0/96"], ["::8000:0:0/81"], ["::/96"]])),
            "targets": [draw(st.sampled_from(_forms(n))) for n in targets],
            "exclude": [draw(st.sampled_from(_forms(n))) for n in exclude],
        },
        "checks": check_forms,
    }


def sweeps_connect_only_inside_scope() -> None:
    """Run in the child of tests/connect_audit.py: `sweep` and `check` under random plans."""

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(plan=loopback_plans())
    def prop(plan: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "relayaudit.toml"
            w = plan["written"]
            cfg.write_text(
                f"scope = {json.dumps(w['scope'])}\ntargets = {json.dumps(w['targets'])}\n"
                f"exclude = {json.dumps(w['exclude'])}\nports = [{LOOP_PORT}]\n"
                '[timeouts]\nconnect = "1s"\ncommand = "1s"\ngreeting = "1s"\nsession = "2s"\n'
                "[limits]\nrate = 100000\nsubnet_rate = 100000\n"
                f'[output]\nfindings = "{Path(tmp) / "findings.jsonl"}"\n'
            )
            records.clear()
            main(["sweep", "--config", str(cfg)])
            swept = list(records)
            for address in plan["checks"]:
                records.clear()
                main(["check", address, "--config", str(cfg), "--port", str(LOOP_PORT)])
                for event, family, host, port in records:
                    assert event == "socket.connect" and port == LOOP_PORT, (event, host, port)
                    assert family == "AF_INET", f"check {address} connected to {host} over {family}"
                    assert inside(ipaddress.ip_address(host), plan["scope"]), (address, host)
        expected = {a for n in plan["targets"] for a in n} - {a for n in plan["exclude"] for a in n}
        connected = set()
        for event, family, host, port in swept:
            assert event == "socket.connect" and port == LOOP_PORT, (event, host, port)
            assert family == "AF_INET", f"swept {host} over {family}"
            address = ipaddress.ip_address(host)
            assert inside(address, plan["scope"]), f"{address} outside the scope"
            assert not inside(address, plan["exclude"]), f"{address} is excluded"
            connected.add(address)
        # a correct guard refuses the wide entry (and so sweeps nothing); else all the targets
        assert connected == (set() if len(w["scope"]) > len(plan["scope"]) else expected)

    prop()


def test_sweeps_and_checks_connect_only_inside_scope(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "connect_audit.py"), str(record), "property"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": f"{TESTS}:{ROOT}", "PATH": "/usr/bin:/bin", "COLUMNS": "80"},
        check=False,
    )
    # the property itself checks that the sweeps connected to every target (so the hook saw them)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
