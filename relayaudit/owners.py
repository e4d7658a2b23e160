"""Who runs each address: the owner table of `[[owners]]` and `owners_file`, by longest prefix.

Rules (docs/owners.md): IPv4 written in IPv6 is read as IPv4 first; the longest prefix that
holds an address names its owner; on identical ranges an `[[owners]]` entry beats the file, and
within the file the first row wins (a warning names both lines); a range with host bits set is
read as its network (a warning); a range outside the scope is kept (an IPAM export covers more
than the scanner sweeps). One name has one contact and one queue. Every contact lies under
`Config.contact_domains`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from relayaudit.config import Config, mailbox
from relayaudit.errors import ConfigError
from relayaudit.scope import Address, Network, normal_address, normal_network
from relayaudit.verdict import Owner

__all__ = [
    "OwnerCache",
    "OwnerRow",
    "OwnerTable",
    "ServiceOwner",
    "load_owners",
    "read_owners_file",
]

_COLUMNS = ("range", "name", "contact", "queue")
_REQUIRED = ("range", "name", "contact")
_MAX_TEXT = 100
# more problems than this and the rest are counted, not listed: a wrong file is one mistake
_MAX_LISTED = 20


@dataclass(frozen=True, slots=True)
class OwnerRow:
    """One range and its owner, with where it was written: `owners[0]` or `FILE:LINE`."""

    network: Network
    owner: Owner
    where: str


@dataclass(frozen=True, slots=True)
class ServiceOwner:
    """An approved service's own owner (`[[approved]]` `owner`): over the range's owner."""

    network: Network
    port: int | None
    owner: Owner


@dataclass(frozen=True)
class OwnerTable:
    """Ranges to owners, indexed by prefix length per family (a lookup costs at most 33 or 129
    dictionary probes, never a scan of the rows)."""

    rows: tuple[OwnerRow, ...] = ()
    warnings: tuple[str, ...] = ()
    # approved services with an owner of their own: few, so a scan (before the index)
    services: tuple[ServiceOwner, ...] = ()
    _index: dict[int, dict[int, dict[int, Owner]]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _lengths: dict[int, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for row in self.rows:  # rows are already unique per network (build() decides)
            net = row.network
            by_length = self._index.setdefault(net.version, {})
            by_length.setdefault(net.prefixlen, {})[int(net.network_address)] = row.owner
        for version, by_length in self._index.items():
            self._lengths[version] = tuple(sorted(by_length, reverse=True))

    def lookup(self, address: Address | str, port: int | None = None) -> Owner | None:
        """The owner of the service at address:port (an approval's `owner`), else of the
        longest range holding `address` (IPv4 in IPv6 read as IPv4)."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        try:
            ip = normal_address(ip)
        except ConfigError:  # a zone id or unusable space: nobody owns it
            return None
        if port is not None:
            for service in self.services:
                if ip in service.network and service.port in (None, port):
                    return service.owner
        by_length = self._index.get(ip.version)
        if not by_length:
            return None
        bits = ip.max_prefixlen
        value = int(ip)
        for length in self._lengths[ip.version]:
            key = value >> (bits - length) << (bits - length) if length else 0
            owner = by_length[length].get(key)
            if owner is not None:
                return owner
        return None

    @property
    def digest(self) -> str:
        """A hash of what the table says (ranges and owners, not where each was written)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def owners(self) -> tuple[Owner, ...]:
        """Each owner once, by name."""
        seen = {row.owner.name: row.owner for row in self.rows}
        return tuple(seen[name] for name in sorted(seen))

    def to_json(self) -> str:
        """The table as the state store keeps it: `[[range, name, contact, queue], ...]`, then
        an approved service's owner as `[range, name, contact, queue, port or "any"]`."""
        rows: list[list[str | int | None]] = sorted(
            [str(r.network), r.owner.name, r.owner.contact, r.owner.queue] for r in self.rows
        )
        rows += [
            [str(s.network), s.owner.name, s.owner.contact, s.owner.queue, s.port or "any"]
            for s in self.services
        ]
        return json.dumps(rows, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, where: str) -> OwnerTable:
        """The table `to_json` wrote (the daemon's last good table, from the state store)."""
        rows, services = [], []
        for net, name, contact, queue, *port in json.loads(text):
            owner = Owner(name=name, contact=contact, queue=queue)
            if port:
                number = None if port[0] == "any" else int(port[0])
                services.append(ServiceOwner(ipaddress.ip_network(net), number, owner))
            else:
                rows.append(OwnerRow(ipaddress.ip_network(net), owner, where))
        return cls(tuple(rows), services=tuple(services))


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.lines) < _MAX_LISTED:
            self.lines.append(text)

    def raise_any(self) -> None:
        if self.count:
            more = self.count - len(self.lines)
            tail = [f"... and {more} more problems"] if more else []
            raise ConfigError("\n".join([*self.lines, *tail]))


