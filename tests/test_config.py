"""Tests for relayaudit.config: the shipped configs load, and each bad config gets its exact message."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from relayaudit.cli import main
from relayaudit.config import Config, load_config, parse_duration
from relayaudit.demo import demo_config
from relayaudit.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLE = CONFIG_DIR / "relayaudit.example.toml"
LAB = CONFIG_DIR / "lab.toml"
SHIPPED = sorted(CONFIG_DIR.glob("*.toml"))

# A minimal valid head; the bad configs below add one mistake each.
BASE = 'scope = ["192.0.2.0/24", "2001:db8:25::/120"]\ntargets = ["192.0.2.0/25"]\n'
DURATION_HINT = "is not a duration (use e.g. 30, '30s', '5m', '1h')"


def write(tmp_path: Path, text: str | bytes, name: str = "relayaudit.toml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- the shipped configs ---------------------------------------------------------------------


def test_config_directory_holds_the_example_and_the_lab() -> None:
    assert EXAMPLE in SHIPPED
    assert LAB in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(path)
    assert config.source == str(path)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: valid\n")
    assert err == ""


_DOC_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "127.0.0.0/8")
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_use_only_documentation_or_loopback_networks(path: Path) -> None:
    config = load_config(path)
    nets = [*config.scope, *config.targets, *config.exclude, *(a.address for a in config.approved)]
    nets += [ipaddress.ip_network(a) for a in config.source_address]
    nets.append(ipaddress.ip_network(config.canary.listen[0]))
    nets.append(ipaddress.ip_network(config.metrics.listen[0]))
    nets += config.deploy.allow_from
    for address in (
        *(a for addresses in config.deploy.hosts.values() for a in addresses),
        *(config.deploy.resolvers or ()),
    ):
        nets.append(ipaddress.ip_network(address))
    for net in nets:
        assert any(net.version == d.version and net.subnet_of(d) for d in _DOC_NETS), net  # type: ignore[arg-type]


def test_example_values() -> None:
    config = load_config(EXAMPLE)
    assert [str(n) for n in config.scope] == [
        "192.0.2.0/24",
        "198.51.100.0/24",
        "2001:db8:25::/120",
    ]
    assert config.ports == (25, 465, 587)
    assert config.implicit_tls_ports == (465,)
    assert config.source_address == ()
    assert config.canary.enabled is False
    assert config.canary.listen == ("198.51.100.250", 25)
    assert config.canary.campus_sender == "iso-relayaudit@campus.example"
    assert config.canary.wait == 120.0
    assert (config.timeouts.connect, config.timeouts.command, config.timeouts.session) == (
        3,
        15,
        120,
    )
    assert config.relay.campus_domains == ("campus.example", "campus-alumni.example")
    assert config.is_approved(ipaddress.ip_address("192.0.2.25"), 25) is not None
    assert config.is_approved(ipaddress.ip_address("192.0.2.25"), 587) is None
    assert config.is_approved(ipaddress.ip_address("192.0.2.26"), 2525) is not None
    assert config.is_approved(ipaddress.ip_address("2001:db8:25::3"), 587) is not None


def test_example_commented_out_values_are_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys the example shows commented out must still load once uncommented."""
    monkeypatch.setenv("RELAYAUDIT_RT_TOKEN", "t0ken")
    text = EXAMPLE.read_text(encoding="utf-8")
    for line in (
        '# source_address = ["203.0.113.10", "2001:db8:ffff::10"]\n',
        '# token = { env = "RELAYAUDIT_RT_TOKEN" }\n',
        '# username = "relayaudit"\n',
        '# cron = "30 1 * * *"\n',
        '# campus_domain_reason = "its only MX is the scanner; the hub routes listed subdomains only"\n',
        '# allow_large_scope = "ISO-0042: whole-university /8, approved by the CISO"\n',
    ):
        assert line in text
        text = text.replace(line, line.removeprefix("# "))
    config = load_config(write(tmp_path, text))
    assert [str(a) for a in config.source_address] == ["203.0.113.10", "2001:db8:ffff::10"]
    assert _token(config) == "t0ken"
    assert config.schedule.cron == "30 1 * * *"
    assert config.allow_large_scope == "ISO-0042: whole-university /8, approved by the CISO"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the TOML file the model reads, as dotted paths (`limits.rate`)."""
    keys = []
    for name, field in model.model_fields.items():
        if model is Config and name == "source":  # set by the loader, not a key of the file
            continue
        keys.append(prefix + name)
        inner = field.annotation
        # tuple[Model, ...] (arrays of tables) and Model (tables)
        for arg in (inner, *getattr(inner, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys += _keys(arg, f"{prefix}{name}.")
    return keys


def test_example_documents_every_key() -> None:
    """Each key of the model appears in the example (set, or commented out with its value)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = []
    for dotted in _keys(Config):
        *tables, key = dotted.split(".")
        if tables:
            # the key must appear after its table header ([t], [[t]], [a.b]); good enough for docs
            header = re.search(rf"^#? ?\[\[?{re.escape('.'.join(tables))}\]\]?\s*$", text, re.M)
            if header is None:
                missing.append(f"[{'.'.join(tables)}]")
                continue
            section = text[header.end() :]
        else:
            section = text
        if not re.search(rf"^(# )?{re.escape(key)} = ", section, re.M) and not re.search(
            rf"^#? ?\[\[?{re.escape(dotted)}\]\]?\s*$", text, re.M
        ):
            missing.append(dotted)
    assert missing == []


