"""`relayaudit deploy render`: the scope as the kernel enforces it, a systemd drop-in or a NetworkPolicy.

Both are rendered from the same validated config, so the allow list is the scope relayaudit
checks, plus what the daemon must also talk to: loopback, its DNS resolvers, the DNS servers its
target sources ask (targets_from), its alert hooks' hosts, and the hosts that connect to its
listeners (`deploy.allow_from`). Names are resolved
here, at render time (or taken from `deploy.hosts`), and listed in comments beside their
addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from relayaudit.config import Config
from relayaudit.errors import ConfigError
from relayaudit.scope import Address, Network, normal_address

__all__ = [
    "RESOLV_CONF",
    "Target",
    "Upstream",
    "allow_list",
    "nameservers",
    "render",
    "render_kubernetes",
    "render_systemd",
    "resolve",
    "source_servers",
    "upstreams",
]

Target = Literal["systemd", "kubernetes"]
Resolver = Callable[[str], Sequence[Address]]

RESOLV_CONF = Path("/etc/resolv.conf")
#: Loopback as the daemon uses it: local services (a resolver stub, a local scraper). The rest of
#: 127.0.0.0/8 is allowed only where the scope holds it (the lab).
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))

_HEADER = """\
Rendered by `relayaudit deploy render --config FILE --for {target}` from the config's scope,
alert hooks and [deploy] section; do not edit: render again when they change."""


@dataclass(frozen=True)
class Upstream:
    """A host the daemon connects to besides the scope: an alert hook's, or one in deploy.hosts."""

    where: str  # the config key that names it: alerts.webhook[0], deploy.hosts
    host: str  # a name (lower case, no final dot) or an address
    port: int | None  # None: any (deploy.hosts entries, for [[alerts.command]] programs)
    addresses: tuple[Address, ...]
    how: str  # "deploy.hosts", "resolved at render time", "an address"


def resolve(name: str) -> list[Address]:
    """The addresses of `name` here and now (the system resolver), normalised."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"{name!r} does not resolve here: {exc.strerror}") from None
    return list(dict.fromkeys(normal_address(ipaddress.ip_address(i[4][0])) for i in infos))


def nameservers(text: str) -> list[Address]:
    """The `nameserver` addresses of a resolv.conf text (zone ids and junk left out)."""
    found: list[Address] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(normal_address(ipaddress.ip_address(words[1])))
            except (ValueError, ConfigError):
                continue
    return list(dict.fromkeys(found))


def _hook_endpoints(config: Config) -> list[tuple[str, str, int]]:
    """(config key, host, port) of every webhook and email hook."""
    found = []
    for i, hook in enumerate(config.alerts.webhook):
        url = urlsplit(hook.url)
        port = url.port or (443 if url.scheme == "https" else 80)
        found.append((f"alerts.webhook[{i}].url", url.hostname or "", port))
    for i, mail in enumerate(config.alerts.email):
        found.append((f"alerts.email[{i}].host", mail.host, mail.port))
    return found


def upstreams(config: Config, *, resolver: Resolver = resolve) -> list[Upstream]:
    """The alert hooks' hosts, then the other deploy.hosts entries, each with its addresses."""
    pinned = config.deploy.hosts
    found: list[Upstream] = []
    used: set[str] = set()
    for where, host, port in _hook_endpoints(config):
        name = host.lower().rstrip(".")
        try:
            literal = normal_address(ipaddress.ip_address(name))
        except ValueError:
            literal = None
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {where}: {exc}") from None
        if literal is not None:
            found.append(Upstream(where, name, port, (literal,), "an address"))
        elif name in pinned:
            used.add(name)
            found.append(Upstream(where, name, port, pinned[name], "deploy.hosts"))
        else:
            try:
                answers = resolver(name)
            except ConfigError as exc:
                raise ConfigError(
                    f"{config.source}: {where}: {exc}; list its addresses in deploy.hosts"
                ) from None
            try:
                addresses = tuple(dict.fromkeys(normal_address(a) for a in answers))
            except ConfigError as exc:
                raise ConfigError(f"{config.source}: {where}: {name!r} resolves to {exc}") from None
            found.append(Upstream(where, name, port, addresses, "resolved at render time"))
    for name, addresses in pinned.items():
        if name not in used:
            found.append(Upstream("deploy.hosts", name, None, addresses, "deploy.hosts"))
    return found


