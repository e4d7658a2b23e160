"""The daemon's report routes without the daemon: who may see them, one render per sweep, and
nothing written. tests/test_report_browser.py opens the page of a real daemon in Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from factories import make_finding, observe, one_sweep

from relayaudit.config import Config, parse_config
from relayaudit.live_report import Access, LiveReport, report_access
from relayaudit.metrics import Metrics, MetricsServer
from relayaudit.state import StateStore
from relayaudit.verdict import FindingKind, finding_id

TOKEN = "a" * 20 + "-report-token"


def _config(tmp_path: Path, listen: str = "127.0.0.1:9425", **report: Any) -> Config:
    if report.get("token_file") is True:
        (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
        report["token_file"] = str(tmp_path / "token")
    return parse_config(
        {
            "scope": ["127.0.0.0/8"],
            "targets": ["127.0.9.0/24"],
            "metrics": {"listen": listen},
            "report": report,
        }
    )


@pytest.mark.parametrize(
    ("listen", "report", "access"),
    [
        ("127.0.0.1:9425", {}, Access.OPEN),
        ("[::1]:9425", {}, Access.OPEN),
        ("127.0.0.1:9425", {"token_file": True}, Access.TOKEN),
        ("0.0.0.0:9425", {}, Access.OFF),
        ("0.0.0.0:9425", {"token_file": True}, Access.OFF),  # a token alone does not open it
        ("0.0.0.0:9425", {"serve": True, "token_file": True}, Access.TOKEN),
        ("[::]:9425", {"serve": True, "token_file": True}, Access.TOKEN),
    ],
)
def test_who_may_see_the_report(
    tmp_path: Path, listen: str, report: dict[str, Any], access: Access
) -> None:
    config = _config(tmp_path, listen, **report)
    assert report_access(config.metrics.listen[0], config.report) is access


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "state.sqlite"
    with StateStore(path) as store:
        one_sweep(store, observe(make_finding(address="127.0.9.7"), address="127.0.9.7"))
    return path


async def _serve(live: LiveReport) -> MetricsServer:
    """The routes on 127.0.0.1 (whatever listener `live` was told it is on: tests stay on loopback)."""
    server = MetricsServer(
        Metrics(), "127.0.0.1", 0, health=lambda: (True, "ok"), routes=live.routes()
    )
    await server.start()
    return server


def _live(path: Path, config: Callable[[], Config], host: str = "127.0.0.1") -> LiveReport:
    return LiveReport(
        path, config=config, shard="0/1", listen_host=host, health=lambda: (True, "test")
    )


async def test_open_on_loopback_rendered_once_per_sweep_and_read_only(tmp_path: Path) -> None:
    path = _store(tmp_path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    config = _config(tmp_path)
    live = _live(path, lambda: config)
    server = await _serve(live)
    try:
        url = f"http://127.0.0.1:{server.port}"
        pages = await asyncio.gather(*(asyncio.to_thread(_get, url + "/") for _ in range(5)))
        assert {status for status, _, _ in pages} == {200}
        status, headers, body = pages[0]
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert b"127.0.9.7:25" in body and b"Served live by the relayaudit daemon" in body
        status, headers, table = await asyncio.to_thread(_get, url + "/report.csv")
        assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
        assert table.startswith(b"id,kind,severity") and b"127.0.9.7" in table
        assert live.renders == 1  # five pages and the CSV from one render
        live.sweep_started()
        await asyncio.to_thread(_get, url + "/")
        live.sweep_ended()
        await asyncio.to_thread(_get, url + "/")
        assert live.renders == 3
    finally:
        await server.stop()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


async def test_a_token_is_required_once_configured(tmp_path: Path) -> None:
    path = _store(tmp_path)
    config = _config(tmp_path, token_file=True)
    live = _live(path, lambda: config)
    server = await _serve(live)
    try:
        url = f"http://127.0.0.1:{server.port}"
        for path_ in ("/", "/report.csv"):
            status, headers, _ = await asyncio.to_thread(_get, url + path_)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            status, _, _ = await asyncio.to_thread(_get, url + path_, "wrong" + TOKEN)
            assert status == 401
            status, _, body = await asyncio.to_thread(_get, url + path_, TOKEN)
            assert status == 200 and b"127.0.9.7" in body
        assert live.renders == 1  # refused requests render nothing
        status, _, _ = await asyncio.to_thread(_get, url + "/metrics")
        assert status == 200  # /metrics needs no token
    finally:
        await server.stop()


async def test_not_served_on_a_wider_listener_without_serve(tmp_path: Path) -> None:
    """A listener on every address without report.serve: 404 (the test binds loopback only)."""
    path = _store(tmp_path)
    config = _config(tmp_path, "0.0.0.0:9425")
    live = _live(path, lambda: config, host="0.0.0.0")
    server = await _serve(live)
    try:
        status, _, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/")
        assert status == 404 and b"report.serve = true" in body
        status, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz")
        assert status == 200
        assert live.renders == 0
    finally:
        await server.stop()


async def test_a_shards_page_says_it_shows_only_its_shard(tmp_path: Path) -> None:
    path = _store(tmp_path)
    config = _config(tmp_path)
    live = LiveReport(
        path, config=lambda: config, shard="1/3", listen_host="127.0.0.1", health=lambda: (True, "")
    )
    page, _ = await live.pages()
    assert b"Served live by the relayaudit daemon of shard 1/3" in page
    assert b"This page shows only this shard&#x27;s findings" in page


async def test_one_finding_whole_as_json_under_the_same_access_rule(tmp_path: Path) -> None:
    """`GET /findings/<id>.json`: what an alert's `show` points to, on the daemon's listener."""
    path = _store(tmp_path)
    fid = finding_id(FindingKind.OPEN_RELAY, "127.0.9.7", 25)
    config = _config(tmp_path, token_file=True)
    server = await _serve(_live(path, lambda: config))
    try:
        url = f"http://127.0.0.1:{server.port}/findings/{fid}.json"
        status, _, _ = await asyncio.to_thread(_get, url)
        assert status == 401  # the report's token, as for the page
        status, headers, body = await asyncio.to_thread(_get, url, TOKEN)
        assert status == 200 and headers["Content-Type"] == "application/json"
        shown = json.loads(body)
        assert shown["finding"]["id"] == fid and shown["finding"]["transcript"]
        assert shown["status"] == "new" and shown["changes"][0]["transition"] == "new"
        for missing in (f"/findings/{'ra-' + '0' * 16}.json", "/findings/x.json", "/findings/"):
            status, _, _ = await asyncio.to_thread(
                _get, f"http://127.0.0.1:{server.port}{missing}", TOKEN
            )
            assert status == 404, missing
    finally:
        await server.stop()
