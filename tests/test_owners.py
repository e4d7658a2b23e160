"""The owner table (issue 29): [[owners]] and owners_file, longest prefix, the rules, config check."""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cli_runner import run_main
from daemon_harness import DaemonProcess, base_config, write_config
from factories import make_finding, observe, one_sweep
from loopback import free_port
from test_alert_gauges import scrape_text

from relayaudit.config import Config, config_fingerprint, parse_config
from relayaudit.errors import ConfigError, ExitCode
from relayaudit.lab import Behaviour, Lab, ServerSpec
from relayaudit.owners import OwnerCache, OwnerTable, load_owners
from relayaudit.records import Transition
from relayaudit.state import SCHEMA_VERSION, StateStore
from relayaudit.verdict import FindingKind, Owner

CHEM = {"name": "Chemistry", "contact": "it@chem.campus.example", "queue": "chem-it"}


def config(tmp_path: Path, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "scope": ["192.0.2.0/24", "2001:db8::/48"],
        "targets": ["192.0.2.0/24"],
        "relay": {"campus_domains": ["campus.example"]},
        **extra,
    }
    return parse_config(data, source=str(tmp_path / "relayaudit.toml"))


def owners_csv(tmp_path: Path, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / "owners.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def name_of(table: OwnerTable, address: str) -> str | None:
    owner = table.lookup(address)
    return owner.name if owner is not None else None


def test_the_longest_prefix_wins_in_both_families(tmp_path: Path) -> None:
    path = owners_csv(
        tmp_path,
        "# exported from IPAM\n"
        "range,name,contact,queue\n"
        "192.0.2.0/24,Central IT,noc@campus.example,noc\n"
        "192.0.2.64/26,Physics,it@phys.campus.example,\n"
        "192.0.2.70,Physics lab,lab@phys.campus.example,phys-lab\n"
        "2001:db8::/48,Central IT,noc@campus.example,noc\n"
        "2001:db8:0:7::/64,Physics,it@phys.campus.example,\n",
        bom=True,
    )
    table = load_owners(config(tmp_path, owners_file=str(path)))
    assert name_of(table, "192.0.2.1") == "Central IT"
    assert name_of(table, "192.0.2.65") == "Physics"
    assert name_of(table, "192.0.2.70") == "Physics lab"
    assert name_of(table, "::ffff:192.0.2.70") == "Physics lab"  # IPv4-mapped read as IPv4
    assert name_of(table, "2001:db8:0:7::25") == "Physics"
    assert name_of(table, "2001:db8:0:8::25") == "Central IT"
    assert name_of(table, "198.51.100.1") is None
    assert table.lookup("192.0.2.65") == Owner(
        name="Physics", contact="it@phys.campus.example", queue=None
    )
    assert [o.name for o in table.owners] == ["Central IT", "Physics", "Physics lab"]
    assert table.warnings == ()


def test_a_config_entry_beats_the_file_and_the_first_row_beats_later_ones(
    tmp_path: Path,
) -> None:
    path = owners_csv(
        tmp_path,
        "range,name,contact,queue\n"
        "192.0.2.0/25,Library,it@lib.campus.example,lib\n"
        "192.0.2.128/25,Physics,it@phys.campus.example,\n"
        "192.0.2.128/25,Music,it@music.campus.example,\n",
    )
    cfg = config(tmp_path, owners=[{**CHEM, "ranges": ["192.0.2.0/25"]}], owners_file=str(path))
    table = load_owners(cfg)
    assert name_of(table, "192.0.2.5") == "Chemistry"
    assert name_of(table, "192.0.2.200") == "Physics"
    assert any(
        w.startswith(f"{path}:4:") and f"{path}:3" in w and "'Physics' is kept" in w
        for w in table.warnings
    ), table.warnings
    assert any(w.startswith(f"{path}:2:") and "owners[0]" in w for w in table.warnings)


def test_host_bits_are_read_as_the_network_with_a_warning(tmp_path: Path) -> None:
    path = owners_csv(tmp_path, "range,name,contact\n192.0.2.1/24,Library,it@lib.campus.example\n")
    table = load_owners(config(tmp_path, owners_file=str(path)))
    assert name_of(table, "192.0.2.200") == "Library"
    assert table.warnings == (
        f"{path}:2: range '192.0.2.1/24' has host bits set; read as '192.0.2.0/24'",
    )
    cfg = config(tmp_path, owners=[{**CHEM, "ranges": ["192.0.2.9/28"]}])
    assert name_of(load_owners(cfg), "192.0.2.1") == "Chemistry"
    assert cfg.warnings == (
        "owners[0].ranges[0]: '192.0.2.9/28' has host bits set; read as '192.0.2.0/28'",
    )


def test_ranges_outside_scope_are_kept(tmp_path: Path) -> None:
    cfg = config(tmp_path, owners=[{**CHEM, "ranges": ["198.51.100.0/24"]}])
    assert name_of(load_owners(cfg), "198.51.100.7") == "Chemistry"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("banana,Library,it@lib.campus.example", "range 'banana' is not an IP network"),
        ("192.0.2.0/24,,it@lib.campus.example", "name is empty"),
        (
            "192.0.2.0/24,Library,it@evil.example",
            "'it@evil.example' is not under owners_contact_domains (campus.example)",
        ),
        ("192.0.2.0/24,Library,nobody", "contact 'nobody' is not a plain address"),
        ("192.0.2.0/24,Library", "2 columns where the header has 3"),
    ],
)
def test_a_bad_row_names_file_line_and_value(tmp_path: Path, row: str, message: str) -> None:
    path = owners_csv(tmp_path, f"range,name,contact\n# a comment\n{row}\n")
    with pytest.raises(ConfigError) as caught:
        load_owners(config(tmp_path, owners_file=str(path)))
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)


