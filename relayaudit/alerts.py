"""Delivers alerts from the durable outbox to command, webhook and email hooks, retrying with backoff."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.policy
import hashlib
import hmac
import json
import os
import random
import re
import signal
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any
from urllib.parse import SplitResult, quote, quote_plus, urlsplit

import aiosmtplib
import structlog

from relayaudit import child_environment
from relayaudit.alert_doc import (
    AlertFormat,
    alert_document,
    alert_v2,
    carries,
    remediation_context,
    render_payload,
    sample_alert,
)
from relayaudit.config import (
    IDEMPOTENCY_VARIABLE,
    AlertsConfig,
    CommandHook,
    EmailHook,
    HookTemplate,
    WebhookHook,
)
from relayaudit.errors import ConfigError, RelayAuditError, StateError
from relayaudit.evidence import endpoint
from relayaudit.records import Transition
from relayaudit.remediation import advice_text
from relayaudit.state import Alert, OutboxItem, StateStore
from relayaudit.templating import TemplateError, render_template
from relayaudit.text import clip, utc_time, visible
from relayaudit.verdict import Owner

__all__ = [
    "DeliveryError",
    "Dispatcher",
    "channel_names",
    "deliver_command",
    "deliver_email",
    "deliver_webhook",
    "email_message",
    "email_subject",
    "owner_copy",
    "render_payload",
    "sign",
]

log = structlog.get_logger("relayaudit.alerts")


_USER_AGENT = "relayaudit-alerts/1"
_MAX_HEADER_LINES = 100  # a response with more is not a webhook receiver we understand
_MAX_INTERIM = 5  # 1xx responses tolerated before the final one
_ERROR_BODY = 200  # bytes of an error response quoted in the failure message
_SUBJECT = 200  # characters of the default Subject
# headers unfolded up to RFC 5322's 998: a folded Subject can split a ticket system's tag
# (`[rt.campus.example #12]`), which its mail gateway then does not recognise
_MAIL_POLICY = email.policy.default.clone(max_line_length=998)
_RESPONSE_BODY = 64 * 1024  # bytes of a 2xx response read (for the ticket's id)
_BODY_WAIT = 2.0  # seconds to read a response body after its headers
_LINE_LIMIT = 64 * 1024  # bytes of one response line (status, header, chunk size)
# a ticket id as later URLs may carry it: RT's "12", Jira's "ISO-12", TheHive's "~40964176",
# a ServiceNow sys_id
_TICKET_REF = re.compile(r"^[A-Za-z0-9._~:-]{1,200}$")
_KILL_WAIT = 5.0  # seconds to reap a command after SIGKILL
_HEADER_SAFE = re.compile(r"^[\x20-\x7e]+$")  # printable ASCII: nothing that could split a header


class DeliveryError(RelayAuditError):
    """One delivery attempt failed; the message is safe to log (it never contains a secret)."""

    def __init__(
        self, message: str, *, status: int | None = None, returncode: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status  # HTTP status, for webhooks
        self.returncode = returncode  # the command's exit code, for commands


def _written_forms(secret: str) -> set[str]:
    """The secret as it may travel: itself, base64 (standard and URL-safe, with and without
    padding: SMTP AUTH, HTTP Basic, JWT-style) and percent-encoded (in a URL or a form)."""
    forms = {secret}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(secret.encode()).decode("ascii")
        forms |= {encoded, encoded.rstrip("=")}
    for safe in ("", "/"):
        forms |= {quote(secret, safe=safe), quote_plus(secret, safe=safe)}
    return forms


def _scrub(text: str, secrets: Iterable[str]) -> str:
    # belt and braces: messages are built without secrets, but a receiver or a library may echo
    # one, in the form it was sent in (a 535 reply quoting the AUTH PLAIN line, say)
    forms = {form for secret in secrets if secret for form in _written_forms(secret)}
    # longest first: a shorter form (the unpadded base64) must not leave a longer one's tail
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _hook_secrets(hook: WebhookHook | EmailHook | CommandHook) -> list[str]:
    if isinstance(hook, WebhookHook):
        # the path and query of a webhook URL are often a credential (Slack-style): a receiver
        # quoting the request line in its error page must not put them in our logs
        url = urlsplit(hook.url)
        in_url = [part for part in (url.path, url.query) if len(part) > 1]
        return [
            *(s.get_secret_value() for s in (hook.token, hook.hmac_key) if s is not None),
            *in_url,
        ]
    if isinstance(hook, EmailHook) and hook.password is not None:
        password = hook.password.get_secret_value()
        if hook.username is None:
            return [password]
        # AUTH PLAIN sends one base64 of authzid NUL authcid NUL password; aiosmtplib leaves the
        # authzid empty, other clients repeat the user: neither string may be logged
        user = hook.username
        return [password, f"\0{user}\0{password}", f"{user}\0{user}\0{password}"]
    return []


def _printable(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


# -- payload -----------------------------------------------------------------------------------


def sign(key: str, payload: bytes) -> str:
    """The `X-Relayaudit-Signature` value: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()