def test_lab_config_is_the_demo_config() -> None:
    """config/lab.toml sweeps the lab `relayaudit demo` starts, with the same settings."""
    lab = load_config(LAB)
    demo = demo_config(Path("lab-findings.jsonl"))
    assert lab.model_dump() == demo.model_dump()


# -- valid values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "seconds"),
    [
        ("30", 30.0),
        ("2.5", 2.5),
        ('"30s"', 30.0),
        ('"5m"', 300.0),
        ('"1h"', 3600.0),
        ('"1h30m"', 5400.0),
        ('"1h 30m 15s"', 5415.0),
        ('"0.5s"', 0.5),
    ],
)
def test_durations(tmp_path: Path, toml: str, seconds: float) -> None:
    config = load_config(write(tmp_path, BASE + f"[canary]\nwait = {toml}\n"))
    assert config.canary.wait == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0)],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_defaults_of_a_minimal_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.ports == (25, 465, 587)
    assert config.exclude == ()
    assert config.limits.rate == 200.0
    assert config.canary.listen == ("127.0.0.1", 2526)
    assert config.output.findings == Path("findings.jsonl")


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 1
    with pytest.raises(ValidationError, match="frozen"):
        config.limits.rate = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        config.scope = ()
    assert isinstance(config.scope, tuple)  # and the lists inside cannot be changed either


# -- bad configs: exact messages -------------------------------------------------------------