def test_one_name_has_one_contact_and_queue(tmp_path: Path) -> None:
    path = owners_csv(
        tmp_path,
        "range,name,contact,queue\n"
        "192.0.2.0/25,Library,it@lib.campus.example,lib\n"
        "192.0.2.128/25,Library,it@lib.campus.example,library\n",
    )
    with pytest.raises(
        ConfigError,
        match=f"{path}:3: owner 'Library' has queue 'library', but {path}:2 gives it 'lib'",
    ):
        load_owners(config(tmp_path, owners_file=str(path)))
    with pytest.raises(ConfigError, match=r"owners\[1\].contact: .*owner 'Chemistry' has contact"):
        config(
            tmp_path,
            owners=[
                {**CHEM, "ranges": ["192.0.2.0/25"]},
                {**CHEM, "ranges": ["192.0.2.128/25"], "contact": "x@chem.campus.example"},
            ],
        )


def test_contacts_stay_under_the_contact_domains(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"owners\[0\].contact: 'it@gmail.example' is not under"):
        config(
            tmp_path, owners=[{**CHEM, "contact": "it@gmail.example", "ranges": ["192.0.2.0/24"]}]
        )
    with pytest.raises(ConfigError, match="owners_contact_domains: required"):
        parse_config(
            {
                "scope": ["192.0.2.0/24"],
                "targets": [],
                "owners": [{**CHEM, "ranges": ["192.0.2.0/24"]}],
            }
        )
    cfg = config(
        tmp_path,
        owners_contact_domains=["chem.campus.example"],
        owners=[{**CHEM, "ranges": ["192.0.2.0/24"]}],
    )
    assert cfg.contact_domains == ("chem.campus.example",)


def test_the_header_and_encoding_are_checked(tmp_path: Path) -> None:
    path = owners_csv(tmp_path, "cidr,owner,email\n192.0.2.0/24,Library,it@lib.campus.example\n")
    with pytest.raises(ConfigError, match=f"{path}:1: the header must be range,name,contact,queue"):
        load_owners(config(tmp_path, owners_file=str(path)))
    path.write_bytes(b"range,name,contact\n192.0.2.0/24,Libr\xe4ry,it@lib.campus.example\n")
    with pytest.raises(ConfigError, match=f"{path}: owners_file is not UTF-8 text"):
        load_owners(config(tmp_path, owners_file=str(path)))
    with pytest.raises(ConfigError, match="owners_file cannot be read"):
        load_owners(config(tmp_path, owners_file="missing.csv"))


def test_editing_owners_or_approvals_keeps_the_resume_fingerprint(tmp_path: Path) -> None:
    plain = config(tmp_path)
    edited = config(
        tmp_path,
        owners=[{**CHEM, "ranges": ["192.0.2.0/24"]}],
        owners_file="owners.csv",
        approved=[{"address": "192.0.2.25", "port": 25, "note": "ISO-7"}],
    )
    assert config_fingerprint(edited) == config_fingerprint(plain)
    # a config without owners or approvals hashes as before the keys existed
    dump = plain.model_dump_json(
        exclude={
            "report",
            "alerts",
            "targets_from",
            "targets_out_of_scope",
            "owners",
            "owners_file",
            "owners_contact_domains",
        }
    )
    assert '"approved":[]' in dump
    assert config_fingerprint(plain) != config_fingerprint(config(tmp_path, ports=[25]))


