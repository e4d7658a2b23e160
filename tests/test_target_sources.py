"""targets_from and --targets-file: lists, MX hosts, zone files and transfers (real NSD), faults, the compact list."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from dns_faults import faulty_dns
from nsd_lab import nsd_server
from toml_writer import toml_document

from relayaudit.addresses import AddressSetBuilder
from relayaudit.cli import main
from relayaudit.config import Config, config_fingerprint, load_config, parse_config
from relayaudit.deploy import render
from relayaudit.errors import ConfigError, ExitCode
from relayaudit.evidence import address_order
from relayaudit.records import RECORD_SCHEMA_VERSION
from relayaudit.sources import (
    Loaded,
    SourceCache,
    SourceError,
    load_targets,
    read_list,
    sweep_fingerprint,
)
from relayaudit.targets import Shard, TargetSpace

ZONE = """$ORIGIN campus.test.
$TTL 300
@      SOA   ns1 hostmaster 2024010101 3600 600 86400 300
@      NS    ns1
@      MX    10 mx1
@      MX    20 mx2
ns1    A     127.0.0.53
mx1    A     127.0.160.10
mx1    AAAA  ::1
mx2    A     127.0.160.20
www    A     192.0.2.80
lab    A     127.0.160.30
"""


def config(tmp_path: Path, **extra: Any) -> Config:
    data: dict[str, Any] = {"scope": ["127.0.160.0/24", "::1"], "targets": [], **extra}
    return parse_config(data, source=str(tmp_path / "relayaudit.toml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def listed(loaded: Loaded) -> list[str]:
    v4 = [str(ipaddress.IPv4Address(v)) for v in loaded.addresses.v4]
    v6 = [str(ipaddress.IPv6Address(v)) for v in loaded.addresses.v6]
    return v4 + v6


# -- lists -----------------------------------------------------------------------------------


def test_a_list_with_comments_duplicates_mapped_forms_and_bad_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ipam.txt",
        "# IPAM export\n"
        "\n"
        "127.0.160.9\n"
        "127.0.160.2   # a comment after the address\n"
        "127.0.160.9\n"  # a duplicate
        "::ffff:127.0.160.7\n"  # IPv4-mapped: read as the IPv4 it reaches
        "::1\n"
        "127.0.160.64/30\n"  # a network: a range, not expanded
        "not-an-address\n"
        "127.0.160.1/24\n"  # host bits set
        "fe80::1%eth0\n"
        "224.0.0.1\n"
        "192.0.2.7\n",  # outside scope
    )
    loaded = read_list(
        path.open("rb"), where=str(path), label=f"file {path}", config=config(tmp_path)
    )
    assert listed(loaded) == ["127.0.160.2", "127.0.160.7", "127.0.160.9", "::1"]
    assert [str(n) for n in loaded.networks] == ["127.0.160.64/30"]
    assert loaded.count == 8
    assert (loaded.read, loaded.bad, loaded.out_of_scope) == (11, 4, 1)
    assert loaded.problems == (
        f"{path}:9: 'not-an-address' is not an IP address or network",
        f"{path}:10: '127.0.160.1/24' has host bits set",
        f"{path}:11: 'fe80::1%eth0' has a zone id (%eth0): zone ids are refused, as a scope is "
        "the same on every interface",
        f"{path}:12: '224.0.0.1' overlaps 224.0.0.0/4, IPv4 multicast (RFC 5771): no campus host "
        "can hold those addresses, so relayaudit never connects to them",
        f"{path}:13: '192.0.2.7' is outside scope (127.0.160.0/24, ::1/128)",
    )


def test_out_of_scope_lines_may_be_fatal(tmp_path: Path) -> None:
    path = write(tmp_path / "ipam.txt", "127.0.160.9\n\n198.51.100.4\n")
    strict = config(tmp_path, targets_out_of_scope="fail")
    with pytest.raises(ConfigError, match=rf"^{path}:3: '198.51.100.4' is outside scope"):
        read_list(path.open("rb"), where=str(path), label="file", config=strict)


def test_non_utf8_and_oversized_lines_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "ipam.txt"
    path.write_bytes(b"127.0.160.9\n\xff\xfe\n::/0\n")
    loaded = read_list(
        path.open("rb"), where="ipam.txt", label="file", config=config(tmp_path)
    )
    assert listed(loaded) == ["127.0.160.9"]
    assert loaded.problems[0] == "ipam.txt:2: not UTF-8 text (byte 0)"
    assert loaded.problems[1].startswith("ipam.txt:3: '::/0' ")


def test_a_missing_list_file_names_the_entry_and_the_file(tmp_path: Path) -> None:
    cfg = config(tmp_path, targets_from=[{"file": "nowhere.txt"}])
    with pytest.raises(SourceError) as caught:
        load_targets(cfg)
    assert str(caught.value) == (
        f"{cfg.source}: targets_from[0] (file {tmp_path / 'nowhere.txt'}): cannot read "
        f"'{tmp_path / 'nowhere.txt'}': No such file or directory"
    )
    assert caught.value.exit_code is ExitCode.CONFIG


# -- the compact list in the target space ----------------------------------------------------


def test_a_list_is_walked_once_with_the_ranges_by_the_same_permutation() -> None:
    builder = AddressSetBuilder()
    for text in ["192.0.2.5", "192.0.2.200", "198.51.100.1", "198.51.100.2", "2001:db8::1", "198.51.100.2"]:
        address = ipaddress.ip_address(text)
        builder.add(address.version, int(address))
    addresses = builder.build()
    space = TargetSpace(
        [ipaddress.ip_network("192.0.2.0/25")],
        [ipaddress.ip_network("198.51.100.1/32")],
        seed=7,
        listed=addresses,
    )
    walked = [a for _, a in space.iter_shard_text()]
    expected = {f"192.0.2.{i}" for i in range(128)} | {"192.0.2.200", "198.51.100.2", "2001:db8::1"}
    assert len(walked) == len(space) == len(expected) == 131
    assert set(walked) == expected
    assert walked != sorted(walked, key=address_order)  # a pseudo-random order
    # shards partition it, and a resumed walk continues the same order
    shards = [a for i in range(3) for _, a in space.iter_shard_text(Shard(i, 3))]
    assert sorted(shards) == sorted(walked)
    assert [a for _, a in space.iter_shard_text(start=100)] == walked[100:]
    assert ipaddress.ip_address("198.51.100.2") in space
    assert ipaddress.ip_address("198.51.100.1") not in space


def test_the_list_is_compact_and_its_digest_is_its_contents() -> None:
    one, two = AddressSetBuilder(), AddressSetBuilder()
    for i in range(1000):
        one.add(4, 0x0A000000 + i)
    for i in reversed(range(1000)):
        two.add(4, 0x0A000000 + i)
        two.add(4, 0x0A000000 + i)
    a, b = one.build(), two.build()
    assert len(a) == len(b) == 1000
    assert a.digest() == b.digest()
    assert a.v4.itemsize == 4  # type: ignore[attr-defined]  # an array of 32-bit integers
    three = AddressSetBuilder()
    three.add(4, 0x0A000000 + 1000)
    assert AddressSetBuilder().build().digest() != three.build().digest() != a.digest()


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"mx": "campus.test", "file": "x"}, "each entry names one source"),
        ({}, "each entry names one source: file, mx, zone_file or axfr (got none)"),
        ({"axfr": "campus.test"}, "axfr 'campus.test' needs server"),
        ({"file": "x", "server": "127.0.0.1"}, "server: a file entry asks no DNS server"),
        ({"mx": "campus.test", "origin": "campus.test"}, "origin: only a zone_file entry"),
        ({"file": "-"}, 'file: "-" (standard input) is for `relayaudit sweep --targets-file -`'),
        ({"mx": "not a name"}, "'not a name' is not a valid host or domain name"),
    ],
)
def test_bad_targets_from_entries(entry: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="targets_from\\[0\\]") as caught:
        config(tmp_path, targets_from=[entry])
    assert message in str(caught.value)


def test_targets_or_targets_from_is_required() -> None:
    with pytest.raises(ConfigError, match="targets: required key is missing"):
        parse_config({"scope": ["127.0.160.0/24"]})
    assert parse_config({"scope": ["127.0.160.0/24"], "targets": []}).targets == ()


def test_one_source_address_per_family() -> None:
    base = {"scope": ["192.0.2.0/24", "2001:db8::/48"], "targets": ["192.0.2.0/28", "2001:db8::/124"]}
    both = parse_config({**base, "source_address": ["203.0.113.10", "2001:db8:ffff::10"]})
    assert str(both.source_for(4)) == "203.0.113.10"
    assert str(both.source_for(6)) == "2001:db8:ffff::10"
    one = parse_config({**base, "source_address": "203.0.113.10"})
    assert one.unsourced_family(6) and not one.unsourced_family(4)
    with pytest.raises(ConfigError, match="must be one address, or one IPv4 and one IPv6"):
        parse_config({**base, "source_address": ["203.0.113.10", "203.0.113.11"]})


def test_the_fingerprint_of_a_config_without_lists_is_unchanged() -> None:
    """A sweep interrupted before the upgrade resumes after it: a config without lists hashes
    as it did before targets_from existed, and one source address dumps as the one string the
    key held then."""
    cfg = parse_config(
        {"scope": ["192.0.2.0/24"], "targets": ["192.0.2.0/24"], "source_address": "192.0.2.9"}
    )
    dump = cfg.model_dump_json(
        exclude={"report", "alerts", "targets_from", "targets_out_of_scope"}
        | {"owners", "owners_file", "owners_contact_domains"}  # issue 29: left out, as if absent
    )
    assert '"source_address":"192.0.2.9"' in dump
    assert config_fingerprint(cfg) == hashlib.sha256(dump.encode()).hexdigest()[:16]
    assert sweep_fingerprint(cfg, None) == config_fingerprint(cfg)
    unset = parse_config({"scope": ["192.0.2.0/24"], "targets": ["192.0.2.0/24"]})
    assert '"source_address":null' in unset.model_dump_json()


def test_a_changed_list_changes_the_sweep_fingerprint(tmp_path: Path) -> None:
    path = write(tmp_path / "ipam.txt", "127.0.160.9\n127.0.160.10\n")
    cfg = config(tmp_path, targets_from=[{"file": "ipam.txt"}])
    first = sweep_fingerprint(cfg, load_targets(cfg))
    write(path, "# reordered, with a comment\n127.0.160.10\n127.0.160.9\n127.0.160.9\n")
    assert sweep_fingerprint(cfg, load_targets(cfg)) == first  # the same addresses
    write(path, "127.0.160.10\n127.0.160.9\n127.0.160.11\n")
    assert sweep_fingerprint(cfg, load_targets(cfg)) != first
    assert first != config_fingerprint(cfg)


# -- DNS against a real NSD ------------------------------------------------------------------


def test_mx_axfr_and_zone_file_from_nsd(tmp_path: Path) -> None:
    zone_file = write(tmp_path / "dept.zone", ZONE.replace("campus.test.", "dept.campus.test."))
    with nsd_server(tmp_path / "nsd", {"campus.test": ZONE}) as nsd:
        cfg = config(
            tmp_path,
            targets_from=[
                {"mx": "campus.test", "server": "127.0.0.1", "port": nsd.port},
                {"axfr": "campus.test", "server": "127.0.0.1", "port": nsd.port},
                {"zone_file": "dept.zone"},
            ],
        )
        targets = load_targets(cfg)
    mx, axfr, zone = targets.sources
    assert listed(mx) == ["127.0.160.10", "127.0.160.20", "::1"]  # MX hosts' A and AAAA only
    assert mx.out_of_scope == 0
    assert listed(axfr) == ["127.0.160.10", "127.0.160.20", "127.0.160.30", "::1"]
    assert axfr.out_of_scope == 2  # ns1 and www: reported, skipped
    assert f"axfr campus.test from 127.0.0.1:{nsd.port}: www.campus.test A 192.0.2.80 is " \
        "outside scope (127.0.160.0/24, ::1/128)" in axfr.problems
    assert listed(zone) == listed(axfr)
    assert zone.label == f"zone_file {zone_file}"
    origins = {a: [str(o) for o in found] for a, found in targets.origins.items()}
    assert origins["127.0.160.30"] == [
        f"lab.campus.test A (axfr campus.test from 127.0.0.1:{nsd.port})",
        f"lab.dept.campus.test A (zone_file {zone_file})",
    ]
    assert origins["::1"][0] == f"mx1.campus.test AAAA (mx campus.test from 127.0.0.1:{nsd.port})"
    assert len(targets.space(cfg)) == 4


def test_a_transfer_nsd_does_not_allow_is_refused(tmp_path: Path) -> None:
    with nsd_server(tmp_path / "nsd", {"campus.test": ZONE}, xfr=False) as nsd:
        cfg = config(
            tmp_path, targets_from=[{"axfr": "campus.test", "server": "127.0.0.1", "port": nsd.port}]
        )
        with pytest.raises(SourceError, match=r"refused the zone transfer \(Zone transfer error: REFUSED\)"):
            load_targets(cfg)


def test_an_mx_domain_that_does_not_exist(tmp_path: Path) -> None:
    with nsd_server(tmp_path / "nsd", {"campus.test": ZONE}) as nsd:
        cfg = config(
            tmp_path,
            targets_from=[{"mx": "nx.campus.test", "server": "127.0.0.1", "port": nsd.port}],
        )
        with pytest.raises(
            SourceError,
            match=r"targets_from\[0\] \(mx nx.campus.test from .*\): "
            r"nx.campus.test does not exist \(NXDOMAIN\)",
        ):
            load_targets(cfg)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("refused", "refused the zone transfer (Zone transfer error: REFUSED)"),
        ("truncated", "closed the connection before the transfer was complete"),
        ("silent", "no answer from 127.0.0.1:{port} in time"),
    ],
)
def test_transfer_faults(fault: Any, message: str, tmp_path: Path) -> None:
    with faulty_dns(fault) as port:
        entry = {"axfr": "campus.test", "server": "127.0.0.1", "port": port, "timeout": "1s"}
        cfg = config(tmp_path, targets_from=[entry])
        with pytest.raises(SourceError) as caught:
            load_targets(cfg)
    assert str(caught.value).endswith(message.format(port=port))
    assert caught.value.exit_code is ExitCode.TEMPFAIL


def test_an_mx_lookup_that_times_out(tmp_path: Path) -> None:
    with faulty_dns("silent") as port:
        entry = {"mx": "campus.test", "server": "127.0.0.1", "port": port, "timeout": "1s"}
        with pytest.raises(SourceError, match=f"no answer from 127.0.0.1:{port} in time"):
            load_targets(config(tmp_path, targets_from=[entry]))


def test_a_zone_file_without_origin_and_one_with_a_syntax_error(tmp_path: Path) -> None:
    write(tmp_path / "bare.zone", ZONE.split("\n", 1)[1])
    with pytest.raises(SourceError, match="has no \\$ORIGIN: give the zone's name as origin"):
        load_targets(config(tmp_path, targets_from=[{"zone_file": "bare.zone"}]))
    given = load_targets(
        config(tmp_path, targets_from=[{"zone_file": "bare.zone", "origin": "campus.test"}])
    )
    assert len(given.addresses) == 4
    # dnspython names line 14 here (its tokenizer is past the newline): the message says 13
    broken = write(tmp_path / "broken.zone", ZONE + "mx3 A 127.0.160.999\n")
    with pytest.raises(SourceError) as caught:
        load_targets(config(tmp_path, targets_from=[{"zone_file": "broken.zone"}]))
    assert str(caught.value).endswith(
        f"(zone_file {broken}): {broken}:13: 'mx3 A 127.0.160.999': Text input is malformed."
    )
    write(broken, ZONE.replace("ns1    A", "ns1    A 127.0.0.999 ; a comment\nns2    A"))
    with pytest.raises(SourceError, match=f"{broken}:7: 'ns1    A 127.0.0.999 ; a comment'"):
        load_targets(config(tmp_path, targets_from=[{"zone_file": "broken.zone"}]))


# -- the daemon's last good list -------------------------------------------------------------


def test_an_unreadable_list_keeps_the_last_good_one(tmp_path: Path) -> None:
    """Regression guard for the issue's rule: a list that cannot be read never empties a sweep."""
    path = write(tmp_path / "ipam.txt", "127.0.160.9\n127.0.160.10\n")
    cfg = config(tmp_path, targets_from=[{"file": "ipam.txt"}, {"file": "other.txt"}])
    write(tmp_path / "other.txt", "127.0.160.11\n")
    cache = SourceCache()
    failures: list[tuple[str, str, int | None]] = []

    def failed(label: str, error: str, kept: Loaded | None) -> None:
        failures.append((label, error, kept.count if kept else None))

    first = cache.load(cfg, on_failure=failed)
    assert len(first.space(cfg)) == 3 and failures == []
    path.rename(tmp_path / "moved.txt")
    second = cache.load(cfg, on_failure=failed)
    assert len(second.space(cfg)) == 3
    assert second.digest == first.digest
    assert failures == [
        (
            f"file {path}",
            f"{cfg.source}: targets_from[0] (file {path}): cannot read '{path}': "
            "No such file or directory",
            2,
        )
    ]
    assert cache.stale == {f"file {path}"}
    write(path, "127.0.160.12\n")  # back, and changed
    third = cache.load(cfg, on_failure=failed)
    assert cache.stale == set()
    assert sorted(a for _, a in third.space(cfg).iter_shard_text()) == [
        "127.0.160.11",
        "127.0.160.12",
    ]