def allow_list(
    config: Config, *, resolver: Resolver = resolve, resolv_conf: Path = RESOLV_CONF
) -> list[tuple[str, list[str], list[Network]]]:
    """The allow list in groups: (title, comment lines, networks), as both renderers use it."""
    groups: list[tuple[str, list[str], list[Network]]] = [
        (
            "the scope: what relayaudit may scan, and the canary's relaying clients",
            [],
            [*config.scope],
        ),
        ("loopback: local services (a resolver stub, a local scraper)", [], [*LOOPBACK]),
    ]
    if config.deploy.resolvers is not None:
        servers, source = list(config.deploy.resolvers), "deploy.resolvers"
    else:
        try:
            servers = nameservers(resolv_conf.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            servers = []
        source = f"{resolv_conf} where this was rendered"
    groups.append((f"DNS resolvers ({source})", [], [ipaddress.ip_network(a) for a in servers]))
    sources = source_servers(config)
    if sources:  # an mx entry without a server asks the resolvers above
        groups.append(
            (
                "DNS servers the target sources ask (targets_from: zone transfers, MX lookups)",
                [f"{where}: {label}" for where, label, _, _ in sources],
                [ipaddress.ip_network(address) for _, _, address, _ in sources],
            )
        )
    notes, hook_nets = [], []
    for up in upstreams(config, resolver=resolver):
        port = f":{up.port}" if up.port is not None else ""
        shown = " ".join(str(a) for a in up.addresses)
        notes.append(f"{up.where}: {up.host}{port} -> {shown} ({up.how})")
        hook_nets += [ipaddress.ip_network(a) for a in up.addresses]
    notes += [
        f"alerts.command[{i}]: {hook.argv[0]}: list the hosts it reaches in deploy.hosts"
        for i, hook in enumerate(config.alerts.command)
    ]
    groups.append(("the alert hooks' hosts", notes, hook_nets))
    groups.append(
        (
            "deploy.allow_from: hosts that connect to the daemon's listeners",
            ["metrics scrapers, readers of the live report, canary clients outside the scope"],
            [*config.deploy.allow_from],
        )
    )
    return groups


def source_servers(config: Config) -> list[tuple[str, str, Address, int]]:
    """(config key, source label, server, port) of each targets_from entry that names a DNS
    server; an `mx` entry without one asks the resolvers of the group above."""
    return [
        (f"targets_from[{i}]", entry.label, entry.server, entry.port)
        for i, entry in enumerate(config.targets_from)
        if entry.server is not None
    ]


def _unique(nets: Iterable[Network]) -> list[Network]:
    return list(dict.fromkeys(nets))


def render_systemd(
    config: Config, *, resolver: Resolver = resolve, resolv_conf: Path = RESOLV_CONF
) -> str:
    """A drop-in for relayaudit.service: IPAddressDeny=any, IPAddressAllow= the allow list."""
    out = [
        "# relayaudit.service.d/scope.conf: the kernel's copy of relayaudit's scope.",
        "#",
        *(f"# {line}" for line in _HEADER.format(target="systemd").splitlines()),
        "# Install it as /etc/systemd/system/relayaudit.service.d/scope.conf, then",
        "# `systemctl daemon-reload && systemctl restart relayaudit.service`.",
        "#",
        "# IPAddressDeny=any drops every IP packet the daemon and its alert command hooks send or",
        "# receive unless the other end is in an IPAddressAllow= line below. It filters both",
        "# directions, so the hosts that connect to the daemon's listeners are listed too.",
        "# Names are resolved when rendering: render again when a hook's address changes.",
        "",
        "[Service]",
        "IPAddressDeny=any",
    ]
    for title, notes, nets in allow_list(config, resolver=resolver, resolv_conf=resolv_conf):
        out.append(f"# {title}")
        out += [f"#   {note}" for note in notes]
        if nets:  # an empty IPAddressAllow= would reset the list
            out.append("IPAddressAllow=" + " ".join(str(n) for n in _unique(nets)))
        else:
            out.append("#   (none)")
    return "\n".join(out) + "\n"


def _yaml_rules(rules: list[tuple[str, list[str], list[str]]], indent: str) -> list[str]:
    """A YAML list of NetworkPolicy rules: (comment, peer lines, port lines)."""
    out = []
    for comment, peers, ports in rules:
        out.append(f"{indent}# {comment}")
        out += [f"{indent}- {peers[0].lstrip()}", *(f"{indent}  {p}" for p in peers[1:])]
        if ports:
            out.append(f"{indent}  ports:")
            out += [f"{indent}    {p}" for p in ports]
    return out


def _ip_blocks(nets: Iterable[Network]) -> list[str]:
    return [f"  - ipBlock:\n      cidr: {n}" for n in _unique(nets)]


def _ports(ports: Iterable[int], protocol: str = "TCP") -> list[str]:
    return [f"- protocol: {protocol}\n  port: {p}" for p in dict.fromkeys(ports)]


def _lines(chunks: list[str]) -> list[str]:
    return [line for chunk in chunks for line in chunk.splitlines()]


def render_kubernetes(config: Config, *, resolver: Resolver = resolve) -> str:
    """A NetworkPolicy for the relayaudit pods: egress to the scope, cluster DNS and the hooks;
    ingress to the metrics port from the monitoring namespace, to the canary port from the scope."""
    labels = config.deploy.monitoring_namespace_labels
    ingress: list[tuple[str, list[str], list[str]]] = []
    if config.metrics.enabled:
        ingress.append(
            (
                f"metrics.listen port {config.metrics.listen[1]}, from the monitoring namespace "
                "(deploy.monitoring_namespace_labels)",
                [
                    "from:",
                    "  - namespaceSelector:",
                    "      matchLabels:",
                    *(f"        {k}: {_yaml_string(v)}" for k, v in labels.items()),
                ],
                _lines(_ports([config.metrics.listen[1]])),
            )
        )
    if config.canary.enabled:
        ingress.append(
            (
                f"canary.listen port {config.canary.listen[1]}, from the scope and "
                "deploy.allow_from (servers relaying a canary)",
                ["from:", *_lines(_ip_blocks([*config.scope, *config.deploy.allow_from]))],
                _lines(_ports([config.canary.listen[1]])),
            )
        )
    egress: list[tuple[str, list[str], list[str]]] = [
        (
            "the scope, on the ports relayaudit probes",
            ["to:", *_lines(_ip_blocks(config.scope))],
            _lines(_ports(config.ports)),
        ),
        (
            "cluster DNS (kube-dns or CoreDNS in kube-system)",
            [
                "to:",
                "  - namespaceSelector:",
                "      matchLabels:",
                "        kubernetes.io/metadata.name: kube-system",
                "    podSelector:",
                "      matchLabels:",
                "        k8s-app: kube-dns",
            ],
            _lines([*_ports([53], "UDP"), *_ports([53])]),
        ),
    ]
    for where, label, server, dns_port in source_servers(config):
        egress.append(
            (
                f"{where}: {label} (a DNS server of the target sources)",
                ["to:", *_lines(_ip_blocks([ipaddress.ip_network(server)]))],
                _lines([*_ports([dns_port], "UDP"), *_ports([dns_port])]),
            )
        )
    for up in upstreams(config, resolver=resolver):
        port = f":{up.port}" if up.port is not None else ""
        egress.append(
            (
                f"{up.where}: {up.host}{port} ({up.how})",
                ["to:", *_lines(_ip_blocks(ipaddress.ip_network(a) for a in up.addresses))],
                _lines(_ports([up.port])) if up.port is not None else [],
            )
        )
    commands = [hook.argv[0] for hook in config.alerts.command]
    out = [
        "# relayaudit NetworkPolicy: the cluster's copy of relayaudit's scope.",
        "#",
        *(f"# {line}" for line in _HEADER.format(target="kubernetes").splitlines()),
        "# It needs a network plugin that enforces NetworkPolicy (Calico, Cilium, ...). The",
        "# kubelet's probes of /healthz come from the node, which NetworkPolicy always admits.",
        *(
            [
                f"# [[alerts.command]] {', '.join(commands)}: list the hosts they reach in deploy.hosts."
            ]
            if commands
            else []
        ),
        "apiVersion: networking.k8s.io/v1",
        "kind: NetworkPolicy",
        "metadata:",
        "  name: relayaudit",
        "  labels:",
        "    app.kubernetes.io/name: relayaudit",
        "    app.kubernetes.io/part-of: relayaudit",
        "spec:",
        "  # every relayaudit pod: the daemon's StatefulSet and the one-shot sweep Job",
        "  podSelector:",
        "    matchLabels:",
        "      app.kubernetes.io/name: relayaudit",
        "  policyTypes:",
        "    - Ingress",
        "    - Egress",
    ]
    out += ["  ingress:", *_yaml_rules(ingress, "    ")] if ingress else ["  ingress: []"]
    out += ["  egress:", *_yaml_rules(egress, "    ")]
    return "\n".join(out) + "\n"


def _yaml_string(value: str) -> str:
    """A label value as YAML: quoted, so "true", "1" or "" stay strings."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(
    config: Config,
    target: Target,
    *,
    resolver: Resolver = resolve,
    resolv_conf: Path = RESOLV_CONF,
) -> str:
    """The drop-in (systemd) or the NetworkPolicy (kubernetes) for `config`."""
    if target == "systemd":
        return render_systemd(config, resolver=resolver, resolv_conf=resolv_conf)
    return render_kubernetes(config, resolver=resolver)
