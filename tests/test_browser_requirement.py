"""A machine without the browser fails the browser tests, unless RELAYAUDIT_REQUIRE_BROWSER=0."""

from __future__ import annotations

from pathlib import Path

import browser
import pytest


def test_a_missing_browser_fails_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("RELAYAUDIT_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="RELAYAUDIT_REQUIRE_BROWSER=0"):
        browser.require_browser()
    monkeypatch.setenv("RELAYAUDIT_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception):
        browser.require_browser()


def test_the_escape_hatch_turns_it_into_a_skip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("RELAYAUDIT_REQUIRE_BROWSER", "0")
    with pytest.raises(pytest.skip.Exception, match="no Chromium at"):
        browser.require_browser()