# -- command -----------------------------------------------------------------------------------


async def deliver_command(hook: CommandHook, payload: bytes, key: str) -> None:
    """Run the hook's program with the payload on stdin; exit 0 within the timeout = delivered.

    The program sees PATH, LANG, TZ and the variables `hook.env` names (from the daemon's
    environment), and the alert's idempotency key as RELAYAUDIT_IDEMPOTENCY_KEY: delivery is at
    least once (a daemon killed mid-run runs it again), so a program dedupes on it.
    """
    name = os.path.basename(hook.argv[0])  # never the arguments: they may carry a credential
    env = child_environment(hook.env)
    env[IDEMPOTENCY_VARIABLE] = key
    try:
        proc = await asyncio.create_subprocess_exec(
            *hook.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills its children too
            env=env,
        )
    except OSError as exc:
        raise DeliveryError(f"command {name!r}: cannot start: {exc.strerror}") from None
    try:
        async with asyncio.timeout(hook.timeout):
            _, stderr = await proc.communicate(payload)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT):
                await proc.wait()
        raise DeliveryError(
            f"command {name!r}: no exit within {hook.timeout:g}s (killed)"
        ) from None
    except BaseException:
        # cancelled (shutdown): do not leave the child running unsupervised
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 0:
        detail = _printable(stderr, _ERROR_BODY)
        raise DeliveryError(
            f"command {name!r} exited {proc.returncode}" + (f": {detail}" if detail else ""),
            returncode=proc.returncode,
        )


# -- webhook -----------------------------------------------------------------------------------
#
# A small HTTP/1.1 client instead of httpx: a webhook needs one POST and the status line, over
# plain TCP or TLS; asyncio already gives both with deadlines, and owning the few lines of
# protocol means no third-party exception text (which may quote headers or URLs) reaches logs.
# Not supported, deliberately: redirects (a POST must not wander), proxies, HTTP/2.


def _origin(url: SplitResult) -> str:
    # the path and query of a webhook URL are often a credential themselves (Slack-style URLs)
    host = url.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{host}:{port}"


async def _http_request(
    url: SplitResult, method: str, headers: list[tuple[str, str]], payload: bytes
) -> tuple[int, str, bytes]:
    """One request; (final status, reason, body): up to _RESPONSE_BODY bytes of a 2xx body (a
    ticket system's answer to a create holds the ticket's id), the start of any other body."""
    host = url.hostname or ""
    https = url.scheme == "https"
    port = url.port or (443 if https else 80)
    context = ssl.create_default_context() if https else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None, limit=_LINE_LIMIT
    )
    try:
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        authority = f"[{host}]" if ":" in host else host
        if url.port is not None:
            authority += f":{url.port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"Content-Length: {len(payload)}", "Connection: close"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        for _ in range(_MAX_INTERIM + 1):
            status, reason = _status_line(await reader.readline())
            length, chunked = await _read_headers(reader)
            if status >= 200:
                break
        else:
            raise DeliveryError("too many interim (1xx) responses")
        ok = 200 <= status < 300
        body = b""
        if length != 0 and method != "HEAD" and status not in (204, 304):
            # a server that keeps the connection open must not hold us past a short grace
            with contextlib.suppress(TimeoutError, OSError, EOFError, ValueError):
                async with asyncio.timeout(_BODY_WAIT):
                    limit = _RESPONSE_BODY if ok else _ERROR_BODY
                    body = await (_read_chunked(reader, limit) if chunked else reader.read(limit))
        return status, reason, body
    finally:
        writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


