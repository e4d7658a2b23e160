"""Reads the TOML configuration once into one frozen, validated pydantic model."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from relayaudit.errors import ConfigError
from relayaudit.schedule import parse_cron
from relayaudit.scope import LARGE_SCOPE, LARGE_V6_PREFIX, normal_address, normal_network
from relayaudit.targets import address_count
from relayaudit.templating import TemplateError, check_template
from relayaudit.tomllines import KeyPath, key_lines, line_of

__all__ = [
    "Address",
    "AlertsConfig",
    "ApprovedService",
    "CanaryConfig",
    "CommandHook",
    "Config",
    "EmailHook",
    "LoggingConfig",
    "MetricsConfig",
    "Network",
    "OwnerEntry",
    "ReportConfig",
    "ScheduleConfig",
    "StateConfig",
    "TargetSource",
    "WebhookHook",
    "config_fingerprint",
    "format_validation_error",
    "load_config",
    "mailbox",
    "parse_config",
    "parse_duration",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION = re.compile(
    r"^\s*(?:(\d+(?:\.\d+)?)d)?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?"
    r"\s*(?:(\d+(?:\.\d+)?)s)?\s*$"
)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_LOCAL_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def parse_duration(value: object) -> float:
    """Seconds from `30`, `2.5`, `"30s"`, `"5m"`, `"1h"`, `"1h30m"` or `"7d"`; rejects junk."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30, '30s', '5m', '1h')")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not value.strip() or match is None or not any(match.groups()):
            raise ValueError(f"{value!r} is not a duration (use e.g. 30, '30s', '5m', '1h')")
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = days * 86400 + hours * 3600 + minutes * 60 + secs
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30, '30s', '5m', '1h')")
    if not math.isfinite(seconds):  # TOML has nan and inf
        raise ValueError(f"{value!r} is not a duration (use e.g. 30, '30s', '5m', '1h')")
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero")
    return seconds


def _scope_error(message: str, loc: KeyPath | None = None) -> PydanticCustomError:
    """A broken scope rule; format_validation_error adds the key's line in the file."""
    context: dict[str, Any] = {"message": message}
    if loc is not None:  # a whole-model rule: the key it is about
        context["loc"] = loc
    return PydanticCustomError("scope", "{message}", context)


def _network(value: object) -> Network:
    """A network as relayaudit connects to it (scope.normal_network: IPv4 in IPv6 becomes IPv4)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a network or address string")
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(f"{value!r} has host bits set") from None
        raise ValueError(f"{value!r} is not an IP network or address") from None
    try:
        return normal_network(net)
    except ConfigError as exc:
        raise _scope_error(str(exc)) from None


def _address(value: object) -> Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value  # already read (source_address = "one address")
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address string")
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    try:
        return normal_address(address)
    except ConfigError as exc:
        raise _scope_error(str(exc)) from None


def _source_addresses(value: object) -> object:
    """`source_address`: one address, or an array of at most one IPv4 and one IPv6 address."""
    if value is None:
        return ()
    if isinstance(value, str):  # checked here, so its errors name the key, not an index
        return (_address(value),)
    return value


def _one_per_family(value: tuple[Address, ...]) -> tuple[Address, ...]:
    if len(value) > 2 or len({a.version for a in value}) != len(value):
        shown = ", ".join(f"'{a}'" for a in value)
        raise ValueError(
            f"[{shown}] must be one address, or one IPv4 and one IPv6 address (each target is "
            "probed from the source of its own family)"
        )
    return value


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not _HOSTNAME.match(value):
        raise ValueError(f"{value!r} is not a valid host or domain name")
    return value.lower()


def _local_part(value: object) -> str:
    if not isinstance(value, str) or not _LOCAL_PART.match(value):
        raise ValueError(f"{value!r} is not a plain mailbox local part (letters, digits, . _ + -)")
    return value


def _endpoint(value: object) -> tuple[str, int]:
    """`host:port` or `[v6]:port` with a literal address (the listener never resolves names)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not of the form ADDRESS:PORT")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not of the form ADDRESS:PORT (e.g. 127.0.0.1:2526)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} is outside 1-65535")
    return host, port


def _secret(value: object) -> SecretStr:
    """A secret given inline, as `{ env = "NAME" }` or as `{ file = "/path" }` (read once, here)."""
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        return SecretStr(value)
    if isinstance(value, Mapping) and len(value) == 1:
        ((kind, ref),) = value.items()
        if kind == "env" and isinstance(ref, str):
            if ref not in os.environ:
                raise ValueError(f"environment variable {ref!r} is not set")
            return SecretStr(os.environ[ref])
        if kind == "file" and isinstance(ref, str):
            try:
                return SecretStr(Path(ref).read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ValueError(f"secret file {ref!r} cannot be read: {exc.strerror}") from None
    raise ValueError('a secret is a string, { env = "NAME" } or { file = "/path" }')


def _path(value: object) -> object:
    """A file path the operating system can open: an empty one or one with NUL is refused here."""
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        raise ValueError(f"{value!r} is not a usable file path")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
NetworkField = Annotated[Network, BeforeValidator(_network)]
AddressField = Annotated[Address, BeforeValidator(_address)]
DomainField = Annotated[str, BeforeValidator(_hostname)]
LocalPart = Annotated[str, BeforeValidator(_local_part)]
Endpoint = Annotated[tuple[str, int], BeforeValidator(_endpoint)]
Secret = Annotated[SecretStr, BeforeValidator(_secret)]
FilePath = Annotated[Path, BeforeValidator(_path)]
Port = Annotated[int, Field(ge=1, le=65535)]
SourceAddresses = Annotated[
    tuple[AddressField, ...], BeforeValidator(_source_addresses), AfterValidator(_one_per_family)
]


class _Model(BaseModel):
    # schemas are built on first use, not at import: validating the Config builds its sections'
    # inside its own, once, instead of a validator per section class as well (start-up time)
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, defer_build=True)


class Identity(_Model):
    """How the scanner introduces itself to the servers it knocks on."""

    helo_name: DomainField = "relayaudit.invalid"
    contact: str = Field(default="", max_length=200)

    @field_validator("contact")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"{value!r} contains control characters")
        return value


_GREYLIST_RETRY_MAX = 3600.0


