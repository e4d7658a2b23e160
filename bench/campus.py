"""The simulated campus: server layout, the lab process, preflight checks and the netns filtered range.

Everything here touches only 127.0.0.0/8 on the host, or network namespaces this module creates
(named ``rabench-<pid>-...``) and deletes again; a veth pair into such a namespace carries the
filtered range, and deleting the namespace's veth removes its route with it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from relayaudit.lab import Behaviour

__all__ = [
    "CAMPUS_DOMAIN",
    "EXTERNAL_DOMAINS",
    "FilteredRange",
    "LabProcess",
    "ScanNamespace",
    "Server",
    "build_campus",
    "cleanup_stale_namespaces",
    "listeners_on_port",
    "netns_available",
    "route_conflicts",
]

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
CAMPUS_DOMAIN = "campus.test"
# recipient domain first, external sender domain second (relayaudit's relay.external_domains)
EXTERNAL_DOMAINS = ("relay-test.example", "sender.example")
# The campus mix (shares of the servers). TARPIT servers are added in the realistic profile only.
MIX: tuple[tuple[Behaviour, float], ...] = (
    (Behaviour.OPEN_RELAY, 0.15),
    (Behaviour.CLOSED, 0.40),
    (Behaviour.AUTH_REQUIRED, 0.15),
    (Behaviour.CAMPUS_SENDER, 0.15),
    (Behaviour.ACCEPT_ALL_DISCARD, 0.15),
)
LINK_NET = ipaddress.IPv4Network("169.254.77.0/30")  # the veth pair's own two addresses
_CMD_TIMEOUT = 15.0
_NS_PREFIX = "rabench-"


@dataclass(frozen=True)
class Server:
    """One lab listener of the campus (the ground truth the verdicts are compared against)."""

    host: str
    port: int
    behaviour: Behaviour
    hostname: str
    reply_delay: float = 0.0
    flight_delay: float = 0.0
    error_limits: bool = False
    error_sleep: float = 1.0


def build_campus(
    network: ipaddress.IPv4Network,
    count: int,
    *,
    port: int,
    profile: str,
    seed: int,
    avoid: ipaddress.IPv4Network | None = None,
    tarpits: int | None = None,
) -> list[Server]:
    """`count` servers at pseudo-random addresses of `network` (never in `avoid`), mixed per MIX.

    realistic: a network: 20-50 ms per flight of the client's bytes (random per server; the
    replies to a pipelined group come back together, one round trip later), Postfix error
    limits with a 1 s sleep, and `tarpits` TARPIT servers (default: 1 per 100 servers, at least
    1) taken from CLOSED's share. slow: the same, but 20-50 ms before every single reply (a slow
    server: pipelining cannot help there).
    """
    if network.subnet_of(LOOPBACK) is False:
        raise ValueError(f"{network} is outside 127.0.0.0/8")
    rng = random.Random(seed)
    hosts = [
        h
        for h in network.hosts()
        if (avoid is None or h not in avoid) and int(h) & 0xFF not in (0, 255)
    ]
    if count > len(hosts):
        raise ValueError(f"{count} servers do not fit in {network} ({len(hosts)} usable addresses)")
    chosen = sorted(rng.sample(hosts, count))
    behaviours: list[Behaviour] = []
    for behaviour, share in MIX:
        behaviours += [behaviour] * round(count * share)
    behaviours = behaviours[:count]
    behaviours += [Behaviour.CLOSED] * (count - len(behaviours))
    if profile in ("realistic", "slow"):
        n_tarpit = max(1, count // 100) if tarpits is None else tarpits
        closed = [i for i, b in enumerate(behaviours) if b is Behaviour.CLOSED]
        for i in closed[:n_tarpit]:
            behaviours[i] = Behaviour.TARPIT
    rng.shuffle(behaviours)
    servers = []
    for host, behaviour in zip(chosen, behaviours, strict=True):
        octets = str(host).split(".")
        delayed = profile in ("realistic", "slow")
        delay = round(rng.uniform(0.020, 0.050), 4) if delayed else 0.0
        servers.append(
            Server(
                host=str(host),
                port=port,
                behaviour=behaviour,
                hostname=f"mx-{octets[2]}-{octets[3]}.{CAMPUS_DOMAIN}",
                reply_delay=delay if profile == "slow" else 0.0,
                flight_delay=delay if profile == "realistic" else 0.0,
                error_limits=delayed,
                error_sleep=1.0,
            )
        )
    return servers


def mix_counts(servers: list[Server]) -> dict[str, int]:
    return dict(sorted(Counter(s.behaviour.value for s in servers).items()))


# -- preflight ---------------------------------------------------------------------------------


def _hex_ipv4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(text), "little"))


def listeners_on_port(port: int) -> list[str]:
    """Local addresses with a TCP listener on `port` (from /proc/net/tcp and tcp6)."""
    found: list[str] = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A = LISTEN
                continue
            addr_hex, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) != port:
                continue
            if name == "tcp":
                found.append(str(_hex_ipv4(addr_hex)))
            else:
                found.append("::" if set(addr_hex) == {"0"} else f"ipv6:{addr_hex}")
    return found


def route_conflicts(networks: list[ipaddress.IPv4Network]) -> list[str]:
    """Addresses or local-table routes other than the kernel's loopback ones inside `networks`."""
    problems: list[str] = []
    ip = shutil.which("ip")
    if ip is None:
        return problems
    out = _run([ip, "-4", "-o", "addr", "show"], check=False).stdout
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", out):
        addr = ipaddress.IPv4Address(match.group(1))
        if str(addr) == "127.0.0.1":
            continue
        if any(addr in net for net in networks) or addr in LINK_NET:
            problems.append(f"address {addr}/{match.group(2)} already configured")
    out = _run([ip, "-4", "route", "show", "table", "all"], check=False).stdout
    for line in out.splitlines():
        first = line.split()[1] if line.startswith(("local ", "broadcast ")) else line.split()[0]
        with contextlib.suppress(ValueError, IndexError):
            net = ipaddress.IPv4Network(first, strict=False)
            if net.prefixlen <= 8:
                continue  # the kernel's 127.0.0.0/8 and default routes
            if any(net.overlaps(n) for n in networks):
                problems.append(f"route {line.strip()!r} overlaps the benchmark ranges")
    return problems


