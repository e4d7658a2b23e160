"""The daemon's live report in headless Chromium: a real `relayaudit run` on a loopback lab serves
the same page as `relayaudit report` at `/`, with its bearer token, and it works in the browser.

A missing browser fails this test (RELAYAUDIT_REQUIRE_BROWSER=0 makes it a skip).
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from browser import launched, open_page, require_browser
from cli_runner import run_cli
from daemon_harness import DaemonProcess, base_config, write_config
from loopback import free_port

from relayaudit.lab import Behaviour, Lab, ServerSpec

pytestmark = pytest.mark.browser

PORT = 2791
NET = "127.0.191.0/29"
TOKEN = "live-report-token-0123456789abcdef"


@dataclass
class Seen:
    ids: list[str] = field(default_factory=list)
    relays_shown: int = 0
    header: str = ""
    evidence_rows: int = 0
    clean: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])


def _browse(url: str, shot: Path) -> Seen:
    """Open the live page with the token, filter it and open a relay (in a thread of its own:
    Playwright's sync API runs its own event loop)."""
    seen = Seen()
    with launched(loopback="127.0.0.1") as browser:
        o = open_page(
            browser,
            url,
            extra_http_headers={"Authorization": f"Bearer {TOKEN}"},
            viewport={"width": 1280, "height": 900},
        )
        page = o.page
        seen.ids = page.eval_on_selector_all("#list > details.f", "els => els.map(e => e.id)")
        seen.header = page.locator("header").inner_text()
        page.select_option("#f-kind", "open-relay")
        relays = page.locator("#list > details.f").filter(visible=True)
        seen.relays_shown = relays.count()
        relays.first.locator("> summary").click()
        seen.evidence_rows = relays.first.locator("table.ev tbody tr").count()
        page.screenshot(path=shot, full_page=True)
        seen.clean = (o.outside, o.errors, o.console_errors, o.dialogs)
        page.context.close()
    return seen


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


@pytest.mark.time_limit(180)
async def test_the_daemon_serves_the_report_at_slash(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    require_browser()
    metrics_port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
    data = base_config(tmp_path, NET, PORT)
    data["schedule"] = {"interval": "1h"}
    data["metrics"] = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"}
    data["report"] = {"token_file": str(tmp_path / "token")}
    data["approved"] = [{"address": "127.0.191.2", "port": PORT, "note": "ISO-0191 hub"}]
    cfg = write_config(tmp_path / "relayaudit.toml", data)
    specs = [
        ServerSpec("127.0.191.1", PORT, Behaviour.OPEN_RELAY),
        ServerSpec("127.0.191.2", PORT, Behaviour.CLOSED),
        ServerSpec("127.0.191.3", PORT, Behaviour.CAMPUS_SENDER),
    ]
    async with Lab(specs, local_domains=("campus.test",), campus_domains=("campus.test",)):
        daemon = DaemonProcess(cfg, tmp_path / "log.jsonl")
        daemons.append(daemon)
        await daemon.start()
        await daemon.wait_for(lambda: bool(daemon.events("sweep.summary")), 90, "one sweep")
        url = f"http://127.0.0.1:{metrics_port}/"
        status, _ = await asyncio.to_thread(_get, url, None)
        assert status == 401  # the token is configured: none, no page
        status, csv = await asyncio.to_thread(_get, url + "report.csv", TOKEN)
        assert status == 200 and b"127.0.191.1" in csv
        seen = await asyncio.to_thread(_browse, url, tmp_path / "live.png")
        # the same findings as `relayaudit report` writes from the same store
        code, _, err = await run_cli(
            "report", "--config", str(cfg), "--output", str(tmp_path / "report.html")
        )
        assert code == 0, err
        assert await daemon.stop() == 0
    offline = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert seen.ids == re.findall(r'<details class="f" id="(ra-[0-9a-f]{16})"', offline)
    assert seen.relays_shown == 1 and seen.evidence_rows > 0
    assert "Served live by the relayaudit daemon of shard 0/1" in seen.header
    assert "scanner healthy" in seen.header and NET in seen.header
    assert seen.clean == ([], [], [], [])