def _text(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > _MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} {value!r} is not one line of at most {_MAX_TEXT} characters")
    return value


def _range(text: str, warn: Callable[[str], None]) -> Network:
    text = text.strip()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"range {text!r} is not an IP network or address") from None
    if str(net) != text and net != _strict(text):
        warn(f"range {text!r} has host bits set; read as '{net}'")
    try:
        return normal_network(net)
    except ConfigError as exc:
        raise ValueError(f"range {text!r}: {exc}") from None


def _warn_at(warnings: list[str], where: str, text: str) -> None:
    warnings.append(f"{where}: {text}")


def _strict(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None


def _contact(text: str, domains: Sequence[str]) -> str:
    try:
        address = mailbox(text)
    except ValueError:
        raise ValueError(f"contact {text.strip()!r} is not a plain address") from None
    domain = address.rpartition("@")[2]
    if not any(domain == d or domain.endswith("." + d) for d in domains):
        raise ValueError(
            f"contact {address!r} is not under owners_contact_domains ({', '.join(domains)}): "
            "an owner's mail stays on campus"
        )
    return address


def read_owners_file(path: Path, *, domains: Sequence[str]) -> tuple[list[OwnerRow], list[str]]:
    """The rows of an owners CSV (`range,name,contact,queue`; UTF-8, a BOM tolerated, `#`
    comments) and its warnings; ConfigError naming file, line and value for any bad row."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: owners_file cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: owners_file is not UTF-8 text (byte {exc.start})") from None
    problems = _Problems()
    warnings: list[str] = []
    rows: list[OwnerRow] = []
    header: list[str] | None = None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            cells = next(csv.reader(io.StringIO(line)))
        except (csv.Error, StopIteration):
            problems.add(f"{path}:{number}: not a CSV row (got {line!r})")
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            unknown = [c for c in header if c not in _COLUMNS]
            missing = [c for c in _REQUIRED if c not in header]
            if unknown or missing or len(set(header)) != len(header):
                raise ConfigError(
                    f"{path}:{number}: the header must be range,name,contact,queue (queue "
                    f"optional) (got {line!r})"
                )
            continue
        if len(cells) != len(header):
            problems.add(
                f"{path}:{number}: {len(cells)} columns where the header has {len(header)} "
                f"(got {line!r})"
            )
            continue
        cell = dict(zip(header, cells, strict=True))
        where = f"{path}:{number}"
        try:
            net = _range(cell["range"], partial(_warn_at, warnings, where))
            queue = cell.get("queue", "").strip()
            owner = Owner(
                name=_text(cell["name"], "name"),
                contact=_contact(cell["contact"], domains),
                queue=_text(queue, "queue") if queue else None,
            )
        except ValueError as exc:
            problems.add(f"{where}: {exc}")
            continue
        rows.append(OwnerRow(net, owner, where))
    if header is None:
        raise ConfigError(f"{path}: owners_file has no header line (range,name,contact,queue)")
    problems.raise_any()
    return rows, warnings


def _config_rows(config: Config) -> list[OwnerRow]:
    # a range with host bits set here is among Config.warnings already
    rows = []
    for i, entry in enumerate(config.owners):
        owner = Owner(name=entry.name, contact=entry.contact, queue=entry.queue)
        for j, text in enumerate(entry.ranges):
            where = f"owners[{i}].ranges[{j}]"
            try:
                net = _range(text, lambda _: None)
            except ValueError as exc:
                raise ConfigError(f"{config.source}: {where}: {exc}") from None
            rows.append(OwnerRow(net, owner, where))
    return rows


def build(
    config_rows: Iterable[OwnerRow], file_rows: Iterable[OwnerRow], warnings: list[str]
) -> OwnerTable:
    """One row per network: a config entry beats the file, the file's first row beats later
    ones (warned); one name, one contact and queue (else ConfigError naming both rows)."""
    chosen: dict[Network, OwnerRow] = {}
    for row in config_rows:
        chosen.setdefault(row.network, row)
    for row in file_rows:
        kept = chosen.get(row.network)
        if kept is None:
            chosen[row.network] = row
        elif kept.owner != row.owner or not kept.where.startswith("owners["):
            warnings.append(
                f"{row.where}: range '{row.network}' is also given by {kept.where}, "
                f"whose owner {kept.owner.name!r} is kept"
            )
    problems = _Problems()
    named: dict[str, OwnerRow] = {}
    for row in sorted(chosen.values(), key=lambda r: _order(r.where)):
        first = named.setdefault(row.owner.name, row)
        for key in ("contact", "queue"):
            mine, theirs = getattr(row.owner, key), getattr(first.owner, key)
            if mine != theirs:
                problems.add(
                    f"{row.where}: owner {row.owner.name!r} has {key} {mine!r}, but "
                    f"{first.where} gives it {theirs!r}; one owner has one {key}"
                )
    problems.raise_any()
    return OwnerTable(tuple(chosen.values()), tuple(warnings))


def _order(where: str) -> tuple[int, str, int]:
    """Config entries first, then file rows by line."""
    if where.startswith("owners["):
        return (0, where, 0)
    path, _, line = where.rpartition(":")
    return (1, path, int(line) if line.isdigit() else 0)


def load_owners(config: Config) -> OwnerTable:
    """The owner table as the config and its owners_file say now; ConfigError for an
    unreadable file or a bad row (`config check`, `sweep`, `check`, `report`: exit 78)."""
    warnings: list[str] = []
    mine = _config_rows(config)
    theirs: list[OwnerRow] = []
    if config.owners_file is not None:
        theirs, file_warnings = read_owners_file(config.owners_file, domains=config.contact_domains)
        warnings += file_warnings
    table = build(mine, theirs, warnings)
    return replace(table, services=_service_owners(config, table))


def _service_owners(config: Config, table: OwnerTable) -> tuple[ServiceOwner, ...]:
    """`[[approved]]` entries that name their owner, by name in the table (else ConfigError)."""
    by_name = {owner.name: owner for owner in table.owners}
    services = []
    for i, entry in enumerate(config.approved):
        if entry.owner is None:
            continue
        owner = by_name.get(entry.owner)
        if owner is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise ConfigError(
                f"{config.source}: approved[{i}].owner: {entry.owner!r} is no owner of "
                f"[[owners]] or owners_file (owners: {known})"
            )
        services.append(ServiceOwner(entry.address, entry.port, owner))
    return tuple(services)


class OwnerCache:
    """The daemon's owner table: read afresh at each sweep; when a read fails, the last good
    table is kept (and its JSON is what the state store holds, so a restart keeps it too)."""

    def __init__(self, last_good: OwnerTable | None = None) -> None:
        self.good = last_good
        self.stale = False  # the last read failed

    def load(
        self, config: Config, *, on_failure: Callable[[str, OwnerTable | None], None]
    ) -> OwnerTable | None:
        """The table to stamp findings with; None only when no read ever succeeded."""
        try:
            table = load_owners(config)
        except ConfigError as exc:
            self.stale = True
            on_failure(str(exc), self.good)
            return self.good
        self.stale = False
        self.good = table
        return table