def _run(
    argv: list[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def netns_available() -> tuple[bool, str]:
    """Whether this process can create network namespaces (root and iproute2)."""
    if os.geteuid() != 0:
        return False, "not root: network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 ('ip') is not installed"
    name = f"{_NS_PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", name])
    except (subprocess.SubprocessError, OSError) as exc:
        return False, f"'ip netns add' failed: {_err(exc)}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(["ip", "netns", "del", name], check=False)
    return True, "ip netns works"


def _err(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return (exc.stderr or "").strip() or str(exc)
    return str(exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_namespaces() -> list[str]:
    """Delete rabench-<pid>-* namespaces (and their veths) left by benchmark runs that died."""
    removed: list[str] = []
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return removed
    out = _run(["ip", "netns", "list"], check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{_NS_PREFIX}(\d+)-\w+", name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        _run(["ip", "link", "del", f"rab{match.group(1)}h"], check=False)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


def _drop_tool() -> str | None:
    for tool in ("nft", "iptables"):
        if shutil.which(tool):
            return tool
    return None


# -- the filtered range ------------------------------------------------------------------------


class FilteredRange:
    """`network` (inside 127/8) routed over a veth pair into a namespace that drops its SYNs.

    Host side: veth rab<pid>h with 169.254.77.1/30 and route_localnet=1 (both vanish with the
    device) and a route `network via 169.254.77.2` in the local table (more specific than the
    kernel's 127.0.0.0/8, so it wins). Namespace side: an nftables (or iptables) rule drops TCP
    SYNs to `network`; without either tool, the namespace drops them as martians (127/8 arriving
    on a non-loopback device without route_localnet). Connects to the range therefore time out.
    """

    def __init__(self, network: ipaddress.IPv4Network) -> None:
        if not network.subnet_of(LOOPBACK):
            raise ValueError(f"{network} is outside 127.0.0.0/8")
        self.network = network
        pid = os.getpid()
        self.namespace = f"{_NS_PREFIX}{pid}-f"
        self.host_dev = f"rab{pid}h"
        self.ns_dev = f"rab{pid}n"
        self.method = ""
        self.active = False

    def start(self) -> None:
        host_ip, ns_ip = (str(h) for h in LINK_NET.hosts())
        net = str(self.network)
        try:
            _run(["ip", "netns", "add", self.namespace])
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    self.host_dev,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    self.ns_dev,
                    "netns",
                    self.namespace,
                ]
            )
            _run(["ip", "addr", "add", f"{host_ip}/30", "dev", self.host_dev])
            _run(["ip", "link", "set", self.host_dev, "up"])
            _run(["ip", "-n", self.namespace, "addr", "add", f"{ns_ip}/30", "dev", self.ns_dev])
            _run(["ip", "-n", self.namespace, "link", "set", self.ns_dev, "up"])
            Path(f"/proc/sys/net/ipv4/conf/{self.host_dev}/route_localnet").write_text("1\n")
            tool = _drop_tool()
            if tool == "nft":
                rules = (
                    "table inet rabench {\n"
                    "  chain pre { type filter hook prerouting priority raw; policy accept;\n"
                    f"    ip daddr {net} tcp flags & (syn|ack) == syn counter drop\n"
                    "  }\n}\n"
                )
                subprocess.run(
                    ["ip", "netns", "exec", self.namespace, "nft", "-f", "-"],
                    input=rules,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=_CMD_TIMEOUT,
                )
                self.method = "nftables rule in the namespace drops SYNs"
            elif tool == "iptables":
                _run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        self.namespace,
                        "iptables",
                        "-t",
                        "raw",
                        "-A",
                        "PREROUTING",
                        "-d",
                        net,
                        "-p",
                        "tcp",
                        "--syn",
                        "-j",
                        "DROP",
                    ]
                )
                self.method = "iptables rule in the namespace drops SYNs"
            else:
                _run(["ip", "-n", self.namespace, "route", "add", "blackhole", net])
                self.method = "namespace drops the packets (martian 127/8 + blackhole route)"
            _run(["ip", "route", "add", net, "via", ns_ip, "dev", self.host_dev, "table", "local"])
            probe = str(next(self.network.hosts()))
            route = _run(["ip", "-4", "route", "get", probe]).stdout
            if f"dev {self.host_dev}" not in route:
                raise RuntimeError(f"route check failed: {route.strip()!r}")
            self.active = True
        except BaseException:
            self.stop()
            raise

    def dropped(self) -> int | None:
        """SYNs the nftables rule dropped so far (None without nftables)."""
        if not self.active or not self.method.startswith("nftables"):
            return None
        out = _run(
            ["ip", "netns", "exec", self.namespace, "nft", "list", "ruleset"], check=False
        ).stdout
        match = re.search(r"counter packets (\d+)", out)
        return int(match.group(1)) if match else None

    def stop(self) -> None:
        self.active = False
        # deleting one end of the veth deletes both, and the route through it
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(["ip", "link", "del", self.host_dev], check=False)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(["ip", "netns", "del", self.namespace], check=False)

    def __enter__(self) -> FilteredRange:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ScanNamespace:
    """A namespace with only its own loopback, for running a scanner inside (``wrap(argv)``).

    drop_syns: an nftables (or iptables) rule drops outgoing SYNs to 127.0.0.0/8 port `port`, so
    every connect hangs until its timeout and connections stay in flight without any server
    holding them. Without it, nothing listens there: every connect is refused at once. Its TCP
    counters (/proc/PID/net/snmp) count only the scanner's connections. Nothing outside the
    namespace is touched.
    """

    def __init__(self, port: int, *, drop_syns: bool, suffix: str) -> None:
        self.port = port
        self.drop_syns = drop_syns
        self.namespace = f"{_NS_PREFIX}{os.getpid()}-{suffix}"
        self.method = "empty namespace: connects are refused"

    def start(self) -> None:
        try:
            _run(["ip", "netns", "add", self.namespace])
            _run(["ip", "-n", self.namespace, "link", "set", "lo", "up"])
            if self.drop_syns:
                self._drop()
        except BaseException:
            self.stop()
            raise

    def _drop(self) -> None:
        tool = _drop_tool()
        if tool == "nft":
            rules = (
                "table inet rabmem {\n"
                "  chain out { type filter hook output priority raw; policy accept;\n"
                f"    ip daddr 127.0.0.0/8 tcp dport {self.port} tcp flags & (syn|ack) == syn drop\n"
                "  }\n}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", self.namespace, "nft", "-f", "-"],
                input=rules,
                capture_output=True,
                text=True,
                check=True,
                timeout=_CMD_TIMEOUT,
            )
            self.method = "nftables output rule drops SYNs on the namespace's loopback"
        elif tool == "iptables":
            _run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.namespace,
                    "iptables",
                    "-t",
                    "raw",
                    "-A",
                    "OUTPUT",
                    "-d",
                    "127.0.0.0/8",
                    "-p",
                    "tcp",
                    "--dport",
                    str(self.port),
                    "--syn",
                    "-j",
                    "DROP",
                ]
            )
            self.method = "iptables output rule drops SYNs on the namespace's loopback"
        else:
            raise RuntimeError("neither nft nor iptables is installed")

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def contains(self, pid: int) -> bool:
        """Whether process `pid` has entered this namespace yet (``ip netns exec`` is quick)."""
        try:
            return (
                os.stat(f"/proc/{pid}/ns/net").st_ino
                == os.stat(f"/run/netns/{self.namespace}").st_ino
            )
        except OSError:
            return False

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            _run(["ip", "netns", "del", self.namespace], check=False)

    def __enter__(self) -> ScanNamespace:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- the lab process ---------------------------------------------------------------------------