# (id, TOML text, message after "PATH: ")
BAD: list[tuple[str, str, str]] = [
    (
        "target-outside-scope",
        'scope = ["192.0.2.0/24"]\ntargets = ["192.0.2.0/25", "198.51.100.0/24"]\n',
        "targets[1]: line 2: '198.51.100.0/24' is outside scope (192.0.2.0/24)",
    ),
    (
        "host-bits-set",
        'scope = ["192.0.2.0/24"]\n'
        'targets = ["192.0.2.0/26", "192.0.2.64/26", "192.0.2.128/26", "192.0.2.1/16"]\n',
        "targets[3]: line 2: '192.0.2.1/16' has host bits set",
    ),
    (
        "not-a-network",
        'scope = ["192.0.2.0/24"]\ntargets = ["campus"]\n',
        "targets[0]: line 2: 'campus' is not an IP network or address",
    ),
    (
        "exclusion-outside-scope",
        BASE + 'exclude = ["203.0.113.7/32"]\n',
        "exclude[0]: line 3: '203.0.113.7/32' is outside scope (192.0.2.0/24, 2001:db8:25::/120)",
    ),
    (
        "approved-outside-scope",
        BASE + '[[approved]]\naddress = "192.0.2.25"\n\n[[approved]]\naddress = "198.51.100.25"\n',
        "approved[1].address: line 7: '198.51.100.25/32' is outside scope "
        "(192.0.2.0/24, 2001:db8:25::/120)",
    ),
    (
        "unknown-top-level-key",
        BASE + 'taregts = ["192.0.2.0/24"]\n',
        "taregts: line 3: unknown key (got ['192.0.2.0/24'])",
    ),
    (
        "unknown-nested-key",
        BASE + "[limits]\nconcurency = 5\n",
        "limits.concurency: line 4: unknown key (got 5)",
    ),
    (
        "unknown-key-in-array-of-tables",
        BASE + '[[approved]]\naddress = "192.0.2.25"\nprot = 25\n',
        "approved[0].prot: line 5: unknown key (got 25)",
    ),
    ("loader-only-key", BASE + 'source = "x"\n', "source: line 3: unknown key (got 'x')"),
    (
        "missing-scope",
        'targets = ["192.0.2.0/24"]\n',
        "scope: required key is missing\ntargets: not checked against scope, as scope is invalid",
    ),
    (
        "empty-scope",
        'scope = []\ntargets = ["192.0.2.0/24"]\n',
        "scope: line 1: must list at least one network\n"
        "targets: not checked against scope, as scope is invalid",
    ),
    (
        "bad-duration",
        BASE + '[timeouts]\nconnect = "3 seconds"\n',
        f"timeouts.connect: line 4: '3 seconds' {DURATION_HINT}",
    ),
    (
        "zero-duration",
        BASE + "[timeouts]\nconnect = 0\n",
        "timeouts.connect: line 4: 0 must be longer than zero",
    ),
    (
        "zero-duration-with-unit",
        BASE + '[canary]\nwait = "0s"\n',
        "canary.wait: line 4: '0s' must be longer than zero",
    ),
    (
        "negative-duration",
        BASE + "[timeouts]\nsession = -1\n",
        "timeouts.session: line 4: -1 must be longer than zero",
    ),
    (
        "nan-duration",
        BASE + "[timeouts]\nconnect = nan\n",
        f"timeouts.connect: line 4: nan {DURATION_HINT}",
    ),
    (
        "infinite-duration",
        BASE + "[canary]\nwait = inf\n",
        f"canary.wait: line 4: inf {DURATION_HINT}",
    ),
    (
        "port-out-of-range",
        BASE + "ports = [25, 70000]\n",
        "ports[1]: line 3: Input should be less than or equal to 65535 (got 70000)",
    ),
    (
        "port-zero",
        BASE + "ports = [0]\n",
        "ports[0]: line 3: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "duplicate-port",
        BASE + "ports = [25, 587, 25]\n",
        "ports: line 3: [25, 587, 25] lists a port twice",
    ),
    (
        "implicit-tls-port-not-in-ports",
        BASE + "ports = [25, 587]\nimplicit_tls_ports = [465]\n",
        "implicit_tls_ports[0]: line 4: 465 is not one of ports [25, 587]",
    ),
    (
        "external-domain-is-campus",
        BASE + "[relay]\n"
        'campus_domains = ["campus.example"]\n'
        'external_domains = ["relay-test.example", "mail.campus.example"]\n',
        "relay.external_domains[1]: line 5: 'mail.campus.example' is a campus domain; "
        "relay tests need a domain outside campus",
    ),
    (
        "canary-listen-not-address-port",
        BASE + '[canary]\nlisten = "localhost:2526"\n',
        "canary.listen: line 4: 'localhost:2526' is not of the form ADDRESS:PORT (e.g. 127.0.0.1:2526)",
    ),
    (
        "canary-listen-port-out-of-range",
        BASE + '[canary]\nlisten = "127.0.0.1:70000"\n',
        "canary.listen: line 4: '127.0.0.1:70000': port 70000 is outside 1-65535",
    ),
    (
        "command-timeout-longer-than-session",
        BASE + '[timeouts]\ncommand = "5m"\nsession = "2m"\n',
        "timeouts.command: line 4: 300s is longer than timeouts.session (120s)",
    ),
    (
        "rate-zero",
        BASE + "[limits]\nrate = 0\n",
        "limits.rate: line 4: Input should be greater than 0 (got 0)",
    ),
    (
        "rate-infinite",
        BASE + "[limits]\nrate = inf\n",
        "limits.rate: line 4: Input should be a finite number (got inf)",
    ),
    (
        "string-for-concurrency",
        BASE + '[limits]\nconcurrency = "many"\n',
        "limits.concurrency: line 4: must be an integer (got 'many')",
    ),
    (
        "ipv6-source-with-only-ipv4-targets",
        BASE + 'source_address = "2001:db8:25::1"\n',
        "source_address: line 3: '2001:db8:25::1' is IPv6 but no target is",
    ),
    (
        "source-not-an-address",
        BASE + 'source_address = "scanner"\n',
        "source_address: line 3: 'scanner' is not an IP address",
    ),
    (
        "bad-helo-name",
        BASE + '[identity]\nhelo_name = "not a name"\n',
        "identity.helo_name: line 4: 'not a name' is not a valid host or domain name",
    ),
    (
        "toml-syntax-error",
        BASE + "[limits]\nrate = = 5\n",
        "TOML syntax error: Invalid value (at line 4, column 8)",
    ),
    (
        "toml-duplicate-key",
        BASE + "seed = 1\nseed = 2\n",
        "TOML syntax error: Cannot overwrite a value (at line 4, column 9)",
    ),
]


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_message(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error_of(path).splitlines() == [f"{path}: {line}" for line in message.splitlines()]


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "ports = [0]\n[limits]\nrate = 0\n")
    assert error_of(path).splitlines() == [
        f"{path}: ports[0]: line 3: Input should be greater than or equal to 1 (got 0)",
        f"{path}: limits.rate: line 5: Input should be greater than 0 (got 0)",
    ]


