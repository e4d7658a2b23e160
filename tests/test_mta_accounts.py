"""The Exim/OpenSMTPD lab runs whether or not the host already has the accounts the daemons run as.

Each case builds the host's user database as it would be (no MTA account; the three the Debian
packages create; only Debian-exim, left by an Exim installed once; the lab's first free id taken)
in a private mount namespace (tests/host_accounts.py), starts an Exim and an OpenSMTPD there
(tests/mta_session.py) and hands each one message over loopback SMTP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from host_accounts import MTA_ACCOUNTS, debian_account, host_accounts_available, run_with_accounts
from mta_lab import mta_available
from mta_session import BUSY

SESSION = Path(__file__).with_name("mta_session.py")

CASES: dict[str, list[list[str]]] = {
    "no-mta-accounts": [],
    "debian-packages-created-all-three": [debian_account(name) for name in MTA_ACCOUNTS],
    "exim-installed-once": [debian_account("Debian-exim")],
    "first-lab-id-taken": [
        ["groupadd", "--gid", "64990", "lab-squatter"],
        ["useradd", "--uid", "64990", "--gid", "64990", "--no-create-home", "lab-squatter"],
    ],
}

PRESENT = {
    "no-mta-accounts": set(),
    "debian-packages-created-all-three": set(MTA_ACCOUNTS),
    "exim-installed-once": {"Debian-exim"},
    "first-lab-id-taken": set(),
}


def _session(setup: list[list[str]]) -> dict[str, Any]:
    for reason in (host_accounts_available(), mta_available("exim"), mta_available("opensmtpd")):
        if reason is not None:
            pytest.skip(reason)
    done = run_with_accounts([sys.executable, str(SESSION)], setup=setup, timeout=120.0)
    if done.returncode == BUSY:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"mta_session.py exited {done.returncode}:\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("case", list(CASES))
def test_exim_and_opensmtpd_take_a_message_whoever_has_their_accounts(case: str) -> None:
    report = _session(CASES[case])
    host, lab = report["host_accounts"], report["lab_accounts"]
    for name in MTA_ACCOUNTS:
        if host[name] is not None:
            # the account the host has, never a second one under the same name
            assert lab[name] == host[name], (name, report)
        else:
            # ids no host account or group has
            assert report["id_holders"][name] == [None, None], (name, report)
    for kind in ("exim", "opensmtpd"):
        replies = report[kind]["replies"]
        assert [r[:3] for r in replies] == ["220", "250", "250", "250", "250", "221"], replies
        assert report[kind]["delivered"], (kind, report)
    # what each daemon wrote as its own account (Exim's spool and log; OpenSMTPD's queue)
    exim = lab["Debian-exim"]
    assert report["exim"]["owners"] == {"spool/input": exim, "log/mainlog": exim}
    queue_owner = report["opensmtpd"]["owners"]["var-spool/smtpd/queue"]
    assert queue_owner[0] == lab["opensmtpq"][0], report


def test_the_cases_are_what_they_say() -> None:
    """Each case's namespace really has the accounts it names (or lacks them), whatever the host has."""
    if reason := host_accounts_available():
        pytest.skip(reason)
    script = (
        "import grp, json, pwd\n"
        "users = {p.pw_name: p.pw_uid for p in pwd.getpwall()}\n"
        "groups = {g.gr_name: g.gr_gid for g in grp.getgrall()}\n"
        "print(json.dumps([users, groups]))\n"
    )
    for case, setup in CASES.items():
        done = run_with_accounts([sys.executable, "-c", script], setup=setup, timeout=30.0)
        assert done.returncode == 0, done.stderr
        users, groups = json.loads(done.stdout)
        assert {n for n in MTA_ACCOUNTS if n in users} == PRESENT[case], case
        assert {n for n in MTA_ACCOUNTS if n in groups} == PRESENT[case], case
        if case == "first-lab-id-taken":
            assert users["lab-squatter"] == 64990
        if case == "debian-packages-created-all-three":
            # system ids as useradd allocates them, not the lab's own range
            assert all(users[name] < 1000 for name in MTA_ACCOUNTS), users