async def test_the_daemon_counts_a_failed_read_and_keeps_the_list(tmp_path: Path) -> None:
    from relayaudit.daemon import Daemon  # noqa: PLC0415

    path = write(tmp_path / "ipam.txt", "127.0.160.9\n")
    daemon = Daemon(tmp_path / "relayaudit.toml")
    daemon.config = config(tmp_path, targets_from=[{"file": "ipam.txt"}])
    await daemon._read_targets()
    label = f"file {path}"
    assert f'relayaudit_target_source_stale{{source="{label}"}} 0\n' in daemon._metrics.render()
    path.unlink()
    targets = await daemon._read_targets()
    assert targets is not None and len(targets.space(daemon.config)) == 1
    text = daemon._metrics.render()
    assert f'relayaudit_target_source_failures_total{{source="{label}"}} 1\n' in text
    assert f'relayaudit_target_source_stale{{source="{label}"}} 1\n' in text
    assert f'relayaudit_target_source_addresses{{source="{label}"}} 1\n' in text


def test_a_source_never_read_adds_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, targets_from=[{"file": "missing.txt"}])
    failures: list[str] = []
    targets = SourceCache().load(cfg, on_failure=lambda label, error, kept: failures.append(label))
    assert failures == [f"file {tmp_path / 'missing.txt'}"]
    assert len(targets.space(cfg)) == 0
    assert targets.sources == () and len(targets.addresses) == 0