class RelayConfig(_Model):
    """Addresses the relay battery writes into MAIL FROM and RCPT TO."""

    campus_domains: tuple[DomainField, ...] = ()
    external_domains: tuple[DomainField, ...] = ("relayaudit-test.example",)
    external_local_part: LocalPart = "relaytest"
    sender_local_part: LocalPart = "relayaudit"
    # 9: a closed server refuses each test's RCPT (an error each), and Postfix slows a client
    # that made more than smtpd_soft_error_limit (10) errors; a refused EHLO may add one.
    # Exim does not count a RSET between transactions among its non-mail commands.
    max_tests_per_session: int = Field(default=9, ge=1, le=50)
    # the ISO's policy is one SMTP session per host at a time; more is the operator's opt-in
    sessions_per_host: int = Field(default=1, ge=1, le=3)
    retest_after_starttls: StrictBool = True
    # RFC 2920: a test's RSET, MAIL and RCPT in one write where the server offers PIPELINING
    pipelining: StrictBool = True
    # no relay found: sessions that claim a HELO name (the server's own, mail.<campus domain>,
    # its address literal) or, where offered, an XCLIENT address; the scanner does not
    # introduce itself in them (README, "Claimed identities")
    claimed_identity: StrictBool = True
    # a host whose battery met greylisting is tried again near the end of the same sweep, no
    # sooner than this after the first try (common greylisting delays are 1-5 minutes)
    greylist_retry_after: Duration = 300.0

    @field_validator("greylist_retry_after")
    @classmethod
    def _retry_within_an_hour(cls, value: float) -> float:
        if value > _GREYLIST_RETRY_MAX:
            raise ValueError(
                f"{value:g} s is more than an hour: greylisting delays are minutes, and the "
                "sweep waits for the retry at its end (use e.g. '5m')"
            )
        return value

    @model_validator(mode="after")
    def _external_is_not_campus(self) -> RelayConfig:
        if not self.external_domains:
            raise ValueError("relay.external_domains: at least one external test domain is needed")
        for i, domain in enumerate(self.external_domains):
            if any(domain == c or domain.endswith("." + c) for c in self.campus_domains):
                raise ValueError(
                    f"relay.external_domains[{i}]: {domain!r} is a campus domain; relay tests "
                    "need a domain outside campus"
                )
        return self


class CanaryConfig(_Model):
    """Confirmation mode: a real message to a mailbox the ISO owns, caught by our own receiver."""

    enabled: StrictBool = False
    domain: DomainField = "canary.relayaudit.invalid"
    local_part: LocalPart = "relayaudit-canary"
    listen: Endpoint = ("127.0.0.1", 2526)
    wait: Duration = 60.0
    # connections the receiver holds at once: anyone who reaches it can connect (canary.py)
    max_connections: int = Field(default=64, ge=1, le=10_000)
    # the envelope sender of a canary through a relay that relays only for campus senders: a
    # campus address of the ISO (bounces come back to it), never a test domain
    campus_sender: str | None = Field(default=None, max_length=254)
    # why `domain` may lie under a campus domain (Config._canary_mails_only_the_iso)
    campus_domain_reason: str | None = Field(default=None, min_length=1, max_length=300)

    @field_validator("campus_domain_reason")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError(f"{value!r} is not a reason (one line of text: why it is safe)")
        return value

    @field_validator("campus_sender")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        if value is None:
            return None
        local, at, domain = value.rpartition("@")
        if not at or not _LOCAL_PART.match(local) or not _HOSTNAME.match(domain):
            raise ValueError(f"{value!r} is not a plain address (local-part@campus-domain)")
        return f"{local}@{domain.lower()}"

    @model_validator(mode="after")
    def _deliverable(self) -> CanaryConfig:
        # a canary to a domain that cannot resolve never arrives, and "not delivered" would
        # clear real relays as accept-without-delivery
        if self.enabled and (self.domain == "invalid" or self.domain.endswith(".invalid")):
            raise ValueError(
                f"canary.domain: {self.domain!r} cannot receive mail; confirmation mode needs a "
                "domain whose MX points at canary.listen"
            )
        return self


class Timeouts(_Model):
    """Every wait has a deadline."""

    connect: Duration = 3.0
    command: Duration = 15.0
    # servers may pause before the 220 (greet delays, tarpits); unset: 30 s, within `session`
    greeting: Duration | None = None
    session: Duration = 120.0

    @property
    def greeting_wait(self) -> float:
        return self.greeting if self.greeting is not None else min(30.0, self.session)

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.greeting is not None and self.greeting > self.session:
            raise ValueError(
                f"timeouts.greeting: {self.greeting:g}s is longer than timeouts.session "
                f"({self.session:g}s)"
            )
        if self.command > self.session:
            raise ValueError(
                f"timeouts.command: {self.command:g}s is longer than timeouts.session "
                f"({self.session:g}s)"
            )
        return self