def _status_line(line: bytes) -> tuple[int, str]:
    if not line:
        raise DeliveryError("connection closed before a response")
    match = re.match(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n?$", line)
    if match is None:
        raise DeliveryError(f"not an HTTP response: {_printable(line, 60)!r}")
    return int(match.group(1)), (match.group(2) or b"").decode("latin-1")


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int | None, bool]:
    """Consume the header block; (Content-Length if given, whether the body is chunked)."""
    length: int | None = None
    chunked = False
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return length, chunked
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            chunked = True
    raise DeliveryError(f"more than {_MAX_HEADER_LINES} response header lines")


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    """A chunked body (RFC 9112, section 7.1), at most `limit` bytes of it."""
    body = bytearray()
    while len(body) < limit:
        size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        want = min(size, limit - len(body))
        body += await reader.readexactly(want)
        if want < size:
            break  # the rest is beyond the limit: not read
        await reader.readexactly(2)  # the CRLF after the chunk
    return bytes(body)


def _auth_headers(hook: WebhookHook, payload: bytes) -> list[tuple[str, str]]:
    headers = []
    if hook.token is not None:
        headers.append(("Authorization", f"{hook.token_scheme} {hook.token.get_secret_value()}"))
    if hook.username is not None and hook.password is not None:
        basic = f"{hook.username}:{hook.password.get_secret_value()}".encode()
        headers.append(("Authorization", f"Basic {base64.b64encode(basic).decode('ascii')}"))
    if hook.hmac_key is not None:
        headers.append(("X-Relayaudit-Signature", sign(hook.hmac_key.get_secret_value(), payload)))
    return headers


async def webhook_request(
    hook: WebhookHook,
    payload: bytes,
    key: str,
    *,
    method: str | None = None,
    url: str | None = None,
) -> bytes:
    """Send `payload` to the hook (or to `url` with `method`); any 2xx = delivered, and its body
    returned; anything else raises DeliveryError (and is retried)."""
    parts = urlsplit(url or hook.url)
    origin = _origin(parts)
    secrets = _hook_secrets(hook)
    if parts.username is not None or parts.password is not None:
        raise DeliveryError(
            f"webhook {origin}: credentials in the URL are not supported; use token"
        )
    headers = [
        ("User-Agent", _USER_AGENT),
        ("Content-Type", hook.content_type),
        ("Accept", "application/json, */*"),
        ("Idempotency-Key", key),
        *_auth_headers(hook, payload),
    ]
    for name, value in headers:
        if not _HEADER_SAFE.match(value):
            raise DeliveryError(
                f"webhook {origin}: the {name} header value has forbidden characters"
            )
    failure: str | None = None
    try:
        async with asyncio.timeout(hook.timeout):
            status, reason, body = await _http_request(
                parts, method or hook.method, headers, payload
            )
    except TimeoutError:
        failure = f"webhook {origin}: no answer within {hook.timeout:g}s"
    except DeliveryError as exc:
        failure = _scrub(f"webhook {origin}: {exc}", secrets)
    except (OSError, EOFError, ValueError) as exc:
        # OSError covers refused, reset, unreachable and TLS failures; ValueError an over-long line
        what = (
            exc.strerror
            if isinstance(exc, OSError) and exc.strerror
            else str(exc) or type(exc).__name__
        )
        failure = _scrub(f"webhook {origin}: {what}", secrets)
    if failure is not None:
        # raised outside the handler, so the original (unscrubbed) error is not its __context__
        raise DeliveryError(failure)
    if 200 <= status < 300:
        return body
    message = f"webhook {origin}: HTTP {status} {_printable(reason.encode(), 80)}".rstrip()
    if 400 <= status < 500 and status not in (408, 429):
        # usually a wrong URL or credential; retried anyway, since receivers get fixed
        message += " (client error: check the URL, the credentials and the body a template renders; will retry)"
    detail = _printable(body, _ERROR_BODY)
    if detail:
        message += f": {detail}"
    raise DeliveryError(_scrub(message, secrets), status=status)