def test_the_cache_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = owners_csv(tmp_path, "range,name,contact\n192.0.2.0/24,Library,it@lib.campus.example\n")
    cfg = config(tmp_path, owners_file=str(path))
    failures: list[str] = []
    cache = OwnerCache()
    good = cache.load(cfg, on_failure=lambda error, kept: failures.append(error))
    assert good is not None and name_of(good, "192.0.2.9") == "Library"
    path.unlink()
    again = cache.load(cfg, on_failure=lambda error, kept: failures.append(error))
    assert again is good and cache.stale
    assert len(failures) == 1 and "cannot be read" in failures[0]
    # what the state store keeps reads back into the same table
    assert OwnerTable.from_json(good.to_json(), where="store").digest == good.digest
    fresh = OwnerCache()
    assert fresh.load(cfg, on_failure=lambda error, kept: None) is None


def test_config_check_reports_the_table_and_fails_on_a_bad_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = owners_csv(
        tmp_path,
        "range,name,contact,queue\n192.0.2.1/25,Library,it@lib.campus.example,lib\n"
        "192.0.2.128/25,Physics,it@phys.campus.example,\n",
    )
    toml = tmp_path / "relayaudit.toml"
    toml.write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/28"]\nowners_file = "owners.csv"\n'
        '[relay]\ncampus_domains = ["campus.example"]\n',
        encoding="utf-8",
    )
    code, out, err = run_main(capsys, "config", "check", str(toml))
    assert code == 0, err
    assert "owners: 2 (2 ranges; table " in out
    assert f"{path}:2: range '192.0.2.1/25' has host bits set" in err
    with path.open("a", encoding="utf-8") as f:
        f.write("192.0.2.300/32,Music,it@music.campus.example,\n")
    code, out, err = run_main(capsys, "config", "check", str(toml))
    assert code == ExitCode.CONFIG
    assert f"{path}:4: range '192.0.2.300/32' is not an IP network" in err


def test_the_index_answers_like_a_scan(tmp_path: Path) -> None:
    nets = [ipaddress.ip_network(f"192.0.2.{i * 16}/28") for i in range(16)]
    nets += [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("192.0.2.32/27")]
    owners = [
        {"name": f"Dept {i}", "contact": f"d{i}@campus.example", "ranges": [str(n)]}
        for i, n in enumerate(nets)
    ]
    table = load_owners(config(tmp_path, owners=owners))
    for host in range(256):
        address = ipaddress.ip_address(f"192.0.2.{host}")
        best = max((n for n in nets if address in n), key=lambda n: n.prefixlen)
        assert name_of(table, str(address)) == f"Dept {nets.index(best)}"


# -- every finding knows its owner (item 2) ---------------------------------------------------

DATA = Path(__file__).parent / "data"


def two_departments(tmp_path: Path) -> OwnerTable:
    return load_owners(
        config(
            tmp_path,
            owners=[
                {**CHEM, "ranges": ["192.0.2.0/25"]},
                {
                    "name": "Physics",
                    "contact": "it@phys.campus.example",
                    "ranges": ["192.0.2.128/26"],
                },
            ],
        )
    )