class LabProcess:
    """relayaudit.lab serving `servers` in one separate Python process (its own process group)."""

    def __init__(
        self, servers: list[Server], workdir: Path, *, repo: Path, max_seconds: float
    ) -> None:
        self.servers = servers
        self.workdir = workdir
        self.repo = repo
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "lab.log"

    def start(self, timeout: float = 60.0) -> None:
        specs = self.workdir / "lab-specs.json"
        doc = [{**asdict(s), "behaviour": s.behaviour.value} for s in self.servers]
        specs.write_text(json.dumps(doc), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": _pythonpath(self.repo)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("labproc.py")),
                    str(specs),
                    "--max-seconds",
                    str(self.max_seconds),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        try:
            assert self.proc.stdout is not None
            deadline = time.monotonic() + timeout
            line = b""
            while time.monotonic() < deadline and not line.endswith(b"\n"):
                ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
                if ready:
                    chunk = os.read(self.proc.stdout.fileno(), 1)
                    if not chunk:
                        break
                    line += chunk
            if not line.startswith(b"READY"):
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"lab did not start: {line.decode(errors='replace')!r} {tail}")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> LabProcess:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _pythonpath(repo: Path) -> str:
    old = os.environ.get("PYTHONPATH")
    return f"{repo}{os.pathsep}{old}" if old else str(repo)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat (0.0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # after "pid (comm)": state is fields[0]; utime and stime are the 14th and 15th stat fields
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