async def deliver_webhook(hook: WebhookHook, payload: bytes, key: str) -> None:
    """POST the payload to the hook's URL; any 2xx = delivered (see webhook_request)."""
    await webhook_request(hook, payload, key)


def json_pointer(document: object, pointer: str) -> object:
    """The value at an RFC 6901 JSON pointer ("/id", "/data/0/key"); KeyError if absent."""
    value = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            raise KeyError(pointer)
    return value


def ticket_ref_of(body: bytes, pointer: str) -> str:
    """The ticket reference in a create call's response; DeliveryError-free: ValueError if none."""
    try:
        value = json_pointer(json.loads(body), pointer)
    except (ValueError, KeyError):
        raise ValueError(f"no {pointer} in the response ({_printable(body, 80)!r})") from None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{pointer} in the response is not a string or a number")
    ref = str(value)
    if not _TICKET_REF.match(ref):
        # it goes into later URLs: nothing that could add a path segment or a query
        raise ValueError(
            f"{pointer} in the response is not a usable id: {_printable(ref.encode(), 60)!r}"
        )
    return ref


# -- email -------------------------------------------------------------------------------------


def email_subject(alert: Alert) -> str:
    """The default Subject: a stable tag per finding, so every mail of one finding sorts
    together (`[relayaudit ra-…] RESOLVED: Open relay on …`)."""
    f = alert.finding
    return clip(
        visible(f"[relayaudit {f.id}] {alert.transition.value.upper()}: {f.title}"), _SUBJECT
    )


def thread_id(finding_id: str, domain: str) -> str:
    """The Message-ID of a finding's first alert: every later one refers to it."""
    return f"<relayaudit.{finding_id}@{domain}>"


def email_message(
    hook: EmailHook,
    alert: Alert,
    payload: bytes,
    *,
    subject: str | None = None,
    body: str | None = None,
) -> EmailMessage:
    """A readable summary on top, the alert JSON below (or `body`, a template's text).

    Threading: the finding's first alert (transition new, seq 1) gets the Message-ID
    `thread_id`; every later alert gets its own (from its idempotency key, so a resend repeats
    it and a gateway can drop the repeat) and In-Reply-To/References the first, so a mail
    client shows one conversation per finding. People read this: each summary line passes
    `visible` and the JSON is ASCII (`\\uNNNN`), so server text quoted in the finding can
    neither add a line nor reorder one in a mail reader.
    """
    f = alert.finding
    domain = hook.mail_from.rpartition("@")[2] or "relayaudit.invalid"
    msg = EmailMessage(policy=_MAIL_POLICY)
    msg["From"] = hook.mail_from
    msg["To"] = ", ".join(hook.to)
    copied = owner_copy(hook, alert)
    if copied is not None:
        msg["Cc"] = copied
    msg["Subject"] = " ".join(visible(subject).split()) if subject else email_subject(alert)
    msg["Date"] = format_datetime(alert.created.astimezone(UTC))
    root = thread_id(f.id, domain)
    if alert.transition is Transition.NEW and alert.seq == 1:
        msg["Message-ID"] = root
    else:
        local = alert.key.replace("/", ".")
        msg["Message-ID"] = f"<relayaudit.{local}@{domain}>"
        msg["In-Reply-To"] = root
        msg["References"] = root
    msg["X-Relayaudit-Idempotency-Key"] = alert.key
    msg["X-Relayaudit-Finding"] = f.id
    msg["Auto-Submitted"] = "auto-generated"
    if body is not None:
        msg.set_content(body)
        return msg
    doc = alert_v2(alert)
    summary = [
        f"{alert.transition.value.upper()}: {doc.title}",
        "",
        f"Finding:     {f.id} ({f.kind.value})",
        f"Where:       {doc.endpoint} (seen from {f.vantage})",
        f"Severity:    {f.severity.value} (confidence {f.confidence.value})",
        *([f"Owner:       {_owner_line(f.owner)}"] if f.owner else []),
        *(
            [f"Owner until now: {_owner_line(alert.previous_owner)}"]
            if alert.previous_owner
            else []
        ),
        f"First seen:  {utc_time(doc.first_seen)}",
        f"Last seen:   {utc_time(doc.last_seen)}",
        *([f"Resolved:    {utc_time(doc.resolved_at)}"] if doc.resolved_at else []),
        f"Sweep:       {alert.sweep_id}",
        f"Alert key:   {alert.key}",
        "",
        doc.summary,
    ]
    if f.approved_note:
        summary += ["", f"Approved service note: {f.approved_note}"]
    if f.remediation is not None:
        summary += ["", *advice_text(f.remediation, width=76).splitlines()]
    summary += ["", f"The whole finding: {doc.show}"]
    try:
        pretty = json.dumps(json.loads(payload), indent=2)
    except ValueError:
        pretty = payload.decode("utf-8", "replace")
    text = "\n".join(visible(line) for line in summary) + "\n\n-- the alert as JSON --\n" + pretty
    msg.set_content(text + "\n")
    return msg