@pytest.mark.parametrize("version", [1, 2, 3])
def test_stores_of_every_earlier_version_upgrade_and_take_owners(
    tmp_path: Path, version: int
) -> None:
    path = tmp_path / "state.sqlite"
    shutil.copy(DATA / f"state-v{version}.sqlite", path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == version
        before = sorted(r[0] for r in db.execute("SELECT id FROM findings"))
    with StateStore(path) as store:
        assert [r.finding.owner for r in store.findings()] == [None] * len(before)
        assert store.owner_table() is None
        table = two_departments(tmp_path)
        store.restamp_owners(table)
        assert sorted(r.id for r in store.findings()) == before  # every row kept
        kept = store.owner_table()  # the daemon's last good table, for a restart
        assert kept is not None and kept.digest == table.digest
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        owners = dict(db.execute("SELECT address, owner FROM findings").fetchall())
    if version == 3:  # the committed v3 store holds 192.0.2.7 and 192.0.2.70
        assert owners["192.0.2.7"] == "Chemistry" and owners["192.0.2.70"] == "Chemistry"


def test_every_stored_finding_is_restamped_resolved_ones_too(tmp_path: Path) -> None:
    table = two_departments(tmp_path)
    relay = make_finding(address="192.0.2.7").model_copy(
        update={"owner": table.lookup("192.0.2.7")}
    )
    gone = make_finding(FindingKind.UNAPPROVED_SMTP, address="192.0.2.130")
    with StateStore(tmp_path / "state.sqlite", resolve_after=1) as store:
        one_sweep(store, observe(relay, address="192.0.2.7"), observe(gone, address="192.0.2.130"))
        one_sweep(store, observe(relay, address="192.0.2.7"), observe(address="192.0.2.130"))
        assert {r.address: r.status.value for r in store.findings()}["192.0.2.130"] == "resolved"
        assert store.restamp_owners(table).changed == 1  # the resolved one; the relay had its owner
        owners = {r.address: r.finding.owner for r in store.findings()}
        assert owners["192.0.2.130"] is not None and owners["192.0.2.130"].name == "Physics"
        # a known finding keeps its owner when seen again: only the restamp changes it
        moved = relay.model_copy(update={"owner": Owner(name="X", contact="x@campus.example")})
        one_sweep(store, observe(moved, address="192.0.2.7"))
        assert {r.address: r.finding.owner for r in store.findings()}["192.0.2.7"] == table.lookup(
            "192.0.2.7"
        )
        assert store.restamp_owners(OwnerTable()).changed == 2  # an emptied table: nobody owns them
        assert all(r.finding.owner is None for r in store.findings())


def test_report_owner_names_a_known_owner_or_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt --owner used to print an empty report and exit 0, as if the department were
    clean; now it is exit 2 naming the value and the owners known. A department of the table
    with no findings still gets its (empty) report."""
    state = tmp_path / "state.sqlite"
    with StateStore(state) as store:
        one_sweep(store, observe(make_finding(address="192.0.2.7"), address="192.0.2.7"))
        store.restamp_owners(two_departments(tmp_path))
    args = ("report", "--state", str(state), "--format", "csv")
    code, out, err = run_main(capsys, *args, "--owner", "Chemisty")
    assert code == 2 and out == ""
    assert "--owner 'Chemisty': no owner of that name in the state store" in err
    assert "(known: 'Chemistry'); did you mean 'Chemistry'?" in err
    (tmp_path / "relayaudit.toml").write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
        '[relay]\ncampus_domains = ["campus.example"]\n'
        '[[owners]]\nname = "Physics"\nranges = ["192.0.2.128/26"]\n'
        'contact = "it@phys.campus.example"\n',
        encoding="utf-8",
    )
    with_config = (*args, "--config", str(tmp_path / "relayaudit.toml"))
    code, out, err = run_main(capsys, *with_config, "--owner", "Physics")
    assert code == 0, err
    assert list(csv.DictReader(io.StringIO(out))) == []  # Physics runs nothing found
    code, _, err = run_main(capsys, *with_config, "--owner", "Biology")
    assert code == 2 and "known: 'Chemistry', 'Physics'" in err


def test_report_by_owner_and_unowned_in_every_text_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = two_departments(tmp_path)
    state = tmp_path / "state.sqlite"
    found = [
        make_finding(address="192.0.2.7"),
        make_finding(FindingKind.UNAPPROVED_SMTP, address="192.0.2.130"),
        make_finding(FindingKind.UNAPPROVED_SMTP, address="192.0.2.250"),
    ]
    with StateStore(state) as store:
        one_sweep(store, *(observe(f, address=f.address) for f in found))
        store.restamp_owners(table)
    code, out, err = run_main(
        capsys, "report", "--state", str(state), "--format", "csv", "--owner", "Chemistry"
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["address"], r["owner"], r["owner_contact"], r["owner_queue"]) for r in rows] == [
        ("192.0.2.7", "Chemistry", "it@chem.campus.example", "chem-it")
    ]
    code, out, _ = run_main(capsys, "report", "--state", str(state), "--format", "csv", "--unowned")
    assert [r["address"] for r in csv.DictReader(io.StringIO(out))] == ["192.0.2.250"]
    code, out, _ = run_main(
        capsys, "report", "--state", str(state), "--format", "md", "--owner", "Physics"
    )
    assert "Only the findings of owner Physics." in out
    assert "192.0.2.130" in out and "192.0.2.7" not in out and "192.0.2.250" not in out
    code, out, _ = run_main(
        capsys, "report", "--state", str(state), "--format", "json", "--unowned"
    )
    doc = json.loads(out)
    assert doc["owner_filter"] == "(no owner)" and [f["address"] for f in doc["findings"]] == [
        "192.0.2.250"
    ]
    assert {c["address"] for c in doc["changes"]} <= {"192.0.2.250"}
    code, out, _ = run_main(capsys, "findings", "--state", str(state))
    assert "Chemistry" in out and "Physics" in out
    code, out, _ = run_main(capsys, "show", "--state", str(state), found[0].id)
    assert "owner:       Chemistry <it@chem.campus.example>, queue chem-it" in out


def _owned_store(tmp_path: Path) -> tuple[Path, Config]:
    """A completed sweep: a Chemistry relay, a Physics service, one nobody owns."""
    cfg = config(
        tmp_path,
        owners=[
            {**CHEM, "ranges": ["192.0.2.0/25"]},
            {"name": "Physics", "contact": "it@phys.campus.example", "ranges": ["192.0.2.128/26"]},
        ],
        approved=[{"address": "192.0.2.9", "port": 25, "note": "ISO-7 chem hub"}],
    )
    state = tmp_path / "state.sqlite"
    table = load_owners(cfg)
    found = [
        make_finding(address="192.0.2.7"),
        make_finding(FindingKind.UNAPPROVED_SMTP, address="192.0.2.130"),
        make_finding(FindingKind.UNAPPROVED_SMTP, address="192.0.2.250"),
    ]
    with StateStore(state) as store:
        one_sweep(store, *(observe(f, address=f.address) for f in found))
        store.restamp_owners(table)
    return state, cfg


def test_html_report_shows_owners_and_filters_every_section_by_owner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, _ = _owned_store(tmp_path)
    (tmp_path / "relayaudit.toml").write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
        '[relay]\ncampus_domains = ["campus.example"]\n'
        '[[approved]]\naddress = "192.0.2.9"\nport = 25\nnote = "ISO-7 chem hub"\n'
        '[[owners]]\nname = "Chemistry"\nranges = ["192.0.2.0/25"]\n'
        'contact = "it@chem.campus.example"\nqueue = "chem-it"\n'
        '[[owners]]\nname = "Physics"\nranges = ["192.0.2.128/26"]\n'
        'contact = "it@phys.campus.example"\n',
        encoding="utf-8",
    )
    args = ("report", "--state", str(state), "--config", str(tmp_path / "relayaudit.toml"))
    code, whole, err = run_main(capsys, *args)
    assert code == 0, err
    # each finding names its owner; the filter offers each owner and "no owner"
    assert 'data-owner="Chemistry"' in whole and 'data-owner="Physics"' in whole
    assert 'data-owner="-"' in whole and '<option value="-">no owner</option>' in whole
    assert "it@chem.campus.example" in whole
    # the unowned section counts the services no range holds (192.0.2.250 here)
    unowned = whole.split('id="h-unowned">', 1)[1].split("</section>", 1)[0]
    assert unowned.startswith("SMTP services with no owner: 1</h2>")
    assert "192.0.2.250:25" in unowned and "192.0.2.130" not in unowned
    code, chem, err = run_main(capsys, *args, "--owner", "Chemistry")
    assert code == 0, err
    assert "192.0.2.7" in chem and "ISO-7 chem hub" in chem  # its approval too
    assert "192.0.2.130" not in chem and "192.0.2.250" not in chem
    assert "SMTP services with no owner: 0" in chem
    code, phys, err = run_main(capsys, *args, "--owner", "Physics")
    assert code == 0, err
    assert "192.0.2.130" in phys and "192.0.2.7" not in phys and "ISO-7" not in phys
    code, nobody, err = run_main(capsys, *args, "--unowned")
    assert code == 0, err
    assert "192.0.2.250" in nobody and "192.0.2.7:" not in nobody and "192.0.2.130" not in nobody
    assert "SMTP services with no owner: 1" in nobody


def test_an_approvals_owner_owns_its_service_in_the_html_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """192.0.2.250 lies in no owner range, but its approval names Physics: the service is
    Physics's in every section (not "no owner"), as its findings are."""
    state, _ = _owned_store(tmp_path)
    approved = {"address": "192.0.2.250", "port": 25, "owner": "Physics", "note": "ISO-9 phys"}
    cfg = config(
        tmp_path,
        owners=[
            {**CHEM, "ranges": ["192.0.2.0/25"]},
            {"name": "Physics", "contact": "it@phys.campus.example", "ranges": ["192.0.2.128/26"]},
        ],
        approved=[approved],
    )
    with StateStore(state) as store:  # the table the daemon's next sweep stores
        store.restamp_owners(load_owners(cfg))
    (tmp_path / "relayaudit.toml").write_text(
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/24"]\n'
        '[relay]\ncampus_domains = ["campus.example"]\n'
        '[[approved]]\naddress = "192.0.2.250"\nport = 25\nowner = "Physics"\n'
        'note = "ISO-9 phys"\n'
        '[[owners]]\nname = "Chemistry"\nranges = ["192.0.2.0/25"]\n'
        'contact = "it@chem.campus.example"\n'
        '[[owners]]\nname = "Physics"\nranges = ["192.0.2.128/26"]\n'
        'contact = "it@phys.campus.example"\n',
        encoding="utf-8",
    )
    args = ("report", "--state", str(state), "--config", str(tmp_path / "relayaudit.toml"))
    code, whole, err = run_main(capsys, *args)
    assert code == 0, err
    unowned = whole.split('id="h-unowned">', 1)[1].split("</section>", 1)[0]
    assert unowned.startswith("SMTP services with no owner: 0</h2>")
    code, phys, err = run_main(capsys, *args, "--owner", "Physics")
    assert code == 0, err
    assert "192.0.2.250" in phys and "ISO-9 phys" in phys
    code, nobody, err = run_main(capsys, *args, "--unowned")
    assert code == 0, err
    assert "192.0.2.250" not in nobody


# -- the daemon keeps the last good table across a restart ------------------------------------

LAB_HOST, LAB_PORT = "127.0.136.1", 2836  # this test's lab: 127.0.136.0/30


async def test_a_restart_with_an_unreadable_owners_file_stamps_from_the_stored_table(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    owners = owners_csv(
        tmp_path, "range,name,contact\n127.0.136.0/30,Chemistry,it@chem.campus.test\n"
    )
    metrics_port = free_port()
    data = base_config(tmp_path, "127.0.136.0/30", LAB_PORT)
    data["schedule"] = {"interval": "2s"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["owners_file"] = str(owners)
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    state = tmp_path / "state.sqlite"
    relay = ServerSpec(host=LAB_HOST, port=LAB_PORT, behaviour=Behaviour.OPEN_RELAY)
    async with Lab([relay]):
        first = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(first)
        await first.start()
        await first.wait_for(lambda: bool(first.events("sweep.summary")), 30, "a sweep")
        assert await first.stop() == 0
    with StateStore(state) as store:
        assert {r.finding.owner.name for r in store.findings() if r.finding.owner} == {"Chemistry"}
    owners.unlink()  # the IPAM export is gone when the daemon restarts
    second_relay = ServerSpec(host="127.0.136.2", port=LAB_PORT, behaviour=Behaviour.OPEN_RELAY)
    before = len(first.events("sweep.summary"))
    async with Lab([relay, second_relay]):
        second = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(second)
        await second.start()
        await second.wait_for(
            lambda: (
                any(e["address"] == "127.0.136.2" for e in second.events("probe"))
                and len(second.events("sweep.summary")) > before
            ),
            30,
            "a sweep that saw the new relay",
        )
        body = await scrape_text(metrics_port)
        assert await second.stop() == 0
    failed = second.events("owners.failed")
    assert failed and "cannot be read" in failed[0]["error"] and failed[0]["kept"]
    failures = re.search(r"^relayaudit_owners_file_failures_total (\S+)$", body, re.M)
    assert failures is not None and float(failures[1]) >= 1, body
    assert re.search(r"^relayaudit_owners_file_stale 1(\.0)?$", body, re.M), body
    with StateStore(state) as store:
        owned = {r.address: r.finding.owner for r in store.findings()}
        # the unreadable file moved nobody: no owner-changed alert, whatever was restamped
        transitions = {a.transition for a in store.alerts()}
        assert transitions == {Transition.NEW}, transitions
    # the new relay, first seen after the restart, is stamped from the table the store kept
    assert {a: o.name if o else None for a, o in owned.items()} == {
        LAB_HOST: "Chemistry",
        "127.0.136.2": "Chemistry",
    }
