"""Delivers alerts from the durable outbox to command, webhook and email hooks, retrying with backoff."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import signal
import ssl
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from urllib.parse import SplitResult, quote, quote_plus, urlsplit

import aiosmtplib
import structlog

from relayaudit import child_environment
from relayaudit.config import (
    IDEMPOTENCY_VARIABLE,
    AlertsConfig,
    CommandHook,
    EmailHook,
    WebhookHook,
)
from relayaudit.errors import RelayAuditError, StateError
from relayaudit.evidence import endpoint
from relayaudit.state import Alert, OutboxItem, StateStore
from relayaudit.text import visible

__all__ = [
    "DeliveryError",
    "Dispatcher",
    "channel_names",
    "deliver_command",
    "deliver_email",
    "deliver_webhook",
    "email_message",
    "email_subject",
    "render_payload",
    "sign",
]

log = structlog.get_logger("relayaudit.alerts")

Deliver = Callable[[Alert, bytes], Awaitable[None]]

_USER_AGENT = "relayaudit-alerts/1"
_MAX_HEADER_LINES = 100  # a response with more is not a webhook receiver we understand
_MAX_INTERIM = 5  # 1xx responses tolerated before the final one
_ERROR_BODY = 200  # bytes of an error response quoted in the failure message
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


def render_payload(alert: Alert) -> bytes:
    """The alert as the JSON document every channel carries (the transcript is the evidence)."""
    doc = {
        "idempotency_key": alert.key,
        "transition": alert.transition.value,
        "sweep_id": alert.sweep_id,
        "created": alert.created.isoformat(),
        "finding": alert.finding.model_dump(mode="json"),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


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


async def _http_post(
    url: SplitResult, headers: list[tuple[str, str]], payload: bytes
) -> tuple[int, str, bytes]:
    """POST and read the final status; returns (status, reason, start of body if not 2xx)."""
    host = url.hostname or ""
    https = url.scheme == "https"
    port = url.port or (443 if https else 80)
    context = ssl.create_default_context() if https else None
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=host if context else None
    )
    try:
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        authority = f"[{host}]" if ":" in host else host
        if url.port is not None:
            authority += f":{url.port}"
        lines = [f"POST {target} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines += [f"Content-Length: {len(payload)}", "Connection: close"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        for _ in range(_MAX_INTERIM + 1):
            status, reason = _status_line(await reader.readline())
            length = await _skip_headers(reader)
            if status >= 200:
                break
        else:
            raise DeliveryError("too many interim (1xx) responses")
        body = b""
        if not 200 <= status < 300 and length != 0:
            # only to quote it in the error; a server that keeps the connection open must not
            # hold us past a short grace period
            with contextlib.suppress(TimeoutError, OSError, EOFError):
                async with asyncio.timeout(1.0):
                    body = await reader.read(_ERROR_BODY)
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


async def _skip_headers(reader: asyncio.StreamReader) -> int | None:
    """Consume the header block; returns Content-Length if given."""
    length: int | None = None
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return length
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    raise DeliveryError(f"more than {_MAX_HEADER_LINES} response header lines")


async def deliver_webhook(hook: WebhookHook, payload: bytes, key: str) -> None:
    """POST the payload; any 2xx = delivered, anything else raises DeliveryError (and is retried)."""
    url = urlsplit(hook.url)
    origin = _origin(url)
    secrets = _hook_secrets(hook)
    if url.username is not None or url.password is not None:
        raise DeliveryError(
            f"webhook {origin}: credentials in the URL are not supported; use token"
        )
    headers = [
        ("User-Agent", _USER_AGENT),
        ("Content-Type", "application/json"),
        ("Accept", "*/*"),
        ("Idempotency-Key", key),
    ]
    if hook.token is not None:
        headers.append(("Authorization", f"Bearer {hook.token.get_secret_value()}"))
    if hook.hmac_key is not None:
        headers.append(("X-Relayaudit-Signature", sign(hook.hmac_key.get_secret_value(), payload)))
    for name, value in headers:
        if not _HEADER_SAFE.match(value):
            raise DeliveryError(
                f"webhook {origin}: the {name} header value has forbidden characters"
            )
    failure: str | None = None
    try:
        async with asyncio.timeout(hook.timeout):
            status, reason, body = await _http_post(url, headers, payload)
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
        return
    message = f"webhook {origin}: HTTP {status} {_printable(reason.encode(), 80)}".rstrip()
    if 400 <= status < 500 and status not in (408, 429):
        # usually a wrong URL or credential; retried anyway, since receivers get fixed
        message += " (client error: check the URL and credentials; will retry)"
    detail = _printable(body, _ERROR_BODY)
    if detail:
        message += f": {detail}"
    raise DeliveryError(_scrub(message, secrets), status=status)


# -- email -------------------------------------------------------------------------------------


def email_subject(alert: Alert) -> str:
    f = alert.finding
    return (
        f"[relayaudit] {alert.transition.value.upper()} {f.kind.value} "
        f"{endpoint(f.address, f.port)} ({f.severity.value})"
    )


def email_message(hook: EmailHook, alert: Alert, payload: bytes) -> EmailMessage:
    """A readable summary on top, the alert JSON below; Message-ID carries the idempotency key.

    People read this: each summary line passes `visible` and the JSON is ASCII (`\\uNNNN`), so
    server text quoted in the finding can neither add a line nor reorder one in a mail reader.
    """
    f = alert.finding
    domain = hook.mail_from.rpartition("@")[2] or "relayaudit.invalid"
    msg = EmailMessage()
    msg["From"] = hook.mail_from
    msg["To"] = ", ".join(hook.to)
    msg["Subject"] = email_subject(alert)
    msg["Date"] = format_datetime(alert.created.astimezone(UTC))
    # the same key gives the same Message-ID, so a gateway can drop a repeat we had to resend
    msg["Message-ID"] = f"<{alert.key}@{domain}>"
    msg["X-Relayaudit-Idempotency-Key"] = alert.key
    msg["Auto-Submitted"] = "auto-generated"
    summary = [
        f"{alert.transition.value.upper()}: {f.title}",
        "",
        f"Finding:     {f.id} ({f.kind.value})",
        f"Where:       {endpoint(f.address, f.port)} (seen from {f.vantage})",
        f"Severity:    {f.severity.value} (confidence {f.confidence.value})",
        f"Observed:    {f.observed_at.isoformat()}",
        f"Sweep:       {alert.sweep_id}",
        f"Alert key:   {alert.key}",
        "",
        f.summary,
    ]
    if f.approved_note:
        summary += ["", f"Approved service note: {f.approved_note}"]
    try:
        pretty = json.dumps(json.loads(payload), indent=2)
    except ValueError:
        pretty = payload.decode("utf-8", "replace")
    body = (
        "\n".join(visible(line) for line in summary)
        + "\n\n-- alert as JSON (evidence and transcript included) --\n"
        + pretty
        + "\n"
    )
    msg.set_content(body)
    return msg


async def deliver_email(hook: EmailHook, alert: Alert, payload: bytes) -> None:
    """Send one message to the gateway; accepted by the gateway for every recipient = delivered."""
    where = f"email {endpoint(hook.host, hook.port)}"
    secrets = _hook_secrets(hook)
    message = email_message(hook, alert, payload)
    failure: str | None
    try:
        async with asyncio.timeout(hook.timeout):
            errors, _ = await aiosmtplib.send(
                message,
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
    """The outbox channel of each configured hook, `kind:index` (what the store queues for)."""
    return [
        *(f"command:{i}" for i in range(len(config.command))),
        *(f"webhook:{i}" for i in range(len(config.webhook))),
        *(f"email:{i}" for i in range(len(config.email))),
    ]


def _command_channel(hook: CommandHook) -> Deliver:
    async def send(alert: Alert, payload: bytes) -> None:
        await deliver_command(hook, payload, alert.key)

    return send


def _webhook_channel(hook: WebhookHook) -> Deliver:
    async def send(alert: Alert, payload: bytes) -> None:
        await deliver_webhook(hook, payload, alert.key)

    return send


def _email_channel(hook: EmailHook) -> Deliver:
    async def send(alert: Alert, payload: bytes) -> None:
        await deliver_email(hook, alert, payload)

    return send


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
        hooks: list[tuple[Deliver, WebhookHook | EmailHook | CommandHook]] = [
            *((_command_channel(h), h) for h in config.command),
            *((_webhook_channel(h), h) for h in config.webhook),
            *((_email_channel(h), h) for h in config.email),
        ]
        self.channels: dict[str, Deliver] = {
            name: send for name, (send, _) in zip(channel_names(config), hooks, strict=True)
        }
        self._secrets = [s for _, hook in hooks for s in _hook_secrets(hook)]
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

    async def _pass(self, channel: str, send: Deliver) -> int:
        items = await asyncio.to_thread(self.store.due, channel, self._clock(), self._batch)
        delivered = 0
        for item in items:
            if not await self._attempt(channel, send, item):
                # the receiver probably is down: one failure per pass, not one timeout per item
                break
            delivered += 1
        return delivered

    async def _attempt(self, channel: str, send: Deliver, item: OutboxItem) -> bool:
        alert = item.alert
        try:
            await send(alert, render_payload(alert))
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