# an unknown key, a bad duration and two targets outside scope (issue 32): four lines at once
FOUR_ERRORS = (
    'scope = ["192.0.2.0/24"]\n'
    'targets = ["192.0.2.0/25", "198.51.100.0/24",\n'
    '           "203.0.113.0/28"]\n'
    'taregts = ["192.0.2.0/24"]\n'
    "\n"
    "[timeouts]\n"
    'connect = "3 seconds"\n'
)


def test_every_config_error_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, FOUR_ERRORS)
    assert main(["config", "check", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"relayaudit: {path}: timeouts.connect: line 7: '3 seconds' {DURATION_HINT}",
        f"relayaudit: {path}: taregts: line 4: unknown key (got ['192.0.2.0/24'])",
        f"relayaudit: {path}: targets[1]: line 2: '198.51.100.0/24' is outside scope "
        "(192.0.2.0/24)",
        f"relayaudit: {path}: targets[2]: line 3: '203.0.113.0/28' is outside scope (192.0.2.0/24)",
    ]


def test_every_scope_problem_when_the_rest_is_valid(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'scope = ["192.0.2.0/24"]\n'
        'targets = ["192.0.2.0/25", "198.51.100.0/24",\n'
        '           "203.0.113.0/28"]\n'
        'exclude = ["198.51.100.7"]\n'
        '[[approved]]\naddress = "203.0.113.25"\n',
    )
    assert error_of(path).splitlines() == [
        f"{path}: targets[1]: line 2: '198.51.100.0/24' is outside scope (192.0.2.0/24)",
        f"{path}: targets[2]: line 3: '203.0.113.0/28' is outside scope (192.0.2.0/24)",
        f"{path}: exclude[0]: line 4: '198.51.100.7/32' is outside scope (192.0.2.0/24)",
        f"{path}: approved[0].address: line 6: '203.0.113.25/32' is outside scope "
        "(192.0.2.0/24)",
    ]


def test_scope_checked_for_the_valid_entries_when_others_are_not(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'scope = ["192.0.2.0/24"]\n'
        'targets = ["campus", "198.51.100.0/24", "192.0.2.0/25"]\n'
        '[[approved]]\nport = 0\naddress = "192.0.2.25"\n'
        '[[approved]]\naddress = "198.51.100.25"\n',
    )
    assert error_of(path).splitlines() == [
        f"{path}: targets[0]: line 2: 'campus' is not an IP network or address",
        f"{path}: approved[0].port: line 4: Input should be greater than or equal to 1 (got 0)",
        f"{path}: targets[1]: line 2: '198.51.100.0/24' is outside scope (192.0.2.0/24)",
        f"{path}: approved[1].address: line 7: '198.51.100.25/32' is outside scope (192.0.2.0/24)",
    ]


def test_scope_checks_skipped_for_an_invalid_scope_say_so(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'scope = ["campus"]\ntargets = ["198.51.100.0/24"]\nexclude = ["198.51.100.7"]\n',
    )
    assert error_of(path).splitlines() == [
        f"{path}: scope[0]: line 1: 'campus' is not an IP network or address",
        f"{path}: targets: not checked against scope, as scope is invalid",
        f"{path}: exclude: not checked against scope, as scope is invalid",
    ]


def test_a_syntax_error_is_reported_alone(tmp_path: Path) -> None:
    path = write(tmp_path, FOUR_ERRORS + "seed = = 1\n")
    assert error_of(path) == (f"{path}: TOML syntax error: Invalid value (at line 8, column 8)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"{tmp_path}: cannot be read: Is a directory"


def test_non_utf8_file(tmp_path: Path) -> None:
    text = BASE.encode() + '[identity]\ncontact = "Jos\u00e9"\n'.encode("latin-1")
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: not UTF-8 text (byte 98)"


def test_config_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "nope.toml")


# -- secrets ---------------------------------------------------------------------------------


def _with_secret(secret: str) -> str:
    return (
        BASE
        + f'[[alerts.webhook]]\nurl = "https://tickets.campus.example/hook"\ntoken = {secret}\n'
    )


def _token(config: Config) -> str:
    token = config.alerts.webhook[0].token
    assert token is not None
    return token.get_secret_value()


def test_secret_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYAUDIT_TEST_TOKEN", "s3cret-from-env")
    config = load_config(write(tmp_path, _with_secret('{ env = "RELAYAUDIT_TEST_TOKEN" }')))
    assert _token(config) == "s3cret-from-env"
    assert "s3cret" not in repr(config)


def test_secret_from_file(tmp_path: Path) -> None:
    secret = write(tmp_path, "s3cret-from-file\n", name="token")
    config = load_config(write(tmp_path, _with_secret(f'{{ file = "{secret}" }}')))
    assert _token(config) == "s3cret-from-file"


def test_secret_from_unset_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAYAUDIT_TEST_TOKEN", raising=False)
    path = write(tmp_path, _with_secret('{ env = "RELAYAUDIT_TEST_TOKEN" }'))
    assert error_of(path) == (
        f"{path}: alerts.webhook[0].token: line 5: environment variable "
        "'RELAYAUDIT_TEST_TOKEN' is not set"
    )


def test_secret_from_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-token"
    path = write(tmp_path, _with_secret(f'{{ file = "{missing}" }}'))
    assert error_of(path) == (
        f"{path}: alerts.webhook[0].token: line 5: secret file '{missing}' cannot be read: "
        "No such file or directory"
    )