class Limits(_Model):
    """Politeness: how hard the scanner may push."""

    concurrency: int = Field(default=256, ge=1, le=100_000)
    rate: float = Field(
        default=200.0, gt=0, allow_inf_nan=False, description="new connections per second, overall"
    )
    subnet_rate: float = Field(
        default=20.0, gt=0, allow_inf_nan=False, description="new connections per second per /24"
    )
    processes: int = Field(
        default=1, ge=1, le=64, description="`sweep` processes sharing the work (and the rates)"
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"  # relayaudit/eventloop.py


class ApprovedService(_Model):
    """An SMTP service the ISO approved; findings about it are not 'unapproved'.

    `owner` names the owner (of `[[owners]]` or owners_file) that runs this service, over the
    range's owner; `expires`: the approval holds through that day, in the schedule's zone (the
    host's), judged at a sweep's recorded start (docs/owners.md)."""

    address: NetworkField
    port: Port | None = None
    note: str = ""
    owner: Annotated[str, AfterValidator(_one_line), Field(max_length=100)] | None = None
    expires: date | None = None

    def covers(self, address: Address, port: int) -> bool:
        return address in self.address and (self.port is None or self.port == port)

    def valid_on(self, day: date | None) -> bool:
        """Whether the approval holds on `day` (None: expiry not considered)."""
        return day is None or self.expires is None or day <= self.expires

    def describe(self) -> str:
        """`127.0.88.1/32 port 25 ("ISO-0042 hub")`: which approval, for a summary."""
        port = f" port {self.port}" if self.port is not None else ""
        note = f" ({self.note!r})" if self.note else ""
        return f"{self.address}{port}{note}"


def _one_line(value: str) -> str:
    value = value.strip()
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{value!r} is not one line of text")
    return value


def _owner_range(value: object) -> object:
    """A range of an owner: checked here, read by owners.py (host bits set: its network, warned)."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a network or address string")
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network or address") from None
    return value.strip()


def mailbox(value: str) -> str:
    """`local@domain` with the domain in lower case; ValueError for anything else."""
    local, at, domain = value.strip().rpartition("@")
    if not at or not _LOCAL_PART.match(local) or not _HOSTNAME.match(domain):
        raise ValueError(f"{value!r} is not a plain address (local-part@domain)")
    return f"{local}@{domain.lower()}"


class OwnerEntry(_Model):
    """One `[[owners]]` entry: the department that runs these ranges, where its mail goes.

    On a range that owners_file lists too, this entry wins (owners.py).
    """

    name: Annotated[str, AfterValidator(_one_line), Field(max_length=100)]
    ranges: Annotated[
        tuple[Annotated[str, BeforeValidator(_owner_range)], ...], Field(min_length=1)
    ]
    contact: Annotated[str, AfterValidator(mailbox), Field(max_length=254)]
    queue: Annotated[str, AfterValidator(_one_line), Field(max_length=100)] | None = None


class Output(_Model):
    """Where findings go."""

    findings: FilePath = Path("findings.jsonl")
    # "changes": a line for an ongoing or resolved finding is compact (no transcript, the first
    # evidence lines); "always": every line whole, as before release 0.2
    transcripts: Literal["changes", "always"] = "changes"


class StateConfig(_Model):
    """Memory across sweeps (SQLite, WAL)."""

    path: FilePath = Path("relayaudit-state.sqlite")
    resolve_after: int = Field(
        default=2, ge=1, le=100, description="completed sweeps absent before resolved"
    )
    keep_days: int = Field(
        default=365, ge=1, le=36500, description="history and sent-alert rows kept this long"
    )


class ScheduleConfig(_Model):
    """When the daemon sweeps: every `interval`, or at a 5-field `cron` expression; plus jitter."""

    interval: Duration | None = 6 * 3600.0
    cron: str | None = None
    jitter: Duration | None = None
    healthy_within: Duration | None = None  # /healthz fails when no sweep completed this long

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleConfig:
        if self.cron is not None:
            try:
                parse_cron(self.cron)
            except ValueError as exc:
                raise ValueError(f"schedule.cron: {exc}") from None
        return self


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# set by relayaudit itself for every run of a command hook
IDEMPOTENCY_VARIABLE = "RELAYAUDIT_IDEMPOTENCY_KEY"
_HOOK_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


# the templates relayaudit ships (Request Tracker, Jira, TheHive, ServiceNow, chat): a hook's
# `template = "rt-create.json.j2"` names one when no such file is beside the config
SHIPPED_TEMPLATES = Path(__file__).resolve().parent / "hook_templates"


class HookTemplate(_Model):
    """A template file, read and compiled when the config is loaded (a syntax error is the
    config's error, with the file and line); `path` as resolved, `text` what was read."""

    path: str
    text: str


def _template_file(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str):
        return value  # a HookTemplate given in Python, or pydantic's own type error
    if not value.strip() or "\x00" in value:
        raise ValueError(f"{value!r} is not a usable file path")
    base = (info.context or {}).get("base", Path.cwd())
    path = Path(base, value)  # relative to the config file's directory
    if not path.exists() and Path(value).name == value and (SHIPPED_TEMPLATES / value).is_file():
        path = SHIPPED_TEMPLATES / value  # a template relayaudit ships, by its bare name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"template {str(path)!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"template {str(path)!r} is not UTF-8 text") from None
    try:
        check_template(text, str(path))
    except TemplateError as exc:
        raise ValueError(f"template {exc}") from None
    return HookTemplate(path=str(path), text=text)


TemplateFile = Annotated[HookTemplate, BeforeValidator(_template_file)]


def _hook_name(value: object) -> object:
    if isinstance(value, str) and not _HOOK_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a hook name: lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 63"
        )
    return value


HookName = Annotated[str, BeforeValidator(_hook_name)]


class _Hook(_Model):
    """What every hook has: a stable name (ticket references and the outbox are keyed by it),
    an optional template for what it sends, and values for its templates."""

    # required when a config has several hooks of one kind; else the kind ("webhook")
    name: HookName | None = None
    template: TemplateFile | None = None  # rendered into the request body, stdin or mail body
    vars: dict[str, str] = {}  # `vars.NAME` in the templates: a Jira project, an RT queue, ...


class CommandHook(_Hook):
    """Runs a program with the alert as JSON on stdin (e.g. a ticketing CLI)."""

    argv: tuple[str, ...] = Field(min_length=1)
    timeout: Duration = 30.0
    # variables passed on from the daemon's environment besides PATH, LANG and TZ; the rest of
    # it (the daemon's secrets among it) the program never sees
    env: tuple[str, ...] = ()

    @field_validator("env")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name == IDEMPOTENCY_VARIABLE:
                raise ValueError(f"{name!r} is set by relayaudit for each run; do not list it")
        if len(set(value)) != len(value):
            raise ValueError(f"{list(value)!r} lists a name twice")
        return value


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also written as ::ffff:127.x.y.z) or the name localhost."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


HttpMethod = Literal["POST", "PUT", "PATCH"]
_URL_HEAD = re.compile(r"^https?://[^/\s{}]+(/|$)")