def _owner_line(owner: Owner) -> str:
    queue = f", queue {owner.queue}" if owner.queue else ""
    return f"{owner.name} <{owner.contact}>{queue}"


def owner_copy(hook: EmailHook, alert: Alert) -> str | None:
    """The owner's contact, when the hook copies owners (`cc_owner`), the finding has one, and
    the hook does not already mail it."""
    owner = alert.finding.owner
    if not hook.cc_owner or owner is None:
        return None
    if owner.contact.lower() in {to.lower() for to in hook.to}:
        return None
    return owner.contact


async def deliver_email(
    hook: EmailHook,
    alert: Alert,
    payload: bytes,
    *,
    subject: str | None = None,
    body: str | None = None,
) -> None:
    """Send one message to the gateway; accepted by the gateway for every recipient = delivered."""
    where = f"email {endpoint(hook.host, hook.port)}"
    secrets = _hook_secrets(hook)
    message = email_message(hook, alert, payload, subject=subject, body=body)
    copied = owner_copy(hook, alert)
    recipients = [*hook.to, *([copied] if copied is not None else [])]
    failure: str | None
    try:
        async with asyncio.timeout(hook.timeout):
            errors, _ = await aiosmtplib.send(
                # flattened here: aiosmtplib would refold the headers at 78 characters
                message.as_bytes(policy=_MAIL_POLICY.clone(linesep="\r\n")),
                sender=hook.mail_from,
                recipients=recipients,
                hostname=hook.host,
                port=hook.port,
                use_tls=hook.tls == "implicit",
                # True requires STARTTLS: aiosmtplib raises before AUTH or MAIL if the gateway
                # does not offer it (or its certificate does not verify). False, not None, for
                # "none" and "implicit": None would upgrade opportunistically
                start_tls=hook.tls == "starttls",
                username=hook.username,
                password=hook.password.get_secret_value() if hook.password is not None else None,
                timeout=hook.timeout,
            )
    except TimeoutError:
        failure = f"{where}: no answer within {hook.timeout:g}s"
    except aiosmtplib.SMTPException as exc:
        failure = _scrub(f"{where}: {type(exc).__name__}: {exc}", secrets)
    except OSError as exc:
        failure = _scrub(f"{where}: {exc.strerror or exc}", secrets)
    else:
        failure = None
    if failure is not None:
        # raised outside the handler: aiosmtplib's exception quotes the server's reply (which may
        # quote the password back) and would otherwise stay attached as __context__
        raise DeliveryError(failure)
    if errors:
        refused = ", ".join(f"{r}: {e.code}" for r, e in errors.items())
        raise DeliveryError(_scrub(f"{where}: recipients refused ({refused})", secrets))


# -- dispatcher --------------------------------------------------------------------------------


def channel_names(config: AlertsConfig) -> list[str]:
    """The outbox channel of each configured hook: its name (what the store queues for)."""
    return [name for name, _ in config.hooks()]


