"""Headless Debian Chromium through Playwright, kept inside the page: every request outside it is
aborted and recorded, and Chromium's own name lookups go nowhere.

Used by the browser tests, bench/report_bench.py and scripts/screenshot. Playwright drives the
system's /usr/bin/chromium (`executable_path`); its own browser download is never used.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Route
    from playwright.sync_api._generated import LocatorAssertions

__all__ = [
    "CHROMIUM",
    "Opened",
    "browser_missing",
    "expect",
    "launched",
    "open_page",
    "require_browser",
]

CHROMIUM = Path("/usr/bin/chromium")
# Chromium looks up accounts.google.com and update.googleapis.com at start, outside any page:
# mapping every name to nothing stops those lookups (no route sees them). The rule maps address
# literals too: a page served on loopback is let through by an EXCLUDE of its address.
RESOLVER_RULES = "MAP * ~NOTFOUND"
LAUNCH_TIMEOUT_MS = 60_000
LOAD_TIMEOUT_MS = 60_000


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        return f"no Chromium at {CHROMIUM} (Debian package `chromium`; scripts/test installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (the `test` extra: pip install -e '.[test]')"
    return None


def require_browser() -> None:
    """Fail (or, with RELAYAUDIT_REQUIRE_BROWSER=0, skip) when the browser cannot run here."""
    import pytest  # noqa: PLC0415 - bench and scripts/screenshot import this module without pytest

    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get("RELAYAUDIT_REQUIRE_BROWSER", "1") == "0":
        pytest.skip(f"RELAYAUDIT_REQUIRE_BROWSER=0: {reason}")
    pytest.fail(
        f"{reason}. The browser tests are required; RELAYAUDIT_REQUIRE_BROWSER=0 turns this "
        "failure into a skip on a machine that cannot have a browser",
        pytrace=False,
    )


@contextmanager
def launched(*, loopback: str | None = None) -> Iterator[Browser]:
    """Playwright's driver and one headless Chromium (as root Playwright adds --no-sandbox);
    `loopback`: the one loopback address its pages may reach (a live page), else none."""
    from playwright.sync_api import sync_playwright  # noqa: PLC0415

    if loopback is not None and not ipaddress.ip_address(loopback).is_loopback:
        raise ValueError(f"{loopback} is not a loopback address")
    rules = RESOLVER_RULES + (f", EXCLUDE {loopback}" if loopback else "")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[f"--host-resolver-rules={rules}"],
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Opened:
    """A page and what it did: console messages, uncaught errors, requests outside, dialogs."""

    page: Page
    url: str
    console: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    @property
    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind == "error"]

    def assert_clean(self) -> None:
        """No request left the page, nothing threw, nothing logged an error, no dialog opened."""
        assert (self.outside, self.errors, self.console_errors, self.dialogs) == ([], [], [], [])


def open_page(browser: Browser, url: str, **context_options: Any) -> Opened:
    """Open `url` in a fresh context; any request but `url` itself and data: URLs is aborted
    before a lookup or connect and recorded in `outside`. The caller closes the page's context."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    opened = Opened(page=page, url=url)

    def guard(route: Route) -> None:
        if route.request.url == url or route.request.url.startswith("data:"):
            route.continue_()
            return
        opened.outside.append(route.request.url)
        route.abort()

    def console(message: ConsoleMessage) -> None:
        opened.console.append((message.type, message.text))  # CSP violations land here

    def dialog(d: Any) -> None:
        opened.dialogs.append(d.message)  # an alert() that escaped escaping
        d.dismiss()

    page.route("**/*", guard)
    page.on("console", console)
    page.on("pageerror", lambda e: opened.errors.append(str(e)))
    page.on("dialog", dialog)
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    page.goto(url, timeout=LOAD_TIMEOUT_MS, wait_until="load")
    return opened


def expect(locator: Locator) -> LocatorAssertions:
    """Playwright's `expect` (waits, bounded by its timeout), imported only once a test runs: a
    missing Playwright then fails through require_browser, not at collection."""
    from playwright.sync_api import expect as playwright_expect  # noqa: PLC0415

    return playwright_expect(locator)
