"""Shared pytest fixtures; `postfix_lab` runs real Postfix instances (see tests/postfix_lab.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from postfix_lab import (
    PostfixInstance,
    make_lab_directory,
    postfix_available,
    start_lab,
    stop_lab,
)


@pytest.fixture(scope="session")
def postfix_lab() -> Iterator[dict[str, PostfixInstance]]:
    """One running Postfix per policy, keyed by policy name; skipped (or failed) without Postfix.

    With RELAYAUDIT_REQUIRE_POSTFIX=1 (set by scripts/test, hence CI) a missing Postfix is an
    error, so a broken install can never turn into a green run of skipped tests.
    """
    reason = postfix_available()
    if reason is not None:
        if os.environ.get("RELAYAUDIT_REQUIRE_POSTFIX") == "1":
            pytest.fail(f"RELAYAUDIT_REQUIRE_POSTFIX=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    base = make_lab_directory()
    instances = start_lab(base)  # on failure it stops what it started and keeps BASE's logs
    try:
        yield instances
    finally:
        stop_lab(instances)
        shutil.rmtree(base, ignore_errors=True)