class _Channel:
    """One hook as the dispatcher uses it: renders what it sends, sends it, and says which
    ticket a create call opened (the dispatcher keeps it for the finding's later alerts)."""

    def __init__(self, name: str, hook: CommandHook | WebhookHook | EmailHook, fmt: AlertFormat):
        self.name, self.hook, self.format = name, hook, fmt

    def context(self, alert: Alert, tickets: Mapping[str, str]) -> dict[str, Any]:
        """What templates see (docs/alerts.md lists it)."""
        return {
            "alert": alert_v2(alert).model_dump(mode="json"),
            # null where the format cannot say the transition (owner-changed in v1 or full)
            "document": alert_document(alert, self.format)
            if carries(self.format, alert.transition)
            else None,
            "remediation": remediation_context(alert.finding.remediation),
            "transition": alert.transition.value,
            "ticket_ref": tickets.get(self.name),
            "tickets": dict(tickets),
            "hook": self.name,
            "vars": dict(self.hook.vars),
        }

    def render(self, text: str, name: str, context: Mapping[str, Any]) -> str:
        try:
            return render_template(text, name, context)
        except TemplateError as exc:
            raise DeliveryError(f"{self.name}: template {exc}") from None

    def body(
        self, template: HookTemplate | None, alert: Alert, context: Mapping[str, Any]
    ) -> bytes:
        if template is None:
            return render_payload(alert, self.format)
        return self.render(template.text, template.path, context).encode()

    def skips(self, alert: Alert, tickets: Mapping[str, str]) -> bool:
        """Whether the hook is not sent `alert`: it would send the v1 or full document as it is
        (no template for this call), and that document cannot say the transition."""
        if carries(self.format, alert.transition) or isinstance(self.hook, EmailHook):
            return False  # a mail is read by people: its JSON part is the v2 alert then
        if isinstance(self.hook, CommandHook):
            return self.hook.template is None
        return self._call(self.hook, alert, tickets)[3] is None

    async def send(self, alert: Alert, tickets: Mapping[str, str]) -> str | None:
        """Deliver `alert`; the ticket reference a create call returned, if the hook keeps one."""
        hook = self.hook
        context = self.context(alert, tickets)
        if isinstance(hook, CommandHook):
            await deliver_command(hook, self.body(hook.template, alert, context), alert.key)
            return None
        if isinstance(hook, EmailHook):
            subject = (
                self.render(hook.subject_template, "subject_template", context)
                if hook.subject_template
                else None
            )
            body = (
                self.render(hook.template.text, hook.template.path, context)
                if hook.template
                else None
            )
            fmt = self.format if carries(self.format, alert.transition) else "v2"
            payload = render_payload(alert, fmt)
            await deliver_email(hook, alert, payload, subject=subject, body=body)
            return None
        return await self._webhook(hook, alert, tickets, context)

    async def _webhook(
        self,
        hook: WebhookHook,
        alert: Alert,
        tickets: Mapping[str, str],
        context: Mapping[str, Any],
    ) -> str | None:
        creating, method, url, template = self._call(hook, alert, tickets)
        if "{" in url:
            url = self.render(url, f"{self.name} url", context)
        answer = await webhook_request(
            hook, self.body(template, alert, context), alert.key, method=method, url=url
        )
        if not creating:
            return None
        assert hook.ticket_ref is not None
        try:
            return ticket_ref_of(answer, hook.ticket_ref)
        except ValueError as exc:
            # created: a retry would open a second ticket. Later alerts create again instead
            log.error("alert.ticket_ref_missing", key=alert.key, channel=self.name, error=str(exc))
            return None

    def _call(
        self, hook: WebhookHook, alert: Alert, tickets: Mapping[str, str]
    ) -> tuple[bool, str, str, HookTemplate | None]:
        """(whether it creates the ticket, method, URL, template) of the call `alert` makes."""
        ref = tickets.get(self.name)
        creating = hook.ticket_ref is not None and ref is None
        method, url, template = hook.method, hook.url, hook.template
        if not creating and ref is not None:
            # the ticket exists: a resolved finding resolves it, an owner-changed one moves it,
            # any other transition updates it
            if alert.transition is Transition.RESOLVED and hook.resolve_url:
                method, url = hook.resolve_method, hook.resolve_url
                template = hook.resolve_template or hook.update_template or hook.template
            elif alert.transition is Transition.OWNER_CHANGED and hook.move_url:
                method, url = hook.move_method, hook.move_url
                template = hook.move_template or hook.update_template or hook.template
            elif hook.update_url:
                method, url = hook.update_method, hook.update_url
                template = hook.update_template or hook.template
        return creating, method, url, template


