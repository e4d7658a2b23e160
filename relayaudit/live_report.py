"""The report served live by the daemon: `GET /` and `/report.csv` on the metrics listener.

Who may see it (`report_access`: loopback, or `report.serve` with a bearer token) and the
rendering (`LiveReport`: kept per sweep; a worker thread waits for a child process that reads
the store read-only and renders the page).

Why a child process: rendering 5,000 findings is about two seconds of pure Python. In a thread
of the daemon it holds the GIL against the event loop, and bench/report_bench.py measured the
sweep's probe rate falling by two thirds and /metrics taking half a second while it ran. In a
child (at a lower CPU priority) it costs the event loop nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from relayaudit.config import Config, ReportConfig
from relayaudit.errors import OutputError
from relayaudit.export import find, render
from relayaudit.html_page import page_from_stores
from relayaudit.html_report import content_security_policy, render_html
from relayaudit.metrics import Request, Response, Route

__all__ = [
    "RENDER_TIMEOUT",
    "RUNNING_MAX_AGE",
    "SINCE",
    "WRITE_DEADLINE",
    "Access",
    "LiveReport",
    "RenderJob",
    "render_pages",
    "report_access",
]

SINCE = timedelta(days=7)  # the live page's "what changed" window
WRITE_DEADLINE = 60.0  # a large page to a slow client; /metrics keeps its 5 s
RENDER_TIMEOUT = 50.0  # the child's bound, within the route's 60 s
RUNNING_MAX_AGE = 300.0  # seconds a page is kept while a sweep runs (new findings appear)
_SECURITY = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
_HTML_HEADERS = (
    ("Content-Security-Policy", content_security_policy() + "; frame-ancestors 'none'"),
    *_SECURITY,
)
_CSV_HEADERS = (
    ("Content-Disposition", 'attachment; filename="relayaudit-report.csv"'),
    *_SECURITY,
)
_JSON_HEADERS = _SECURITY
_FINDING_PATH = re.compile(r"/findings/(ra-[0-9a-f]{16})\.json")


class Access(StrEnum):
    OPEN = "open"  # loopback listener, no token configured
    TOKEN = "token"  # noqa: S105 - every request must carry `Authorization: Bearer <token>`
    OFF = "off"  # a listener that is not loopback without report.serve


def report_access(listen_host: str, report: ReportConfig) -> Access:
    """Whether, and how, the report may be served on the metrics listener at `listen_host`."""
    loopback = ipaddress.ip_address(listen_host).is_loopback
    if not loopback and not report.serve:
        return Access.OFF
    return Access.TOKEN if report.token is not None else Access.OPEN


class LiveReport:
    """The daemon's report pages: rendered by a child process (a worker thread waits for it)
    from a read-only open of the state file, and kept until the next sweep starts or completes
    (or a SIGHUP; at most RUNNING_MAX_AGE while a sweep runs).

    One render at a time: requests arriving meanwhile wait for it instead of starting their own.
    A request never writes: the store is opened read-only for each render, and the routes take
    no parameters.
    """

    def __init__(
        self,
        state_path: Path,
        *,
        config: Callable[[], Config],
        shard: str,
        listen_host: str,
        health: Callable[[], tuple[bool, str]],
        since: timedelta = SINCE,
    ) -> None:
        self.state_path = state_path
        self._config = config
        self.shard = shard
        self.listen_host = listen_host
        self._health = health
        self.since = since
        self._generation = 0
        self._running = False
        self._cache: tuple[int, float, bytes, bytes] | None = None  # generation, at, html, csv
        self._lock = asyncio.Lock()
        self.renders = 0
        self.last_render_seconds = 0.0

    # -- what the daemon tells it ---------------------------------------------------------------

    def sweep_started(self) -> None:
        self._running = True
        self._generation += 1

    def sweep_ended(self) -> None:
        self._running = False
        self._generation += 1

    def invalidate(self) -> None:
        """The config was reloaded: the next request renders afresh."""
        self._generation += 1

    # -- the pages --------------------------------------------------------------------------------

    def routes(self) -> dict[str, Route]:
        """`/` (HTML), `/report.csv` and `/findings/<id>.json` (one finding whole, what an
        alert's `show` points to) for the metrics listener, each with its own 60 s."""
        return {
            "/": Route(self._html, deadline=WRITE_DEADLINE),
            "/report.csv": Route(self._csv, deadline=WRITE_DEADLINE),
            "/findings/": Route(self._finding, deadline=WRITE_DEADLINE),
        }

    async def _finding(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        match = _FINDING_PATH.fullmatch(request.path)
        if match is None:
            return Response(
                404,
                b"not found: /findings/<finding id>.json, e.g. /findings/ra-0123456789abcdef.json\n",
            )
        shown = await asyncio.to_thread(find, [self.state_path], match[1])
        if shown is None:
            return Response(404, f"no finding {match[1]} in this shard's state store\n".encode())
        body = shown.model_dump_json(indent=2).encode() + b"\n"
        return Response(200, body, "application/json", _JSON_HEADERS)

    async def _html(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        page, _ = await self.pages()
        return Response(200, page, "text/html; charset=utf-8", _HTML_HEADERS)

    async def _csv(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        _, table = await self.pages()
        return Response(200, table, "text/csv; charset=utf-8", _CSV_HEADERS)

    def _refused(self, request: Request) -> Response | None:
        report = self._config().report
        access = report_access(self.listen_host, report)
        if access is Access.OFF:
            return Response(
                404,
                f"not found: the report is served on a loopback listener only; to serve it on "
                f"{self.listen_host}, set report.serve = true and report.token_file\n".encode(),
            )
        if access is Access.TOKEN and not _bearer_ok(request, report):
            return Response(
                401,
                b"the report needs its bearer token: Authorization: Bearer TOKEN "
                b"(report.token_file)\n",
                headers=(("WWW-Authenticate", 'Bearer realm="relayaudit report"'),),
            )
        return None

    def _fresh(self) -> bool:
        if self._cache is None or self._cache[0] != self._generation:
            return False
        return not self._running or time.monotonic() - self._cache[1] < RUNNING_MAX_AGE

    async def pages(self) -> tuple[bytes, bytes]:
        """(HTML, CSV) of the store as of this sweep."""
        async with self._lock:
            if not self._fresh():
                generation = self._generation
                html_bytes, csv_bytes = await asyncio.to_thread(self._render)
                self._cache = (generation, time.monotonic(), html_bytes, csv_bytes)
            assert self._cache is not None
            return self._cache[2], self._cache[3]

    def _render(self) -> tuple[bytes, bytes]:
        """Run in a worker thread: the child renders, this thread only waits for it."""
        started = time.monotonic()
        served_by = (
            f"Served live by the relayaudit daemon of shard {self.shard} from its state store "
            f"{self.state_path}; rendered again when a sweep starts or ends."
        )
        if self.shard.split("/")[-1] != "1":
            served_by += (
                " This page shows only this shard's findings: for the whole campus, run "
                "relayaudit report with --state FILE once per shard."
            )
        job = RenderJob(self.state_path, self._config(), self.since, self._health(), served_by)
        pages = _render_in_child(job)
        self.renders += 1
        self.last_render_seconds = time.monotonic() - started
        return pages


@dataclass(frozen=True, slots=True)
class RenderJob:
    """What the child needs: the daemon's own config object, not a file that may have changed."""

    state_path: Path
    config: Config
    since: timedelta
    health: tuple[bool, str]
    served_by: str


def render_pages(job: RenderJob) -> tuple[bytes, bytes]:
    """(HTML, CSV) of the state file, read-only."""
    page = page_from_stores(
        [job.state_path],
        since=job.since,
        config=job.config,
        health=job.health,
        served_by=job.served_by,
    )
    return render_html(page).encode("utf-8"), render(page.report, "csv").encode("utf-8")


def _render_in_child(job: RenderJob) -> tuple[bytes, bytes]:
    try:
        # the child is this program, given its parent's own objects on a pipe: nothing
        # untrusted is unpickled
        done = subprocess.run(
            [sys.executable, "-m", "relayaudit.live_report"],
            input=pickle.dumps(job),
            capture_output=True,
            timeout=RENDER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OutputError(f"report: rendering took longer than {RENDER_TIMEOUT:g}s") from None
    if done.returncode != 0:
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise OutputError(f"report: rendering failed ({done.returncode}): {last[0]}")
    head, _, body = done.stdout.partition(b"\n")
    html_size, csv_size = (int(n) for n in head.split())
    if len(body) != html_size + csv_size:
        raise OutputError("report: the rendering child's output was cut short")
    return body[:html_size], body[html_size:]


def _child() -> int:
    """`python -m relayaudit.live_report`: one RenderJob on stdin, the pages on stdout."""
    with contextlib.suppress(OSError):
        os.nice(10)  # probes and /metrics first
    job = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - written by our parent, see above
    html_bytes, csv_bytes = render_pages(job)
    out = sys.stdout.buffer
    out.write(f"{len(html_bytes)} {len(csv_bytes)}\n".encode() + html_bytes + csv_bytes)
    out.flush()
    return 0


def _bearer_ok(request: Request, report: ReportConfig) -> bool:
    if report.token is None:
        return False
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    wanted = report.token.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), wanted)


if __name__ == "__main__":
    sys.exit(_child())
