"""The RT lab itself: REST2 with a token, rt-mailgate threading, and reset to a pristine RT."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from rt_lab import RtLabError, RtServer

pytestmark = pytest.mark.rt


def _mail(subject: str, message_id: str, body: str, *, in_reply_to: str | None = None) -> bytes:
    headers = [
        "From: alerts@example.test",
        "To: rt@rt.example.test",
        f"Subject: {subject}",
        f"Message-ID: <{message_id}>",
    ]
    if in_reply_to is not None:
        headers += [f"In-Reply-To: <{in_reply_to}>", f"References: <{in_reply_to}>"]
    return ("\n".join(headers) + "\n\n" + body + "\n").encode()


def _create(rt: RtServer, subject: str) -> int:
    status, created = rt.request(
        "POST",
        "/ticket",
        {
            "Subject": subject,
            "Queue": rt.queue,
            "Content": "alert fired",
            "Requestor": "alerts@example.test",
        },
    )
    assert status == 201, created
    return int(created["id"])  # a string here, an integer when the ticket is read back


def test_rest2_ticket_created_commented_resolved_with_the_token(
    rt: RtServer, loopback_only: None
) -> None:
    ticket_id = _create(rt, "disk full on db1")
    assert ticket_id == 1  # reset: ids start again at 1

    status, answer = rt.request(
        "POST",
        f"/ticket/{ticket_id}/comment",
        {"Content": "still firing", "ContentType": "text/plain"},
    )
    assert (status, answer) == (201, ["Comments added"])
    status, answer = rt.request("PUT", f"/ticket/{ticket_id}", {"Status": "resolved"})
    assert status == 200, answer

    status, ticket = rt.request("GET", f"/ticket/{ticket_id}")
    assert status == 200
    assert (ticket["id"], ticket["Subject"], ticket["Status"]) == (
        1,
        "disk full on db1",
        "resolved",
    )
    assert rt.tickets() == [(1, "disk full on db1", "resolved")]
    history = rt.history(ticket_id)
    assert history[0] == "Create"
    assert {"Comment", "Status"} <= set(history)

    assert rt.request("GET", f"/ticket/{ticket_id}", auth="basic")[0] == 200
    assert rt.request("GET", f"/ticket/{ticket_id}", auth="none") == (
        401,
        {"message": "Unauthorized"},
    )


def test_mail_with_the_subject_tag_lands_on_the_ticket(rt: RtServer) -> None:
    ticket_id = _create(rt, "CPU high on web3")
    reply = _mail(
        f"Re: [{rt.rtname} #{ticket_id}] CPU high on web3", "a2@example.test", "still 97%"
    )

    result = rt.mailgate(reply)

    assert result.accepted, result.stderr
    assert rt.tickets() == [(ticket_id, "CPU high on web3", "open")]  # Correspond: new -> open
    assert "Correspond" in rt.history(ticket_id)


def test_in_reply_to_and_references_alone_open_a_new_ticket(rt: RtServer) -> None:
    first = rt.mailgate(_mail("CPU high on web3", "a1@example.test", "CPU 98%"))
    assert first.accepted, first.stderr
    assert rt.tickets() == [(1, "CPU high on web3", "new")]
    autoreplies = [m["Subject"] for m in rt.sent_mail()]
    assert autoreplies == [f"[{rt.rtname} #1] AutoReply: CPU high on web3"]

    reply = _mail(
        "Re: CPU high on web3", "a3@example.test", "headers only", in_reply_to="a1@example.test"
    )
    assert rt.mailgate(reply).accepted

    # RT threads mail by its subject tag only, and only by a tag with its own rtname
    foreign = _mail("Re: [example.com #1] CPU high on web3", "a4@example.test", "other tag")
    assert rt.mailgate(foreign).accepted
    assert rt.tickets() == [
        (1, "CPU high on web3", "new"),
        (2, "Re: CPU high on web3", "new"),
        (3, "Re: [example.com #1] CPU high on web3", "new"),
    ]


def test_a_refused_mail_still_exits_0(rt: RtServer) -> None:
    ticket_id = _create(rt, "disk full on db1")
    before = rt.history(ticket_id)
    comment = _mail(f"[{rt.rtname} #{ticket_id}] disk", "c1@example.test", "a comment")

    result = rt.mailgate(comment, action="comment")  # Everyone may reply, not comment

    assert result.returncode == 0
    assert not result.accepted
    assert result.answer == "not ok - operation unsuccessful"
    assert rt.history(ticket_id) == before


def test_reset_brings_back_an_empty_rt(rt_server: RtServer) -> None:
    rt_server.reset()
    _create(rt_server, "first")
    assert rt_server.mailgate(_mail("second", "r1@example.test", "x")).accepted
    assert len(rt_server.tickets()) == 2

    started = time.monotonic()
    rt_server.reset()
    fast_reset = time.monotonic() - started
    assert rt_server.tickets() == []
    assert rt_server.sent_mail() == []
    assert _create(rt_server, "after reset") == 1  # the token survived: it is in the pristine copy

    started = time.monotonic()
    rt_server.reset(restart=True)
    restart_reset = time.monotonic() - started
    assert rt_server.tickets() == []
    assert _create(rt_server, "after restart") == 1

    timings = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in rt_server.timings.items())
    print(
        f"\nRT lab: {timings}; reset {fast_reset:.3f} s; reset(restart=True) {restart_reset:.2f} s"
    )


async def test_rt_server_is_started_from_the_main_thread_only(tmp_path: Path) -> None:
    """A server forked from asyncio.to_thread got SIGTERM when the executor's thread exited
    (PR_SET_PDEATHSIG follows the thread), and the next test's reset met a dead server."""
    server = RtServer(tmp_path)
    with pytest.raises(RtLabError, match="main thread"):
        await asyncio.to_thread(server.start)
    assert not server.running