class _AnyTicket(dict[str, str]):
    """`tickets` when templates are tried at load: every hook has a (made-up) ticket."""

    def __missing__(self, key: str) -> str:
        return "1"


def check_templates(config: AlertsConfig) -> None:
    """Render every hook's templates once per transition with a sample alert (load time), so a
    template that fails on a missing `vars.NAME`, or renders a JSON body that is not JSON, is a
    config error now, naming the hook and the file and line, instead of dead letters later."""
    for kind in ("command", "webhook", "email"):
        for i, hook in enumerate(getattr(config, kind)):
            channel = _Channel(hook.name or kind, hook, config.format)
            for transition in Transition:
                context = {
                    "alert": sample_alert(transition).model_dump(mode="json"),
                    "document": sample_alert(transition).model_dump(mode="json"),
                    "remediation": remediation_context(sample_alert(transition).remediation),
                    "transition": transition.value,
                    "ticket_ref": "1",
                    "tickets": _AnyTicket(),
                    "hook": channel.name,
                    "vars": dict(hook.vars),
                }
                for key, text, name in _templates_of(hook):
                    try:
                        rendered = render_template(text, name, context)
                    except TemplateError as exc:
                        raise ConfigError(
                            f"alerts.{kind}[{i}].{key}: template {exc} (tried on a sample "
                            f"{transition.value} alert)"
                        ) from None
                    json_body = (
                        isinstance(hook, WebhookHook)
                        and key.endswith("template")
                        and hook.content_type.split(";")[0].strip().endswith("json")
                    )
                    if json_body:
                        try:
                            json.loads(rendered)
                        except ValueError as exc:
                            raise ConfigError(
                                f"alerts.{kind}[{i}].{key}: template {name} renders no JSON for "
                                f"a sample {transition.value} alert ({exc})"
                            ) from None


