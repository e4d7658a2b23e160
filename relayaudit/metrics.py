"""Prometheus text metrics (a tiny dependency-free registry) and the /metrics, /livez, /readyz and /healthz server.

The server also answers the routes it is given (the daemon's report pages), under the same
limits on connections and request heads, each with its own write deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from relayaudit import __version__

__all__ = [
    "Counter",
    "Gauge",
    "Metrics",
    "MetricsServer",
    "Registry",
    "Request",
    "Response",
    "Route",
    "render_value",
]

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP method (RFC 9110 token)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render_value(value: float) -> str:
    """A sample value as the text format wants it: integers without `.0`, NaN and +Inf/-Inf."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Family:
    """One metric name with its HELP, TYPE and one sample per label-value combination."""

    kind = "untyped"

    def __init__(
        self, name: str, help_text: str, labelnames: tuple[str, ...], lock: threading.Lock
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid metric name")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: {label!r} is not a valid label name")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"{name}: label names {labelnames!r} repeat")
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        # Shared with the registry: updates come from the event loop, renders may come from
        # another thread, and a render must never see a half-replaced family.
        self._lock = lock
        self._values: dict[tuple[str, ...], float] = {}
        if not labelnames:
            self._values[()] = 0.0  # an unlabelled metric exists from the start, at zero

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} given, {sorted(self.labelnames)} expected"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def value(self, **labels: object) -> float:
        """The current sample (0 when that combination was never touched)."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return dict(self._values)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(self.samples().items()):
            if key:
                labels = ",".join(
                    f'{n}="{_escape_label(v)}"' for n, v in zip(self.labelnames, key, strict=True)
                )
                lines.append(f"{self.name}{{{labels}}} {render_value(value)}")
            else:
                lines.append(f"{self.name} {render_value(value)}")
        return lines


class Counter(_Family):
    """Only goes up (until the process restarts; Prometheus' rate() handles that)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Family):
    """A value that is set, e.g. copied from the state store after every change."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Set the whole family at once; combinations not given disappear from the output."""
        fresh: dict[tuple[str, ...], float] = {}
        for key, value in values.items():
            if len(key) != len(self.labelnames):
                raise ValueError(
                    f"{self.name}: label values {key!r} do not fit labels {self.labelnames!r}"
                )
            fresh[tuple(str(k) for k in key)] = float(value)
        with self._lock:
            self._values = fresh


class Registry:
    """Families in registration order; render() is the whole /metrics body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name!r} is registered twice")
        self._families[family.name] = family

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Counter:
        family = Counter(name, help_text, labelnames, self._lock)
        self._add(family)
        return family

    def gauge(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        family = Gauge(name, help_text, labelnames, self._lock)
        self._add(family)
        return family

    def family(self, name: str) -> Counter | Gauge:
        family = self._families.get(name)
        if not isinstance(family, Counter | Gauge):
            raise KeyError(f"no metric named {name!r}")
        return family

    def inc(self, name: str, amount: float = 1.0, /, **labels: object) -> None:
        """By name: add to a counter or gauge, e.g. inc("relayaudit_probes_total", status="open")."""
        self.family(name).inc(amount, **labels)

    def set(self, name: str, value: float, /, **labels: object) -> None:
        """By name: set a gauge (for a whole labelled family at once prefer Gauge.replace)."""
        family = self.family(name)
        if not isinstance(family, Gauge):
            raise ValueError(f"{name} is a {family.kind}; only gauges can be set")
        family.set(value, **labels)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"


class Metrics(Registry):
    """relayaudit's metrics; the daemon updates them, MetricsServer renders them."""

    ALERT_STATES = ("pending", "sent", "dead")

    def __init__(self) -> None:
        super().__init__()
        # the Prometheus convention for "which build is this": always 1, the facts in labels
        self.build_info = self.gauge(
            "relayaudit_build_info", "relayaudit's version (the value is always 1).", ("version",)
        )
        self.build_info.set(1, version=__version__)
        self.probes_total = self.counter(
            "relayaudit_probes_total",
            "Probes of (address, port) finished, by outcome.",
            ("status",),
        )
        self.findings = self.gauge(
            "relayaudit_findings",
            "Findings in the state store, by kind and status.",
            ("kind", "status"),
        )
        self.alerts = self.gauge(
            "relayaudit_alerts", "Alerts in the outbox, by delivery state.", ("state",)
        )
        self.alerts_dead_total = self.counter(
            "relayaudit_alerts_dead_total",
            "Alerts dead-lettered after their last delivery attempt failed.",
        )
        self.sweep_duration_seconds = self.gauge(
            "relayaudit_sweep_duration_seconds", "Duration of the last completed sweep."
        )
        self.sweep_progress_ratio = self.gauge(
            "relayaudit_sweep_progress_ratio",
            "Share of the current sweep's hosts done (1 when no sweep is running).",
        )
        self.sweep_hosts_done = self.gauge(
            "relayaudit_sweep_hosts_done", "Hosts done in the current (or last) sweep."
        )
        self.last_completed_sweep_timestamp_seconds = self.gauge(
            "relayaudit_last_completed_sweep_timestamp_seconds",
            "Unix time at which the last sweep completed (0: none yet).",
        )
        self.canary_connections_total = self.counter(
            "relayaudit_canary_connections_total",
            "Connections to the canary receiver, by what became of them (accepted, "
            "refused-busy, evicted, deadline, line-too-long, too-large).",
            ("outcome",),
        )
        self.canary_messages_total = self.counter(
            "relayaudit_canary_messages_total",
            "Messages the canary receiver took: token (one the scanner sent and waits for), "
            "unexpected-token (any other: forged, late or replayed), no-token (e.g. bounces).",
            ("result",),
        )
        self.target_source_failures_total = self.counter(
            "relayaudit_target_source_failures_total",
            "Reads of a targets_from source that failed (the sweep used its last good copy, if "
            "any), by source.",
            ("source",),
        )
        self.target_source_addresses = self.gauge(
            "relayaudit_target_source_addresses",
            "Addresses each targets_from source gave the last sweep (its last good copy when a "
            "read failed), by source.",
            ("source",),
        )
        self.target_source_stale = self.gauge(
            "relayaudit_target_source_stale",
            "1 when the last sweep used a source's last good copy because the read failed.",
            ("source",),
        )
        self.owners_failures_total = self.counter(
            "relayaudit_owners_file_failures_total",
            "Reads of owners_file that failed (unreadable, or a bad row); the sweep used the "
            "last good owner table, if any.",
        )
        self.owners_stale = self.gauge(
            "relayaudit_owners_file_stale",
            "1 when the last sweep used the last good owner table because owners_file could "
            "not be read.",
        )
        self.owner_ranges = self.gauge(
            "relayaudit_owner_ranges",
            "Ranges in the owner table the last sweep used ([[owners]] and owners_file).",
        )
        self.approvals_expiring = self.gauge(
            "relayaudit_approvals_expiring",
            "[[approved]] entries that still hold but expire within 30 days (expires = DATE), "
            "counted at start and after each sweep: nobody runs config check daily.",
        )
        # Present from the start so dashboards and alert rules see zeros, not absent series.
        self.alerts.replace({(state,): 0 for state in self.ALERT_STATES})

    def probe(self, status: str, count: int = 1) -> None:
        self.probes_total.inc(count, status=status)

    def canary(self, family: str, what: str) -> None:
        """One event of the canary receiver (relayaudit.canary.Count)."""
        if family == "connections":
            self.canary_connections_total.inc(outcome=what)
        else:
            self.canary_messages_total.inc(result=what)

    def set_findings(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace the findings gauge with `{(kind, status): count}` read from the state store."""
        self.findings.replace({key: float(n) for key, n in counts.items()})

    def set_alerts(self, *, pending: int, sent: int, dead: int) -> None:
        self.alerts.replace({("pending",): pending, ("sent",): sent, ("dead",): dead})

    def alert_dead(self, count: int = 1) -> None:
        self.alerts_dead_total.inc(count)

    def sweep_progress(self, done: int, total: int) -> None:
        self.sweep_hosts_done.set(done)
        self.sweep_progress_ratio.set(done / total if total > 0 else 1.0)

    def sweep_completed(self, *, duration: float, finished_at: float) -> None:
        """Record a completed sweep; `finished_at` is Unix time (time.time())."""
        self.sweep_duration_seconds.set(duration)
        self.last_completed_sweep_timestamp_seconds.set(finished_at)
        self.sweep_progress_ratio.set(1.0)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


_MAX_HEADERS = 100  # header lines kept per request (the head's size is bounded anyway)


@dataclass(frozen=True, slots=True)
class Request:
    """What a route sees of a request: its method (GET or HEAD), path and headers."""

    method: str
    path: str
    headers: Mapping[str, str]  # names in lower case; a repeated header keeps its first value


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """A page served beside /metrics: `handler` answers within `deadline` seconds, and the
    answer must be written within the same time again."""

    handler: Callable[[Request], Awaitable[Response]]
    deadline: float = 60.0


class _Reject(Exception):
    """Ends a request early with this status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class MetricsServer:
    """GET /metrics and GET /healthz over HTTP/1.1, one request per connection.

    Built to be exposed to hostile networks by mistake: the request head must arrive within
    `read_deadline` seconds in total (slowloris) and within `max_head` bytes; at most
    `max_connections` are open at once, and when full the oldest connection still sending its
    head is dropped to make room, so a flood of idle sockets cannot lock out the scraper.
    """

    def __init__(
        self,
        metrics: Registry,
        host: str,
        port: int,
        *,
        health: Callable[[], tuple[bool, str]],
        live: Callable[[], tuple[bool, str]] | None = None,
        read_deadline: float = 5.0,
        write_deadline: float = 5.0,
        max_head: int = 8192,
        max_connections: int = 256,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.metrics = metrics
        self.routes = dict(routes or {})
        self.host = host
        self.requested_port = port
        self.health = health
        self.live = live or (lambda: (True, "alive"))
        self.read_deadline = read_deadline
        self.write_deadline = write_deadline
        self.max_head = max_head
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        # Insertion order is arrival order; the value says whether the head is still being read.
        self._connections: dict[asyncio.Task[None], bool] = {}
        self.requests_served = 0
        self.connections_dropped = 0

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, limit=self.max_head + 2
        )

    async def stop(self) -> None:
        """Stop listening and end open connections; bounded by the write deadline."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.write_deadline)
        with contextlib.suppress(TimeoutError):
            # Since 3.12 wait_closed also waits for connections, which were just cancelled.
            await asyncio.wait_for(server.wait_closed(), timeout=self.write_deadline)

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _make_room(self) -> bool:
        """Drop the oldest connection still reading its head; False if every one is busy."""
        for task, reading in self._connections.items():
            if reading:
                task.cancel()
                del self._connections[task]
                self.connections_dropped += 1
                return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self._connections) >= self.max_connections and not self._make_room():
                self.connections_dropped += 1
                await self._respond(writer, 503, "too many connections\n", head_only=False)
                return
            self._connections[task] = True
            try:
                async with asyncio.timeout(self.read_deadline):
                    method, path, headers = await self._read_head(reader)
            except TimeoutError:
                raise _Reject(408, "request head not received in time") from None
            self._connections[task] = False
            route = self.routes.get(path) or next(
                # a key ending in "/" (not the root) serves every path under it
                (
                    r
                    for p, r in self.routes.items()
                    if len(p) > 1 and p[-1] == "/" and path.startswith(p)
                ),
                None,
            )
            if route is None:
                status, body = self._route(method, path)
                await self._respond(writer, status, body, head_only=method == "HEAD")
            else:
                try:
                    async with asyncio.timeout(route.deadline):
                        response = await route.handler(Request(method, path, headers))
                except TimeoutError:
                    raise _Reject(503, "not ready in time; try again") from None
                await self._send(writer, response, method == "HEAD", route.deadline)
            self.requests_served += 1
        except _Reject as reject:
            with contextlib.suppress(Exception):
                await self._respond(writer, reject.status, reject.reason + "\n", head_only=False)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            pass  # dropped for room, server stopping, or the client went away
        except Exception:  # one bad request must never take the server down
            with contextlib.suppress(Exception):
                await self._respond(writer, 500, "internal error\n", head_only=False)
        finally:
            self._connections.pop(task, None)
            # Anything still unsent belongs to a client that stopped reading: drop it outright
            # rather than let the transport hold the socket open to flush it.
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        """Request line and headers; returns (method, path, headers)."""
        size = 0
        request_line = b""
        headers: dict[str, str] = {}
        # Each line costs at least one byte of the max_head budget, so this ends by then.
        for _ in range(self.max_head + 1):
            try:
                line = await reader.readline()
            except ValueError:  # a line longer than the stream limit
                raise _Reject(431, "request head too large") from None
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            size += len(line)
            if size > self.max_head:
                raise _Reject(431, "request head too large")
            if not request_line:
                if line.strip():
                    request_line = line
                continue  # tolerate blank lines before the request line (RFC 9112 2.2)
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if colon and len(headers) < _MAX_HEADERS:
                headers.setdefault(name.strip().lower(), value.strip())
        return (*self._parse_request_line(request_line), headers)

    @staticmethod
    def _parse_request_line(line: bytes) -> tuple[str, str]:
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reject(400, "malformed request line")
        method, target, _ = parts
        if not _TOKEN.match(method):
            raise _Reject(400, "malformed request method")
        if method not in ("GET", "HEAD"):
            raise _Reject(405, f"method {method} not allowed")
        try:
            path = urlsplit(target).path
        except ValueError:
            raise _Reject(400, "malformed request target") from None
        return method, path

    def _route(self, method: str, path: str) -> tuple[int, str]:
        if path == "/metrics":
            return 200, self.metrics.render()
        # /livez: the process and its event loop are alive (a liveness probe restarts it if not);
        # /readyz and /healthz: a sweep completed within its interval (readiness, alerting)
        check = {"/livez": self.live, "/readyz": self.health, "/healthz": self.health}.get(path)
        if check is not None:
            try:
                ok, reason = check()
            except Exception as exc:  # a broken check is an unhealthy daemon
                return 503, f"health check failed: {type(exc).__name__}\n"
            return (200, f"ok {reason}\n") if ok else (503, f"{reason}\n")
        return 404, "not found: try /metrics, /livez, /readyz or /healthz\n"

    async def _respond(
        self, writer: asyncio.StreamWriter, status: int, body: str, *, head_only: bool
    ) -> None:
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        response = Response(status, body.encode("utf-8"), content_type)
        await self._send(writer, response, head_only, self.write_deadline)

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, head_only: bool, deadline: float
    ) -> None:
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
        ]
        if response.status == 405:
            head.append("Allow: GET, HEAD")
        head += [f"{name}: {value}" for name, value in response.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        # A client that never reads must not pin the connection either.
        async with asyncio.timeout(deadline):
            await writer.drain()