def _checked_url(value: str, what: str) -> str:
    """An http(s) URL whose scheme and host are literal; the rest may be a template
    (`.../ticket/{{ ticket_ref }}/comment`), compiled here so a typo is a config error."""
    if not _URL_HEAD.match(value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if "{" in value:
        try:
            check_template(value, what)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        head = _URL_HEAD.match(value)
        assert head is not None
        value_for_port = head.group(0)
    else:
        value_for_port = value
    try:
        urlsplit(value_for_port).port  # noqa: B018 (raises for a port out of range or a broken [v6])
    except ValueError:
        raise ValueError(f"{value!r} is not an http:// or https:// URL") from None
    return value


def _refuse_clear_text(url: object, key: str, secret: str = "") -> None:
    """ValueError when `url` is http:// to a host that is not loopback: a request with a
    token, password or HMAC signature must not cross the network in clear text."""
    if not isinstance(url, str):
        return
    parts = urlsplit(url.split("{", 1)[0])
    host = parts.hostname or ""
    if parts.scheme == "http" and not _is_loopback(host):
        shown = f"[{host}]" if ":" in host else host
        which = "" if key == "url" else f" ({key})"
        raise ValueError(
            f"{secret}refused over http://{shown}{which}: the request would carry it in clear "
            "text; use an https:// url (http:// only to a loopback host: 127.0.0.0/8, "
            "::1, localhost)"
        )


class WebhookHook(_Hook):
    """HTTP POST of the alert as JSON, or a ticket system's API: create a ticket, then update it.

    With `ticket_ref` (a JSON pointer into the create call's response, e.g. "/id"), the ticket's
    id is kept per finding and hook; later transitions go to `update_url` (a resolved one to
    `resolve_url`, an owner-changed one to `move_url`, if given) with their own method and
    template, and get `ticket_ref`.
    """

    url: str
    method: HttpMethod = "POST"
    timeout: Duration = 10.0
    token: Secret | None = None  # sent as `Authorization: <token_scheme> ...`
    token_scheme: str = Field(default="Bearer", pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,30}$")
    username: str | None = None  # with password: HTTP Basic authentication
    password: Secret | None = None
    hmac_key: Secret | None = None  # signs the body: `X-Relayaudit-Signature: sha256=<hex>`
    content_type: str = Field(default="application/json", pattern=r"^[\x21-\x7e][\x20-\x7e]*$")
    ticket_ref: str | None = Field(default=None, pattern=r"^(/([^/~]|~[01])*)+$")
    update_url: str | None = None
    update_method: HttpMethod = "POST"
    update_template: TemplateFile | None = None
    resolve_url: str | None = None
    resolve_method: HttpMethod = "POST"
    resolve_template: TemplateFile | None = None
    # an owner-changed alert: the call that moves the ticket to the new owner's queue (RT's
    # PUT /ticket/ID with Queue); unset, it goes to update_url like any other transition
    move_url: str | None = None
    move_method: HttpMethod = "PUT"
    move_template: TemplateFile | None = None

    @field_validator("url", "update_url", "resolve_url", "move_url")
    @classmethod
    def _http(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _checked_url(value, str(info.field_name))

    @field_validator("token", "hmac_key", "password")
    @classmethod
    def _not_in_clear(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # a bearer token read on the wire is a working credential; an HMAC key sent beside its
        # body is not sent, but a receiver reached over plain HTTP is not the one it was meant for
        if value is not None:
            _refuse_clear_text(info.data.get("url"), "url")  # the later URLs: _ticket_calls
        return value

    @model_validator(mode="after")
    def _ticket_calls(self) -> WebhookHook:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together (HTTP Basic authentication)")
        if self.password is not None and self.token is not None:
            raise ValueError("token and username/password: give one way to authenticate")
        secrets = [k for k in ("token", "hmac_key", "password") if getattr(self, k) is not None]
        if secrets:
            # these URLs come after the secrets, whose field validator cannot see them
            for key in ("update_url", "resolve_url", "move_url"):
                _refuse_clear_text(getattr(self, key), key, f"{secrets[0]}: ")
        uses_ref = [
            k for k in ("update_url", "resolve_url", "move_url") if getattr(self, k) is not None
        ]
        if uses_ref and self.ticket_ref is None:
            raise ValueError(
                f"{uses_ref[0]} needs ticket_ref: a JSON pointer to the ticket's id in the "
                'response to the create call (e.g. ticket_ref = "/id")'
            )
        return self


TlsMode = Literal["starttls", "implicit", "none"]


class EmailHook(_Hook):
    """Mails the alert to a ticketing system's mail gateway (RT, Jira, ServiceNow)."""

    host: str
    port: Port = 25
    username: str | None = None
    password: Secret | None = None
    # the old spelling of `tls` (true: "starttls", false: "none"); still read, with a warning
    # (Config.warnings), and left out of dumps and the fingerprint
    starttls: StrictBool | None = Field(default=None, exclude=True, repr=False)
    # "starttls": STARTTLS is required (no credentials or message in clear text); "implicit":
    # TLS from the first byte (port 465); "none": plain SMTP. Unset: "implicit" on port 465,
    # else "starttls" with credentials, else "none", as before (set by _tls_default, so
    # the default written here is never used)
    tls: TlsMode = "none"
    mail_from: str
    to: tuple[str, ...] = Field(min_length=1)
    timeout: Duration = 30.0
    # the Subject, rendered like `template`; it may name another hook's ticket, e.g.
    # "[rt.campus.example #{{ tickets.rt }}] {{ alert.title }}" for RT's mail gateway
    subject_template: str | None = None
    # copy the finding's owner (its contact, which owners_contact_domains keeps on campus) on
    # each of that finding's mails: a Cc header and an envelope recipient
    cc_owner: StrictBool = False

    @field_validator("subject_template")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_template(value, "subject_template")
            except TemplateError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _tls_default(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        if "starttls" in data:
            if "tls" in data:
                raise ValueError(
                    "tls and starttls are both given: starttls is the old name of tls; "
                    'keep only tls ("starttls", "implicit" or "none")'
                )
            old = data["starttls"]
            if isinstance(old, bool):  # anything else: starttls's own error
                data = {**data, "tls": "starttls" if old else "none"}
        elif "tls" not in data:
            credentials = data.get("username") is not None or data.get("password") is not None
            if data.get("port") == 465:
                data = {**data, "tls": "implicit"}
            else:
                data = {**data, "tls": "starttls" if credentials else "none"}
        return data

    @field_validator("tls")
    @classmethod
    def _credentials_encrypted(cls, value: TlsMode, info: ValidationInfo) -> TlsMode:
        credentials = info.data.get("username") is not None or info.data.get("password") is not None
        if value == "none" and credentials:
            given = " (from starttls = false)" if info.data.get("starttls") is False else ""
            raise ValueError(
                f"'none'{given} with a username or password would send them in clear text; "
                'use tls = "starttls" (port 587) or tls = "implicit" (port 465)'
            )
        return value


class AlertsConfig(_Model):
    """Where transitions of findings go; every alert is kept in a durable outbox until delivered."""

    command: tuple[CommandHook, ...] = ()
    webhook: tuple[WebhookHook, ...] = ()
    email: tuple[EmailHook, ...] = ()
    max_attempts: int = Field(default=12, ge=1, le=1000)
    backoff_initial: Duration = 5.0
    backoff_max: Duration = 1800.0
    # "v2": the compact, versioned alert with a relay's remediation reference
    # (schemas/alert.v2.schema.json); "v1": the same without it, as relayaudit 0.1.x sent it
    # (schemas/alert.v1.schema.json); "full": the finding whole, evidence and transcript included
    format: Literal["v2", "v1", "full"] = "v2"

    @model_validator(mode="after")
    def _names(self) -> AlertsConfig:
        seen: dict[str, str] = {}
        for kind in ("command", "webhook", "email"):
            hooks: tuple[_Hook, ...] = getattr(self, kind)
            for i, hook in enumerate(hooks):
                if hook.name is None and len(hooks) > 1:
                    raise ValueError(
                        f"alerts.{kind}[{i}].name: required when there are several {kind} hooks "
                        "(tickets and deliveries are kept by name, so reordering hooks never "
                        "points an update at the wrong ticket)"
                    )
                name = hook.name or kind
                if name in seen:
                    raise ValueError(
                        f"alerts.{kind}[{i}].name: {name!r} is also the name of {seen[name]}"
                    )
                seen[name] = f"alerts.{kind}[{i}]"
        return self

    def hooks(self) -> list[tuple[str, CommandHook | WebhookHook | EmailHook]]:
        """Every hook with its name (its outbox channel): commands, webhooks, then email."""
        return [
            (hook.name or kind, hook)
            for kind in ("command", "webhook", "email")
            for hook in getattr(self, kind)
        ]

    def legacy_channels(self) -> dict[str, str]:
        """relayaudit 0.1's channel of each hook (`webhook:0`, by kind and position) -> its name."""
        return {
            f"{kind}:{i}": hook.name or kind
            for kind in ("command", "webhook", "email")
            for i, hook in enumerate(getattr(self, kind))
        }


def _relative_to_config(value: object, info: ValidationInfo) -> object:
    """A list or zone file path; a relative one is relative to the config file's directory."""
    _path(value)
    if isinstance(value, str) and value != "-":
        base = (info.context or {}).get("base", Path.cwd())
        return Path(base, value)
    return value


SourcePath = Annotated[Path, BeforeValidator(_relative_to_config)]
_SOURCE_KINDS = ("file", "mx", "zone_file", "axfr")


class TargetSource(_Model):
    """One entry of `targets_from`: where more target addresses come from, read at each sweep.

    `{ file = "PATH" }`: one address or CIDR network per line (`-`: standard input, `sweep`
    only). `{ mx = "DOMAIN" }`: the A and AAAA records of the domain's MX hosts.
    `{ zone_file = "PATH" }`: the A and AAAA records of every name in a zone file.
    `{ axfr = "ZONE", server = "ADDR" }`: the same from a zone transfer.
    """

    file: SourcePath | None = None
    mx: DomainField | None = None
    zone_file: SourcePath | None = None
    axfr: DomainField | None = None
    # the DNS server to ask: required for axfr; for mx, unset means the system's resolvers
    server: AddressField | None = None
    port: Port = 53
    # zone_file: the zone's name, when the file has no $ORIGIN
    origin: DomainField | None = None
    timeout: Duration = 10.0

    @model_validator(mode="after")
    def _one_kind(self) -> TargetSource:
        given = [k for k in _SOURCE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "each entry names one source: file, mx, zone_file or axfr "
                f"(got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind == "axfr" and self.server is None:
            raise ValueError(
                f"axfr {self.axfr!r} needs server = \"ADDRESS\": the DNS server that allows "
                "this host the transfer"
            )
        if self.server is not None and kind in ("file", "zone_file"):
            raise ValueError(f"server: a {kind} entry asks no DNS server")
        if self.origin is not None and kind != "zone_file":
            raise ValueError("origin: only a zone_file entry has one")
        if self.file is not None and str(self.file) == "-":
            raise ValueError(
                'file: "-" (standard input) is for `relayaudit sweep --targets-file -` only'
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _SOURCE_KINDS if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        """How logs, `config check` and findings name the source: `mx campus.example`."""
        kind = self.kind
        where = ""
        if self.server is not None:
            server = f"[{self.server}]" if self.server.version == 6 else str(self.server)
            where = f" from {server}" + (f":{self.port}" if self.port != 53 else "")
        return f"{kind} {getattr(self, kind)}{where}"


# Kubernetes label keys ([prefix/]name) and values
_LABEL_PREFIX = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _labels(value: object) -> object:
    if not isinstance(value, Mapping):
        return value  # pydantic says "must be a table"
    if not value:
        # an empty namespaceSelector selects every namespace of the cluster
        raise ValueError("must name at least one label of the monitoring namespace")
    for key, label in value.items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and not _LABEL_PREFIX.match(prefix)) or not _LABEL_NAME.match(name):
            raise ValueError(f"{key!r} is not a Kubernetes label key ([prefix/]name)")
        if not isinstance(label, str) or (label and not _LABEL_NAME.match(label)):
            raise ValueError(f"{key!r}: {label!r} is not a Kubernetes label value")
    return value


class DeployConfig(_Model):
    """What `relayaudit deploy render` needs besides the scope: who else the daemon talks to."""

    # hosts outside scope that connect to the daemon's listeners: metrics scrapers, readers of
    # the live report, canary clients (an MX host that forwards to canary.listen)
    allow_from: tuple[NetworkField, ...] = ()
    # addresses of host names at render time, instead of DNS: the alert hooks' hosts, and the
    # hosts an [[alerts.command]] program reaches (render cannot know those)
    hosts: dict[DomainField, Annotated[tuple[AddressField, ...], Field(min_length=1)]] = {}
    # DNS resolvers the daemon asks; unset: the nameservers of /etc/resolv.conf at render time
    resolvers: tuple[AddressField, ...] | None = None
    # the NetworkPolicy lets pods of namespaces with these labels reach the metrics port
    monitoring_namespace_labels: Annotated[dict[str, str], BeforeValidator(_labels)] = {
        "kubernetes.io/metadata.name": "monitoring"
    }


class LoggingConfig(_Model):
    """structlog JSON lines: a file (reopened on SIGHUP for logrotate) and/or stdout.

    `format`: "json", relayaudit's own lines, or "ecs", the same events in Elastic Common
    Schema fields (relayaudit/ecs.py, docs/logging.md).
    """

    file: FilePath | None = None
    stdout: StrictBool = True
    level: str = "info"
    format: Literal["json", "ecs"] = "json"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"{value!r} is not one of debug, info, warning, error")
        return value.lower()


class MetricsConfig(_Model):
    """Prometheus /metrics and /healthz; loopback unless the operator says otherwise."""

    enabled: StrictBool = True
    listen: Endpoint = ("127.0.0.1", 9425)


MIN_TOKEN_LENGTH = 16


class ReportConfig(_Model):
    """The HTML report the daemon serves at `/` on the metrics listener (and `/report.csv`).

    Findings carry transcripts, so the report is served on a loopback listener only, unless
    `serve` is set with a bearer token; with a `token_file`, every report request needs it.
    """

    serve: StrictBool = False  # also on a listener that is not loopback (needs token_file)
    token_file: FilePath | None = None
    _token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_token(self) -> ReportConfig:
        if self.token_file is None:
            if self.serve:
                raise ValueError(
                    "report.serve: true needs report.token_file, a file holding the bearer "
                    "token that every request for the report must send"
                )
            return self
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(
                f"report.token_file: {str(self.token_file)!r} cannot be read: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ValueError(
                f"report.token_file: {str(self.token_file)!r} is not UTF-8 text"
            ) from None
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() or ord(c) < 33 for c in token):
            raise ValueError(
                f"report.token_file: {str(self.token_file)!r} must hold one token of at least "
                f"{MIN_TOKEN_LENGTH} printable characters without spaces (e.g. the output of "
                "`openssl rand -hex 32`)"
            )
        self._token = SecretStr(token)
        return self

    @property
    def token(self) -> SecretStr | None:
        """The bearer token read from `token_file` when the config was loaded."""
        return self._token


class Config(_Model):
    """The whole validated configuration; nothing else in relayaudit reads files or environment."""

    scope: tuple[NetworkField, ...]
    # required, unless targets_from names a source; `targets = []` says "lists only"
    targets: tuple[NetworkField, ...] = ()
    # more targets, read at each sweep: address lists, MX hosts, zone files, zone transfers
    targets_from: tuple[TargetSource, ...] = ()
    # a listed address or network outside scope: "skip" (reported with file and line) or "fail"
    targets_out_of_scope: Literal["skip", "fail"] = "skip"
    exclude: tuple[NetworkField, ...] = ()
    ports: tuple[Port, ...] = (25, 465, 587)
    implicit_tls_ports: tuple[Port, ...] = (465,)
    seed: int = 0
    # one address, or one IPv4 and one IPv6 address: each target is probed from its family's
    source_address: SourceAddresses = ()
    identity: Identity = Identity()
    relay: RelayConfig = RelayConfig()
    canary: CanaryConfig = CanaryConfig()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    approved: tuple[ApprovedService, ...] = ()
    # who runs which ranges (owners.py): entries here, and/or a CSV export of the IPAM read at
    # each sweep; contacts must lie under owners_contact_domains (unset: relay.campus_domains).
    # Left out of the fingerprint: an edit must not throw away an interrupted sweep
    owners: tuple[OwnerEntry, ...] = ()
    owners_file: SourcePath | None = None
    owners_contact_domains: tuple[DomainField, ...] = ()
    # why scope or targets may be larger than scope.LARGE_SCOPE; logged with every sweep. Left
    # out of the fingerprint (as is `deploy`): neither changes what a sweep walks
    allow_large_scope: str | None = Field(default=None, min_length=1, max_length=200, exclude=True)
    deploy: DeployConfig = Field(default=DeployConfig(), exclude=True)
    output: Output = Output()
    state: StateConfig = StateConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    alerts: AlertsConfig = AlertsConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    report: ReportConfig = ReportConfig()
    source: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _default_implicit_tls(cls, data: Any) -> Any:
        # 465 speaks TLS from the first byte wherever it is scanned; other ports only if listed
        if isinstance(data, Mapping) and "implicit_tls_ports" not in data:
            ports = data.get("ports", (25, 465, 587))
            if isinstance(ports, list | tuple):
                data = {**data, "implicit_tls_ports": [p for p in ports if p == 465]}
        return data

    @field_validator("scope")
    @classmethod
    def _not_empty(cls, value: tuple[Network, ...]) -> tuple[Network, ...]:
        if not value:
            raise ValueError("must list at least one network")
        return value

    @field_serializer("source_address")
    def _one_source_as_before(self, value: tuple[Address, ...]) -> str | list[str] | None:
        # one source dumps as it did when the key took one address, so the fingerprint of such
        # a config (which guards resuming an interrupted sweep) is the same as before
        if not value:
            return None
        return str(value[0]) if len(value) == 1 else [str(a) for a in value]

    @model_validator(mode="after")
    def _something_to_sweep(self) -> Config:
        if not self.targets and not self.targets_from and "targets" not in self.model_fields_set:
            raise ValueError(
                "targets: required key is missing (list networks, or name sources in "
                "targets_from and write targets = [])"
            )
        return self  # `targets = []` alone sweeps only what `sweep --targets-file` gives

    def source_for(self, version: int) -> Address | None:
        """The source address for targets of IP version `version` (None: the system picks)."""
        return next((a for a in self.source_address if a.version == version), None)

    def unsourced_family(self, version: int) -> bool:
        """Targets of this family cannot be probed: source_address is set, but not for it."""
        return bool(self.source_address) and self.source_for(version) is None

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must list at least one port")
        if len(set(value)) != len(value):
            raise ValueError(f"{list(value)!r} lists a port twice")
        return value

    @field_validator("allow_large_scope")
    @classmethod
    def _reason(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(ord(c) < 32 for c in value)):
            raise ValueError(f"{value!r} is not a reason (one line of text: who approved it, why)")
        return value

    @model_validator(mode="after")
    def _inside_scope(self) -> Config:
        # every problem at once, each at its own key (parse_config runs the scope checks alone
        # when other keys are invalid)
        problems = [
            p
            for loc in _SCOPE_CHECKS
            for p in _outside_scope(
                self.scope, loc, _ranges(enumerate(getattr(self, str(loc[0]))), loc)
            )
        ]
        problems += (
            _problem(
                ("implicit_tls_ports", i), port, f"{port} is not one of ports {list(self.ports)}"
            )
            for i, port in enumerate(self.implicit_tls_ports)
            if port not in self.ports
        )
        # with targets_from, the families of the targets are known only once the lists are read:
        # `config check` warns then (and each unreachable target says why)
        if not self.targets_from:
            families = {t.version for t in self.targets}
            problems += (
                _problem(
                    ("source_address",),
                    str(source),
                    f"'{source}' is IPv{source.version} but no target is",
                )
                for source in self.source_address
                if families and source.version not in families
            )
        if problems:
            raise ValidationError.from_exception_data("Config", problems)
        return self

    @model_validator(mode="after")
    def _bounded(self) -> Config:
        """Large scopes, targets and allow lists only with a reason (allow_large_scope)."""
        if self.allow_large_scope is not None:
            return self
        hint = (
            '; set allow_large_scope = "<reason>" if that is meant (the reason is logged with '
            "every sweep)"
        )
        for loc, nets in (
            (("scope",), self.scope),
            (("deploy", "allow_from"), self.deploy.allow_from),
        ):
            v4 = address_count(nets)[4]
            if v4 > LARGE_SCOPE:
                listed = ", ".join(str(n) for n in nets if n.version == 4)
                raise _scope_error(
                    f"the IPv4 ranges ({listed}) hold {v4:,} addresses, more than "
                    f"{LARGE_SCOPE:,} (a /8)" + hint,
                    loc,
                )
            for i, net in enumerate(nets):
                if net.version == 6 and net.prefixlen < LARGE_V6_PREFIX:
                    raise _scope_error(
                        f"'{net}' is larger than a /{LARGE_V6_PREFIX}, a campus's IPv6 "
                        "allocation" + hint,
                        (*loc, i),
                    )
        # IPv4 targets lie inside an IPv4 scope bounded above; an IPv6 /32 scope is not
        v6 = address_count(self.targets, self.exclude)[6]
        if v6 > LARGE_SCOPE:
            listed = ", ".join(str(n) for n in self.targets if n.version == 6)
            raise _scope_error(
                f"the IPv6 target ranges ({listed}) hold {v6:,} addresses after exclusions, more "
                f"than the {LARGE_SCOPE:,} (2**24) a sweep enumerates" + hint,
                ("targets",),
            )
        return self

    @model_validator(mode="after")
    def _canary_mails_only_the_iso(self) -> Config:
        """Confirmation mode mails the ISO's canary mailbox and nothing else (issue 20)."""
        canary, relay = self.canary, self.relay
        for i, domain in enumerate(relay.external_domains):
            if _within(canary.domain, domain):
                raise ValueError(
                    f"canary.domain: {canary.domain!r} is or lies under the external test domain "
                    f"{domain!r} (relay.external_domains[{i}]): canaries go only to a domain the "
                    "ISO's receiver answers for, test recipients never to it"
                )
        for i, campus in enumerate(relay.campus_domains):
            if canary.domain == campus:
                raise ValueError(
                    f"canary.domain: {canary.domain!r} is the campus domain "
                    f"relay.campus_domains[{i}]: every campus mail server delivers it, so a "
                    "canary through one proves nothing; use a domain of its own"
                )
            if _within(canary.domain, campus) and canary.campus_domain_reason is None:
                raise ValueError(
                    f"canary.domain: {canary.domain!r} lies under the campus domain {campus!r} "
                    f"(relay.campus_domains[{i}]): a campus server that routes campus "
                    "subdomains would deliver such a canary itself and fake a confirmation. "
                    "Use a domain outside campus, or say why this one is safe in "
                    'canary.campus_domain_reason = "..." (e.g. its MX is the scanner alone and '
                    "no campus server routes it)"
                )
        sender = canary.campus_sender
        if sender is not None:
            domain = sender.rpartition("@")[2]
            if not any(_within(domain, c) for c in relay.campus_domains):
                raise ValueError(
                    f"canary.campus_sender: {sender!r} is not an address in one of "
                    f"relay.campus_domains ({', '.join(relay.campus_domains) or 'none set'}): "
                    "it is the sender a relay for campus senders needs"
                )
            if _within(domain, canary.domain):
                raise ValueError(
                    f"canary.campus_sender: {sender!r} is in the canary domain; use the ISO's "
                    "own campus mailbox, where bounces are read"
                )
        return self

    @model_validator(mode="after")
    def _approval_owners(self) -> Config:
        # the name is looked up in the owner table (owners.py); without a table it names nobody
        if self.owners or self.owners_file is not None:
            return self
        for i, entry in enumerate(self.approved):
            if entry.owner is not None:
                raise ValueError(
                    f"approved[{i}].owner: {entry.owner!r} names an owner, but there is no "
                    "owner table ([[owners]] or owners_file)"
                )
        return self

    @model_validator(mode="after")
    def _owner_contacts(self) -> Config:
        # an IPAM export must not route vulnerability details to a mailbox outside campus
        if not self.owners and self.owners_file is None:
            return self
        domains = self.contact_domains
        if not domains:
            raise ValueError(
                "owners_contact_domains: required with [[owners]] or owners_file when "
                "relay.campus_domains is not set (the domains an owner's contact may lie under)"
            )
        for i, entry in enumerate(self.owners):
            domain = entry.contact.rpartition("@")[2]
            if not any(_within(domain, d) for d in domains):
                raise _scope_error(  # with its line in the file, as a scope rule's
                    f"{entry.contact!r} is not under owners_contact_domains "
                    f"({', '.join(domains)}): an owner's mail stays on campus",
                    ("owners", i, "contact"),
                )
        first: dict[str, int] = {}
        for i, entry in enumerate(self.owners):
            j = first.setdefault(entry.name, i)
            other = self.owners[j]
            for key in ("contact", "queue"):
                if getattr(entry, key) != getattr(other, key):
                    raise _scope_error(
                        f"owner {entry.name!r} has {key} {getattr(entry, key)!r} here but "
                        f"{getattr(other, key)!r} in owners[{j}]; one owner has one {key}",
                        ("owners", i, key),
                    )
        return self

    @property
    def contact_domains(self) -> tuple[str, ...]:
        """The domains an owner's contact may lie under."""
        return self.owners_contact_domains or self.relay.campus_domains

    @property
    def warnings(self) -> tuple[str, ...]:
        """Keys that still load but should change, one line each: `key.path: what to write`."""
        starttls = tuple(
            f"alerts.email[{i}].starttls: the old name of tls; starttls = "
            f'{"true" if hook.starttls else "false"} is read as tls = "{hook.tls}" '
            "(write that instead)"
            for i, hook in enumerate(self.alerts.email)
            if hook.starttls is not None
        )
        return starttls + tuple(
            f"owners[{i}].ranges[{j}]: {text!r} has host bits set; read as "
            f"'{ipaddress.ip_network(text, strict=False)}'"
            for i, entry in enumerate(self.owners)
            for j, text in enumerate(entry.ranges)
            if ipaddress.ip_network(text, strict=False) != _strict_or_none(text)
        )

    def is_approved(
        self, address: Address, port: int, *, day: date | None = None
    ) -> ApprovedService | None:
        """The first approval covering address:port that holds on `day` (None: any approval,
        expired or not). A still-valid approval wins over an expired one for the same service."""
        if not self.approved:
            return None
        address = _normal_or_self(address)
        return next(
            (a for a in self.approved if a.covers(address, port) and a.valid_on(day)), None
        )

    def expired_approval(self, address: Address, port: int, *, day: date) -> ApprovedService | None:
        """The approval covering address:port that expired last before `day`, when none holds."""
        if not self.approved or self.is_approved(address, port, day=day) is not None:
            return None
        address = _normal_or_self(address)
        gone = [a for a in self.approved if a.covers(address, port) and not a.valid_on(day)]
        return max(gone, key=lambda a: a.expires or date.min, default=None)

    def expiring(self, day: date, *, within: int = 30) -> list[ApprovedService]:
        """Approvals that hold on `day` and expire within `within` days of it, soonest first."""
        soon = [
            a
            for a in self.approved
            if a.expires is not None and day <= a.expires <= day + timedelta(days=within)
        ]
        return sorted(soon, key=lambda a: a.expires or date.max)

    def in_scope(self, address: Address) -> bool:
        """Whether `address` (in any form: ::ffff:192.0.2.1 is 192.0.2.1) lies in the scope."""
        try:
            address = normal_address(address)
        except ConfigError:  # a zone id, or space no campus host can hold
            return False
        return any(address in net for net in self.scope)


def _strict_or_none(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None


def _within(domain: str, parent: str) -> bool:
    """`domain` is `parent` or one of its subdomains (both lower case)."""
    return domain == parent or domain.endswith("." + parent)


def _normal_or_self(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv4Address):
        return address  # already normal (judged for every host a sweep finds: no parse)
    try:
        return normal_address(address)
    except ConfigError:
        return address


# the keys whose ranges must lie inside scope, as key paths of the file (approved: each entry's
# address); Config checks them, and parse_config checks those that validated when others did not
_SCOPE_CHECKS: tuple[KeyPath, ...] = (("targets",), ("exclude",), ("approved", "address"))


def _ranges(entries: Iterable[tuple[int, Any]], loc: KeyPath) -> list[tuple[int, Network]]:
    """The networks of validated entries at `loc` (an [[approved]] entry's address), by index."""
    return [(i, e.address if loc[0] == "approved" else e) for i, e in entries]


def _problem(loc: KeyPath, value: object, message: str) -> InitErrorDetails:
    """A broken rule across keys, at the key it is about (its line added when formatted)."""
    return {
        "type": PydanticCustomError("check", "{message}", {"message": message}),
        "loc": loc,
        "input": value,
    }


def _outside_scope(
    scope: tuple[Network, ...], loc: KeyPath, networks: list[tuple[int, Network]]
) -> list[InitErrorDetails]:
    # every network here is already normal (IPv4 written in IPv6 is IPv4), so one family
    # comparison decides
    listed = ", ".join(str(s) for s in scope)
    return [
        _problem((*loc[:1], i, *loc[1:]), str(net), f"'{net}' is outside scope ({listed})")
        for i, net in networks
        if not any(
            net.version == s.version and net.subnet_of(s)  # type: ignore[arg-type]
            for s in scope
        )
    ]


def _validated(kind: Any, value: object) -> Any:
    """`value` validated as `kind` alone, or None if it is invalid."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        return None


def _scope_despite(
    data: Mapping[str, Any], invalid: set[str]
) -> tuple[list[InitErrorDetails], list[str]]:
    """The scope checks when other keys are invalid (Config's own checks then never run): each
    valid entry of targets, exclude and approved against a valid scope; a note for each key
    not checked because scope, or the key as a whole, is invalid."""
    fields = Config.model_fields
    scope = None if "scope" in invalid else _validated(fields["scope"].annotation, data["scope"])
    problems: list[InitErrorDetails] = []
    notes: list[str] = []
    for loc in _SCOPE_CHECKS:
        key = str(loc[0])
        entries = data.get(key)
        if entries is None:
            continue
        if scope is None or not isinstance(entries, list):
            bad = "scope" if scope is None else key
            notes.append(f"{key}: not checked against scope, as {bad} is invalid")
            continue
        (element,) = get_args(fields[key].annotation)[:1]
        valid = ((i, _validated(element, e)) for i, e in enumerate(entries))
        problems += _outside_scope(
            scope, loc, _ranges(((i, v) for i, v in valid if v is not None), loc)
        )
    return problems, notes


# pydantic's type errors in the words of TOML
_TYPE_WORDS = {
    "tuple_type": "must be an array",
    "list_type": "must be an array",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "path_type": "must be a path string",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
}


def _toml_repr(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(part: str) -> str:
    # a key TOML would quote (empty, dotted, spaces) is shown quoted, so the path stays readable;
    # escaped to ASCII, so no character of it can break the one-line-per-problem format
    return part if _BARE_KEY.fullmatch(part) else json.dumps(part)


_NOT_KEYS = ("function-", "union[", "lax-", "json-or-python")


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = _key(part)
        # pydantic inserts the validator's name for function-wrapped types, and "[key]" after a
        # table key it refused; neither is a key
        elif part.startswith(_NOT_KEYS) or part == "[key]":
            continue
        else:
            path += f".{_key(part)}"
    return path


def _toml_loc(loc: tuple[int | str, ...]) -> KeyPath:
    """pydantic's error location as a key path of the TOML document (validator names dropped)."""
    return tuple(
        part
        for part in loc
        if isinstance(part, int) or not (part.startswith(_NOT_KEYS) or part == "[key]")
    )


def format_validation_error(
    exc: ValidationError, *, source: str, lines: Mapping[KeyPath, int] | None = None
) -> str:
    """One line per problem: `SOURCE: key.path[i]: line N: what is wrong (got VALUE)`.

    `lines` (tomllines.key_lines of the file's text) gives each problem its line; without it,
    or for a key that is missing from the file, the line is left out.
    """
    return "\n".join(_problem_lines(exc.errors(include_url=False), source, lines))


# the key path a whole-model validator's message starts with: "relay.external_domains[1]: ..."
_LEADING_PATH = re.compile(r"([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+|\[\d+\])*): ")
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+|\[(\d+)\]")


def _problem_lines(
    errors: list[ErrorDetails], source: str, lines: Mapping[KeyPath, int] | None
) -> list[str]:
    def at(loc: KeyPath) -> str:
        return _at(lines, loc)

    out = []
    for err in errors:
        path = _key_path(err["loc"])
        loc = _toml_loc(err["loc"])
        kind = err["type"]
        msg = str(err["msg"])
        if kind in ("scope", "check"):
            ctx = err.get("ctx") or {}
            loc = _toml_loc(ctx.get("loc", err["loc"]))
            out.append(f"{source}: {_key_path(loc)}: {at(loc)}{msg}")
            continue
        if kind == "value_error":
            msg = msg.removeprefix("Value error, ")
            lead = _LEADING_PATH.match(msg)
            if lead is not None and (not path or msg.startswith(path)):
                # errors raised by whole-model validators already carry their key path
                where = tuple(
                    int(m.group(1)) if m.group(1) else m.group()
                    for m in _PATH_PART.finditer(lead.group(1))
                )
                out.append(f"{source}: {lead.group(1)}: {at(where)}{msg[lead.end() :]}")
            else:
                out.append(f"{source}: {path}: {at(loc)}{msg}" if path else f"{source}: {msg}")
            continue
        if kind == "extra_forbidden":
            msg = f"unknown key (got {_shown(err.get('input'))})"
        elif kind in ("tuple_type", "list_type") and isinstance(err.get("input"), Mapping):
            # [alerts.webhook] written where [[alerts.webhook]] was meant
            msg = f"must be an array of tables: write [[{path}]] for each entry (got a table)"
        elif kind in _TYPE_WORDS:
            msg = f"{_TYPE_WORDS[kind]} (got {_toml_repr(err.get('input'))})"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        out.append(f"{source}: {path}: {at(loc)}{msg}" if path else f"{source}: {msg}")
    return out


def _shown(value: object) -> str:
    """A value as an error line quotes it: a table by its kind, anything long clipped."""
    if isinstance(value, Mapping):
        return "a table"
    text = _toml_repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def parse_config(
    data: Mapping[str, Any], *, source: str = "<memory>", text: str | None = None
) -> Config:
    """Validate an already-parsed mapping; raises ConfigError naming every problem at once.

    Each problem is one line naming key and value, and its line when `text`, the TOML the
    mapping was read from, is given. When keys are invalid, the scope checks still run over
    the keys that validated, and a check skipped for an invalid key says so.
    """
    lines = key_lines(text) if text is not None else None
    # `source` is where the Config was read from, never a key of the file
    extra = (
        [f"{source}: source: {_at(lines, ('source',))}unknown key (got {_shown(data['source'])})"]
        if "source" in data
        else []
    )
    base = Path(source).parent if source not in {"<memory>", "(no config)"} else Path.cwd()
    try:
        config = Config.model_validate({**data, "source": source}, context={"base": base})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        out = extra + _problem_lines(errors, source, lines)
        # a key that failed its own validation: the whole-model checks never ran
        invalid = {
            str(e["loc"][0])
            for e in errors
            if e["loc"] and e["type"] != "check" and "loc" not in (e.get("ctx") or {})
        }
        if invalid:
            problems, notes = _scope_despite(data, invalid)
            if problems:
                found = ValidationError.from_exception_data("Config", problems)
                out += _problem_lines(found.errors(include_url=False), source, lines)
            out += (f"{source}: {note}" for note in notes)
        raise ConfigError("\n".join(out)) from None
    if extra:
        raise ConfigError("\n".join(extra))
    return config


def _at(lines: Mapping[KeyPath, int] | None, loc: KeyPath) -> str:
    """`line N: ` for the key at `loc` (its table's line for a missing key), or nothing."""
    line = line_of(lines, loc) if lines is not None else None
    return f"line {line}: " if line is not None else ""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file; every problem becomes a ConfigError naming the file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise ConfigError(
            f"{source}: TOML syntax error: arrays or tables nested too deeply"
        ) from None
    return parse_config(data, source=source, text=text)


_SECRET_KEYS = {"webhook": ("token", "hmac_key"), "email": ("password",)}


def inline_secrets(data: Mapping[str, Any]) -> list[str]:
    """The key paths of secrets written into the config itself (not `{ env }` or `{ file }`)."""
    alerts = data.get("alerts")
    found: list[str] = []
    if not isinstance(alerts, Mapping):
        return found
    for kind, keys in _SECRET_KEYS.items():
        hooks = alerts.get(kind)
        for i, hook in enumerate(hooks if isinstance(hooks, list) else []):
            if isinstance(hook, Mapping):
                found += [f"alerts.{kind}[{i}].{k}" for k in keys if isinstance(hook.get(k), str)]
    return found


def file_warnings(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Warnings about the config file itself: inline secrets that group or others may read."""
    try:
        mode = os.stat(path).st_mode
        secrets = inline_secrets(tomllib.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):  # load_config reports an unreadable or broken file
        return ()
    if not secrets or not mode & 0o077:
        return ()
    return (
        f"mode {mode & 0o777:04o} lets {'group and others' if mode & 0o007 else 'its group'} "
        f"read the secret{'s' if len(secrets) > 1 else ''} written in it "
        f"({', '.join(secrets)}): chmod 600 the file, or give each secret as "
        '{ env = "NAME" } or { file = "/path" }',
    )


def config_fingerprint(config: Config) -> str:
    """A short stable hash of the effective configuration (recorded with every sweep)."""
    # `report` only says how the daemon serves its page: a sweep interrupted before a change
    # there (or before the upgrade that added the section) still resumes
    # nor `alerts`: where findings are sent says nothing about which addresses a sweep covers
    # nor targets_from while it is unset: a config without lists hashes as before the key existed
    # (the lists' contents join the fingerprint in sources.sweep_fingerprint)
    # nor who runs an address or which services are approved (issue 29): both only label what
    # a sweep finds; `approved` dumps as it did with no entries, so a config without approvals
    # hashes as before
    exclude = {"report", "alerts", "owners", "owners_file", "owners_contact_domains"}
    if not config.targets_from and config.targets_out_of_scope == "skip":
        exclude |= {"targets_from", "targets_out_of_scope"}
    unlabelled = config.model_copy(update={"approved": ()})
    return hashlib.sha256(unlabelled.model_dump_json(exclude=exclude).encode()).hexdigest()[:16]