def _templates_of(hook: CommandHook | WebhookHook | EmailHook) -> list[tuple[str, str, str]]:
    """(config key, text, name) of every template a hook has, URL templates included."""
    found = []
    for key in ("template", "update_template", "resolve_template", "move_template"):
        template = getattr(hook, key, None)
        if isinstance(template, HookTemplate):
            found.append((key, template.text, template.path))
    for key in ("url", "update_url", "resolve_url", "move_url", "subject_template"):
        text = getattr(hook, key, None)
        if isinstance(text, str) and "{" in text:
            found.append((key, text, key))
    return found


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """The delivery worker: moves due outbox items to their channels until told to stop.

    All progress lives in the store, so a new Dispatcher after a restart carries on where the old
    one stopped; an item interrupted mid-delivery stays pending and goes again with the same key.
    """

    def __init__(
        self,
        store: StateStore,
        config: AlertsConfig,
        *,
        clock: Callable[[], datetime] = _utcnow,
        poll_interval: float = 0.5,
        batch: int = 50,
        rng: random.Random | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self._on_change = on_change  # after a pass in which a delivery succeeded or died
        self.config = config
        self._clock = clock
        self._poll = poll_interval
        self._batch = batch
        self._rng = rng or random.Random()
        self.channels: dict[str, _Channel] = {
            name: _Channel(name, hook, config.format) for name, hook in config.hooks()
        }
        self._secrets = [s for _, hook in config.hooks() for s in _hook_secrets(hook)]
        # a store written by relayaudit 0.1 queued for `webhook:0`: those deliveries follow
        # their hook's name now (hooks matched by kind and position in this config)
        moved = store.rename_channels(config.legacy_channels())
        if moved:
            log.info("alert.channels_renamed", deliveries=moved)
        store.set_channels(self.channels)  # so alerts recorded from now on are queued for these
        self.sent = 0
        self.retried = 0
        self.dead = 0

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` earlier failures (plus up to 10% jitter)."""
        base = min(self.config.backoff_max, self.config.backoff_initial * 2.0 ** min(attempts, 60))
        # jitter spreads retries of many items failed by one outage, so they do not return in step
        return base * self._rng.uniform(1.0, 1.1)

    async def run_once(self) -> int:
        """One pass over every channel; returns how many deliveries succeeded."""
        before = (self.sent, self.dead)
        results = await asyncio.gather(
            *(self._pass(name, send) for name, send in self.channels.items()),
            return_exceptions=True,
        )
        if (self.sent, self.dead) != before and self._on_change is not None:
            await self._on_change()  # the outbox gauges move now, not when the next sweep ends
        for result in results:
            if isinstance(result, BaseException):
                raise result  # a StateError: the daemon decides; items stay pending in the file
        return sum(r for r in results if isinstance(r, int))

    async def _pass(self, channel: str, send: _Channel) -> int:
        items = await asyncio.to_thread(self.store.due, channel, self._clock(), self._batch)
        delivered = 0
        for item in items:
            if not await self._attempt(channel, send, item):
                # the receiver probably is down: one failure per pass, not one timeout per item
                break
            delivered += 1
        return delivered

    async def _attempt(self, channel: str, send: _Channel, item: OutboxItem) -> bool:
        alert = item.alert
        try:
            tickets = await asyncio.to_thread(self.store.ticket_refs, alert.finding.id)
            if send.skips(alert, tickets):
                await asyncio.to_thread(self.store.delivered, item)
                log.info(
                    "alert.skipped",
                    key=alert.key,
                    channel=channel,
                    transition=alert.transition.value,
                    reason=f"the {send.format} document cannot say {alert.transition.value}",
                )
                return True
            ref = await send.send(alert, tickets)
            if ref is not None:
                # kept before the delivery is marked sent: a crash in between resends the
                # create under the same idempotency key, never an update to a lost ticket
                await asyncio.to_thread(self.store.set_ticket_ref, alert.finding.id, channel, ref)
                log.info("alert.ticket", key=alert.key, channel=channel, ticket_ref=ref)
        except StateError:
            raise  # the store, not the hook: the daemon decides (see run)
        except Exception as exc:  # any failure of a hook is a retry, never a lost alert
            text = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
            error = _scrub(text, self._secrets)
            attempts = item.attempts + 1
            dead = attempts >= self.config.max_attempts
            delay = self.backoff(item.attempts)
            await asyncio.to_thread(
                self.store.failed,
                item,
                error,
                next_attempt=self._clock() + timedelta(seconds=delay),
                dead=dead,
            )
            if dead:
                self.dead += 1
                log.error(
                    "alert.dead", key=alert.key, channel=channel, attempts=attempts, error=error
                )
            else:
                self.retried += 1
                log.warning(
                    "alert.retry",
                    key=alert.key,
                    channel=channel,
                    attempts=attempts,
                    retry_in=round(delay, 3),
                    error=error,
                )
            return False
        await asyncio.to_thread(self.store.delivered, item)
        self.sent += 1
        log.info(
            "alert.delivered",
            key=alert.key,
            channel=channel,
            transition=alert.transition.value,
            attempts=item.attempts + 1,
        )
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set; sleeps `poll_interval` whenever a pass delivered nothing.

        A StateError (the store locked past its busy timeout, a full disk) costs one pass, not
        the dispatcher: the items stay pending in the file and the next pass tries again.
        """
        while not stop.is_set():
            try:
                delivered = await self.run_once()
            except StateError as exc:
                log.error("alert.store_error", error=str(exc))
                delivered = 0
            if delivered == 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll):
                        await stop.wait()

    async def drain(self, timeout: float) -> int:
        """At shutdown: deliver what is due now, for at most `timeout` s; returns items left pending."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for _ in range(100_000):  # bounded by count too; each pass delivers at least one
                    if await self.run_once() == 0:
                        break
        return (await asyncio.to_thread(self.store.outbox_counts))["pending"]
