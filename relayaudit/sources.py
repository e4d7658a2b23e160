"""Target sources (targets_from, --targets-file): lists, MX hosts, zone files, zone transfers.

All read into one compact list; each address from DNS keeps the name and record it came from.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from relayaudit.addresses import AddressSet, AddressSetBuilder
from relayaudit.config import Config, TargetSource, config_fingerprint
from relayaudit.errors import ConfigError, ExitCode, RelayAuditError
from relayaudit.scope import LARGE_SCOPE, UNUSABLE, Address, Network, normal_address, normal_network
from relayaudit.targets import TargetSpace
from relayaudit.verdict import TargetOrigin

__all__ = [
    "Loaded",
    "SourceCache",
    "SourceError",
    "TargetList",
    "family_gaps",
    "load_source",
    "load_targets",
    "read_list",
    "sweep_fingerprint",
]

#: Problems (bad or out-of-scope lines, records) kept per source, one line each; the rest counted.
PROBLEMS_KEPT = 20
#: Origins kept per address (a name may appear under many MX domains or zone names).
ORIGINS_PER_ADDRESS = 8


class SourceError(RelayAuditError, OSError):
    """A target source could not be read: a list file missing, a DNS server that failed.

    The message names the source (`targets_from[1] (mx campus.example)`) and the reason. A
    file that cannot be read is the configuration's problem (exit 78), a DNS failure may pass
    (exit 75); the daemon keeps the source's last good list either way.
    """

    exit_code = ExitCode.TEMPFAIL


@dataclass(frozen=True, slots=True)
class Loaded:
    """One source as read: its addresses (in scope, normal), and what was left out and why."""

    label: str  # "file /etc/relayaudit/ipam.txt", "mx campus.example", ...
    addresses: AddressSet
    networks: tuple[Network, ...]  # the CIDR lines of a list (ranges, never expanded)
    origins: Mapping[str, tuple[TargetOrigin, ...]]  # address text -> names and records
    read: int  # entries read: lines with an address or network, or A/AAAA records
    out_of_scope: int
    bad: int  # lines that hold no usable address
    problems: tuple[str, ...]  # the first PROBLEMS_KEPT of them, one line each

    @property
    def count(self) -> int:
        """Addresses this source gives (its networks' addresses included), before exclusions."""
        return len(self.addresses) + sum(n.num_addresses for n in self.networks)

    @property
    def digest(self) -> str:
        """A hash of what the source gives: the same addresses, the same digest."""
        h = hashlib.sha256(self.addresses.digest().encode())
        for net in sorted(self.networks, key=lambda n: (n.version, n)):
            h.update(f"|{net}".encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TargetList:
    """Every source of a sweep, merged: the list TargetSpace walks with the ranges."""

    sources: tuple[Loaded, ...] = ()
    addresses: AddressSet = field(default_factory=AddressSet)
    networks: tuple[Network, ...] = ()
    origins: Mapping[str, tuple[TargetOrigin, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, sources: Sequence[Loaded]) -> TargetList:
        origins: dict[str, tuple[TargetOrigin, ...]] = {}
        for one in sources:
            for address, found in one.origins.items():
                merged = tuple(dict.fromkeys((*origins.get(address, ()), *found)))
                origins[address] = merged[:ORIGINS_PER_ADDRESS]
        return cls(
            sources=tuple(sources),
            addresses=AddressSet.union(s.addresses for s in sources)
            if len(sources) != 1
            else sources[0].addresses,
            networks=tuple(dict.fromkeys(n for s in sources for n in s.networks)),
            origins=origins,
        )

    @property
    def digest(self) -> str:
        """The hash of every source's contents: what the resume fingerprint and each shard log."""
        text = "|".join(f"{s.label}={s.digest}" for s in self.sources)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def space(self, config: Config) -> TargetSpace:
        """The sweep's target space: the config's ranges, the lists' networks and addresses."""
        return TargetSpace(
            [*config.targets, *self.networks],
            config.exclude,
            seed=config.seed,
            listed=self.addresses if len(self.addresses) else None,
        )


def sweep_fingerprint(config: Config, targets: TargetList | None) -> str:
    """config_fingerprint, and the contents of every target list: a changed list (another
    order of addresses) starts a new sweep instead of resuming into the old one's positions."""
    base = config_fingerprint(config)
    if targets is None or not targets.sources:
        return base
    return hashlib.sha256(f"{base}:{targets.digest}".encode()).hexdigest()[:16]


# -- scope -----------------------------------------------------------------------------------


def _intervals(nets: Iterable[Network], version: int) -> tuple[list[int], list[int]]:
    spans = sorted(
        (int(n.network_address), int(n.broadcast_address) + 1) for n in nets if n.version == version
    )
    los: list[int] = []
    his: list[int] = []
    for lo, hi in spans:
        if his and lo <= his[-1]:
            his[-1] = max(his[-1], hi)
        else:
            los.append(lo)
            his.append(hi)
    return los, his


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")


class _Scope:
    """The scope as sorted intervals: a membership test in a bisect, for a million lines."""

    def __init__(self, config: Config) -> None:
        self.text = ", ".join(str(s) for s in config.scope)
        self._spans = {v: _intervals(config.scope, v) for v in (4, 6)}
        # addresses the fast path leaves to scope.normal_address: space no host can hold, and
        # IPv4 written in IPv6 (::ffff:0:0/96, ::/96), which is read as the IPv4 it reaches
        special = [n for n, _ in UNUSABLE] + [_MAPPED, _COMPAT]
        self._special = {v: _intervals(special, v) for v in (4, 6)}

    @staticmethod
    def _within(spans: tuple[list[int], list[int]], lo: int, hi: int) -> bool:
        los, his = spans
        i = bisect_right(los, lo) - 1
        return i >= 0 and hi <= his[i]

    def holds(self, version: int, lo: int, hi: int | None = None) -> bool:
        return self._within(self._spans[version], lo, lo + 1 if hi is None else hi)

    def special(self, version: int, value: int) -> bool:
        return self._within(self._special[version], value, value + 1)


# -- lists -----------------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.kept: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.kept) < PROBLEMS_KEPT:
            self.kept.append(text)


def _parse_entry(text: str) -> Address | Network:
    """An address or a network of a list line, normalised (scope.normal_*); ValueError if not."""
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                raise ValueError("has host bits set") from None
            raise ValueError("is not an IP address or network") from None
        normal = normal_network(net)  # ConfigError (a ValueError) names the rule
        return normal.network_address if normal.num_addresses == 1 else normal
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IP address or network") from None
    return normal_address(address)


def read_list(lines: Iterable[bytes], *, where: str, label: str, config: Config) -> Loaded:
    """A list: one address or CIDR network per line, `#` comments and blank lines allowed.

    Every entry passes the scope guard: a line that is no usable address is reported as
    `WHERE:LINE: 'TEXT' why` and skipped; one outside scope too, or, with
    `targets_out_of_scope = "fail"`, it refuses the whole list (ConfigError).
    """
    scope = _Scope(config)
    builder = AddressSetBuilder()
    networks: list[Network] = []
    problems = _Problems()
    bad = out = read = 0
    fail = config.targets_out_of_scope == "fail"
    inet_pton, af_inet, af_inet6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad += 1
            problems.add(f"{where}:{number}: not UTF-8 text (byte {exc.start})")
            continue
        if "#" in text:
            text = text.split("#", 1)[0]
        text = text.strip()
        if not text:
            continue
        read += 1
        entry: Address | Network
        # the common case first, without an object per line: a plain IPv4 or IPv6 address
        version, value = 4, -1
        try:
            value = int.from_bytes(inet_pton(af_inet, text), "big")
        except OSError:
            if ":" in text and "%" not in text and "/" not in text:
                try:
                    version, value = 6, int.from_bytes(inet_pton(af_inet6, text), "big")
                except OSError:
                    value = -1
        if value >= 0 and not scope.special(version, value):
            if scope.holds(version, value):
                builder.add(version, value)
                continue
            entry = ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value)
        else:
            try:
                entry = _parse_entry(text)
            except ValueError as exc:
                bad += 1
                problems.add(f"{where}:{number}: {text!r} {_reason(exc, text)}")
                continue
        if isinstance(entry, ipaddress.IPv4Network | ipaddress.IPv6Network):
            lo, hi = int(entry.network_address), int(entry.broadcast_address) + 1
            if entry.num_addresses > LARGE_SCOPE and config.allow_large_scope is None:
                bad += 1
                problems.add(
                    f"{where}:{number}: '{text}' holds {entry.num_addresses:,} addresses, more "
                    f"than {LARGE_SCOPE:,} (2**24) without allow_large_scope"
                )
                continue
            inside = scope.holds(entry.version, lo, hi)
        else:
            inside = scope.holds(entry.version, int(entry))
        if not inside:
            message = f"{where}:{number}: '{text}' is outside scope ({scope.text})"
            if fail:
                raise ConfigError(message + '; targets_out_of_scope = "fail" refuses the list')
            out += 1
            problems.add(message)
            continue
        if isinstance(entry, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(entry)
        else:
            builder.add(entry.version, int(entry))
    if problems.count > len(problems.kept):
        problems.kept.append(f"{where}: {problems.count - len(problems.kept)} more such lines")
    return Loaded(
        label=label,
        addresses=builder.build(),
        networks=tuple(dict.fromkeys(networks)),
        origins={},
        read=read,
        out_of_scope=out,
        bad=bad,
        problems=tuple(problems.kept),
    )


def _reason(exc: ValueError, text: str) -> str:
    reason = str(exc)
    # scope's messages start with the value itself ("'fe80::1%eth0' has a zone id ...")
    quoted = f"'{text}' "
    return reason[len(quoted) :] if reason.startswith(quoted) else reason


def _read_file(entry: TargetSource, where: str, config: Config) -> Loaded:
    assert entry.file is not None
    try:
        with entry.file.open("rb") as stream:
            return read_list(stream, where=str(entry.file), label=entry.label, config=config)
    except OSError as exc:
        raise SourceError(
            f"{where}: cannot read {str(entry.file)!r}: {exc.strerror or exc}",
            exit_code=ExitCode.CONFIG,
        ) from None


def read_stream(stream: IO[bytes], *, config: Config, name: str = "<stdin>") -> Loaded:
    """`sweep --targets-file -`: a list from standard input."""
    return read_list(stream, where=name, label=f"file {name}", config=config)


# -- DNS -------------------------------------------------------------------------------------

Records = list[tuple[str, str, str]]  # (name, "A" | "AAAA", address text)


def _from_records(label: str, records: Records, config: Config, problems: _Problems) -> Loaded:
    """The addresses of A and AAAA records, each remembering its name and record."""
    scope = _Scope(config)
    builder = AddressSetBuilder()
    origins: dict[str, tuple[TargetOrigin, ...]] = {}
    out = bad = 0
    for name, rtype, text in records:
        try:
            address = normal_address(ipaddress.ip_address(text))
        except ValueError as exc:
            bad += 1
            problems.add(f"{label}: {name} {rtype} {text} {_reason(exc, text)}")
            continue
        if not scope.holds(address.version, int(address)):
            out += 1
            problems.add(f"{label}: {name} {rtype} {address} is outside scope ({scope.text})")
            continue
        builder.add(address.version, int(address))
        key = str(address)
        origin = TargetOrigin(source=label, name=name, record=rtype)
        known = origins.get(key, ())
        if origin not in known and len(known) < ORIGINS_PER_ADDRESS:
            origins[key] = (*known, origin)
    if problems.count > len(problems.kept):
        problems.kept.append(f"{label}: {problems.count - len(problems.kept)} more such records")
    return Loaded(
        label=label,
        addresses=builder.build(),
        networks=(),
        origins=origins,
        read=len(records),
        out_of_scope=out,
        bad=bad,
        problems=tuple(problems.kept),
    )


def _dns_failure(where: str, exc: Exception, server: str) -> SourceError:
    """One DNS exception as one line (dnspython's classes, translated here and only here)."""
    import dns.exception  # noqa: PLC0415 - dnspython loads only where a DNS source is read
    import dns.resolver  # noqa: PLC0415
    import dns.xfr  # noqa: PLC0415

    if isinstance(exc, dns.resolver.NXDOMAIN):
        reason = f"{exc.kwargs['qnames'][0].to_text(omit_final_dot=True)} does not exist (NXDOMAIN)"
    elif isinstance(exc, dns.resolver.NoAnswer):
        reason = f"no such record ({exc})"
    elif isinstance(exc, dns.exception.Timeout | TimeoutError):
        reason = f"no answer from {server} in time"
    elif isinstance(exc, dns.xfr.TransferError):
        reason = f"{server} refused the zone transfer ({exc})"
    elif isinstance(exc, dns.resolver.NoNameservers):
        reason = f"no name server answered: {exc}"
    elif isinstance(exc, EOFError | ConnectionError):
        reason = f"{server} closed the connection before the transfer was complete"
    elif isinstance(exc, OSError):
        reason = f"{server}: {exc.strerror or exc}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return SourceError(f"{where}: {reason}")


def _server(entry: TargetSource) -> str:
    if entry.server is None:
        return "the system's resolvers"
    host = f"[{entry.server}]" if entry.server.version == 6 else str(entry.server)
    return f"{host}:{entry.port}"


def _mx(entry: TargetSource, where: str, config: Config) -> Loaded:
    import dns.exception  # noqa: PLC0415
    import dns.rdatatype  # noqa: PLC0415
    import dns.resolver  # noqa: PLC0415

    assert entry.mx is not None
    if entry.server is None:
        resolver = dns.resolver.Resolver()  # /etc/resolv.conf (deploy render allows those)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [str(entry.server)]
        resolver.port = entry.port
    resolver.timeout = resolver.lifetime = entry.timeout
    problems = _Problems()
    records: Records = []
    try:
        answer = resolver.resolve(entry.mx, dns.rdatatype.MX)
        hosts = [
            r.exchange for r in sorted(answer, key=lambda r: r.preference) if str(r.exchange) != "."
        ]
        if not hosts:
            problems.add(f"{where}: {entry.mx} has a null MX (it accepts no mail)")
        for host in hosts:
            name = host.to_text(omit_final_dot=True).lower()
            found = 0
            for rtype in ("A", "AAAA"):
                try:
                    rrs = resolver.resolve(host, rtype, raise_on_no_answer=False)
                except dns.resolver.NXDOMAIN:
                    break
                for r in rrs:
                    records.append((name, rtype, r.address))
                    found += 1
            if not found:
                problems.add(f"{where}: the MX host {name} has no A or AAAA record")
    except dns.exception.DNSException as exc:
        raise _dns_failure(where, exc, _server(entry)) from None
    return _from_records(entry.label, records, config, problems)


def _zone_records(zone: object) -> Records:
    import dns.zone  # noqa: PLC0415

    assert isinstance(zone, dns.zone.Zone)
    records: Records = []
    for rtype in ("A", "AAAA"):
        for name, _, rdata in zone.iterate_rdatas(rtype):
            address: str = rdata.address  # type: ignore[attr-defined]  # A and AAAA rdata have it
            records.append((name.to_text(omit_final_dot=True).lower(), rtype, address))
    records.sort()
    return records


def _zone_file(entry: TargetSource, where: str, config: Config) -> Loaded:
    import dns.exception  # noqa: PLC0415
    import dns.zone  # noqa: PLC0415

    assert entry.zone_file is not None
    path = str(entry.zone_file)
    try:
        zone = dns.zone.from_file(path, origin=entry.origin, relativize=False)
    except OSError as exc:
        raise SourceError(
            f"{where}: cannot read {path!r}: {exc.strerror or exc}", exit_code=ExitCode.CONFIG
        ) from None
    except dns.zone.UnknownOrigin:
        raise SourceError(
            f"{where}: {path!r} has no $ORIGIN: give the zone's name as origin = \"...\"",
            exit_code=ExitCode.CONFIG,
        ) from None
    except dns.exception.DNSException as exc:
        raise SourceError(
            f"{where}: {_zone_error(path, entry.origin, str(exc))}", exit_code=ExitCode.CONFIG
        ) from None
    return _from_records(entry.label, _zone_records(zone), config, _Problems())


def _zone_error(path: str, origin: str | None, message: str) -> str:
    """dnspython's syntax error as `FILE:LINE: 'TEXT': reason`, with the right line.

    dnspython names the line where its tokenizer stands, which is the next one when the bad
    record ends its line: parsing the lines before that one tells which of the two it is.
    """
    import dns.exception  # noqa: PLC0415
    import dns.zone  # noqa: PLC0415

    head, sep, reason = message.partition(": ")
    number = head.rpartition(":")[2]
    if not sep or not head.startswith(path) or not number.isdigit():
        return f"{path!r}: {message}"
    line = int(number)
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return message
    if line >= 2:
        try:
            dns.zone.from_text(
                "\n".join(lines[: line - 1]) + "\n",
                origin=origin,
                relativize=False,
                check_origin=False,
            )
        except dns.exception.DNSException:
            line -= 1  # the lines before it already fail: the bad record is the line before
    text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return f"{path}:{line}: {text!r}: {reason}"


def _axfr(entry: TargetSource, where: str, config: Config) -> Loaded:
    import dns.exception  # noqa: PLC0415
    import dns.query  # noqa: PLC0415
    import dns.zone  # noqa: PLC0415

    assert entry.axfr is not None and entry.server is not None
    try:
        zone = dns.zone.from_xfr(
            dns.query.xfr(
                str(entry.server),
                entry.axfr,
                port=entry.port,
                timeout=entry.timeout,
                lifetime=entry.timeout,
                relativize=False,
            ),
            relativize=False,
        )
    except (dns.exception.DNSException, EOFError, OSError) as exc:
        raise _dns_failure(where, exc, _server(entry)) from None
    return _from_records(entry.label, _zone_records(zone), config, _Problems())


_READERS: dict[str, Callable[[TargetSource, str, Config], Loaded]] = {
    "file": _read_file,
    "mx": _mx,
    "zone_file": _zone_file,
    "axfr": _axfr,
}


def load_source(entry: TargetSource, config: Config, *, index: int | None = None) -> Loaded:
    """Read one source; SourceError names it (and its place in targets_from) and the reason."""
    where = (
        f"{config.source}: targets_from[{index}] ({entry.label})"
        if index is not None
        else f"--targets-file {entry.file}"
    )
    return _READERS[entry.kind](entry, where, config)


def load_targets(
    config: Config, *, files: Sequence[str] = (), stdin: IO[bytes] | None = None
) -> TargetList:
    """Every source of the config, then `--targets-file` FILEs (`-`: `stdin`); the first one
    that cannot be read raises (a one-off sweep has no last good list to fall back on)."""
    loaded = [load_source(e, config, index=i) for i, e in enumerate(config.targets_from)]
    for name in files:
        if name == "-":
            if stdin is None:
                raise ConfigError("--targets-file -: no standard input to read")
            loaded.append(read_stream(stdin, config=config))
            continue
        entry = TargetSource(file=Path(name))
        loaded.append(load_source(entry, config))
    return TargetList.of(loaded)


class SourceCache:
    """The daemon's sources: read afresh at each sweep, the last good copy kept per source.

    A source that cannot be read (a file missing or unreadable, a DNS server down, a list
    refused by targets_out_of_scope = "fail") is replaced by its last good copy, and
    `on_failure(label, error, kept)` is told (kept: None when there is none yet: the source
    then adds nothing to this sweep). A sweep never loses a list because of one bad read.
    """

    def __init__(self) -> None:
        self._good: dict[str, Loaded] = {}
        self.stale: set[str] = set()  # sources whose last read failed

    def load(
        self, config: Config, *, on_failure: Callable[[str, str, Loaded | None], None]
    ) -> TargetList:
        loaded: list[Loaded] = []
        for i, entry in enumerate(config.targets_from):
            try:
                one = load_source(entry, config, index=i)
            except (SourceError, ConfigError) as exc:
                self.stale.add(entry.label)
                kept = self._good.get(entry.label)
                on_failure(entry.label, str(exc), kept)
                if kept is None:
                    continue
                one = kept
            else:
                self.stale.discard(entry.label)
                self._good[entry.label] = one
            loaded.append(one)
        return TargetList.of(loaded)


def family_gaps(config: Config, space: TargetSpace, targets: TargetList | None) -> list[str]:
    """One line per IP family the targets hold but source_address has no address for."""
    if not config.source_address:
        return []
    held = {n.version for n in config.targets}
    if targets is not None:
        held |= {n.version for n in targets.networks}
        held |= {v for v in (4, 6) if targets.addresses.count(v)}
    sources = ", ".join(str(a) for a in config.source_address)
    return [
        f"source_address ({sources}) has no IPv{v} address, so the IPv{v} targets cannot be "
        f"probed: each ends as an error saying so; add an IPv{v} source address"
        for v in sorted(held)
        if config.source_for(v) is None and len(space)
    ]