# -- config check and deploy render ----------------------------------------------------------


def test_config_check_counts_each_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "ipam.txt", "127.0.160.9\n127.0.160.9\n::1\n192.0.2.1\nbad\n")
    with nsd_server(tmp_path / "nsd", {"campus.test": ZONE}) as nsd:
        data = {
            "scope": ["127.0.160.0/24", "::1"],
            "targets": ["127.0.160.0/30"],
            "source_address": "127.0.0.1",
            "targets_from": [
                {"file": "ipam.txt"},
                {"axfr": "campus.test", "server": "127.0.0.1", "port": nsd.port},
            ],
        }
        cfg = write(tmp_path / "relayaudit.toml", toml_document(data))
        assert main(["config", "check", str(cfg)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert f"  {'127.0.160.0/30':40} {4:>12}" in lines
    assert f"  {'file ' + str(tmp_path / 'ipam.txt'):40} {2:>12} {1:>12} {1:>9}" in lines
    label = f"axfr campus.test from 127.0.0.1:{nsd.port}"
    assert f"  {label:40} {4:>12} {2:>12} {0:>9}" in lines
    # the range's 4, the list's .9 and ::1, the transfer's .10 .20 .30 (::1 once)
    assert f"  {'total (after exclusions)':40} {9:>12}" in lines
    assert f"{tmp_path / 'ipam.txt'}:4: '192.0.2.1' is outside scope" in err
    assert f"{tmp_path / 'ipam.txt'}:5: 'bad' is not an IP address or network" in err
    assert (
        f"{cfg}: warning: source_address (127.0.0.1) has no IPv6 address, so the IPv6 targets "
        "cannot be probed" in err
    )


def test_deploy_render_allows_the_dns_servers_of_the_sources(tmp_path: Path) -> None:
    data = {
        "scope": ["192.0.2.0/24"],
        "targets": [],
        "targets_from": [
            {"mx": "campus.example"},
            {"axfr": "campus.example", "server": "198.51.100.53"},
            {"mx": "alumni.example", "server": "2001:db8::53", "port": 5353},
        ],
        "deploy": {"resolvers": ["192.0.2.53"]},
    }
    cfg = load_config(write(tmp_path / "relayaudit.toml", toml_document(data)))
    dropin = render(cfg, "systemd", resolver=lambda name: [])
    assert "IPAddressAllow=192.0.2.53/32\n" in dropin  # the mx entry without a server
    assert (
        "# DNS servers the target sources ask (targets_from: zone transfers, MX lookups)\n"
        "#   targets_from[1]: axfr campus.example from 198.51.100.53\n"
        "#   targets_from[2]: mx alumni.example from [2001:db8::53]:5353\n"
        "IPAddressAllow=198.51.100.53/32 2001:db8::53/128\n"
    ) in dropin
    policy = render(cfg, "kubernetes", resolver=lambda name: [])
    assert "# targets_from[1]: axfr campus.example from 198.51.100.53 (a DNS server" in policy
    assert "cidr: 2001:db8::53/128" in policy and "port: 5353" in policy


def test_findings_json_schema_has_the_origin(tmp_path: Path) -> None:
    schemas = Path(__file__).parent.parent / "schemas"
    schema = json.loads(
        (schemas / f"finding-record.v{RECORD_SCHEMA_VERSION}.schema.json").read_text()
    )
    assert schema["properties"]["origin"]["items"]["$ref"] == "#/$defs/TargetOrigin"
