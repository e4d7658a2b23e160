"""structlog setup: JSON or ECS lines to a file (reopenable for logrotate) and/or stdout (with
syslog priority prefixes when stdout is journald), with secrets redacted."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Mapping, MutableMapping
from datetime import date, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog

from relayaudit.ecs import EcsFormatter
from relayaudit.errors import ConfigError
from relayaudit.files import open_text_append

if TYPE_CHECKING:
    from relayaudit.config import LoggingConfig

__all__ = ["REDACTED", "LogHandle", "configure_logging", "journal_priority", "redact_secrets"]

REDACTED = "<redacted>"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Key names whose values are never written, at any depth (e.g. alert hook headers).
_SECRET_KEY = re.compile(
    r"token|passw(?:or)?d|secret|hmac|authori[sz]ation|api[_-]?key|cookie|credential", re.I
)
# Credentials that can hide inside ordinary strings (an error message quoting a header or URL).
_SCHEME_CREDENTIAL = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.I)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@/\s]+@")
_MAX_DEPTH = 8  # nesting depth redaction will walk; anything deeper is replaced, not leaked

# The first keys of every line, in this order; the rest follow as bound/logged.
_FIRST_KEYS = ("timestamp", "level", "event")

# syslog priorities, as sd-daemon(3) writes them before a line journald reads from stdout
SD_ERR, SD_WARNING, SD_NOTICE, SD_INFO, SD_DEBUG = 3, 4, 5, 6, 7
_PRIORITIES = {"critical": 2, "error": SD_ERR, "warning": SD_WARNING, "info": SD_INFO}
# normal but significant (once a sweep, or in a daemon's life): above the probes' info
_NOTICE_EVENTS = frozenset({"sweep.summary", "daemon.start", "daemon.stop", "config.reloaded"})


def _scrub(text: str) -> str:
    text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _redact(value: object, depth: int) -> object:
    if isinstance(value, str):
        return _scrub(value)
    if depth >= _MAX_DEPTH and isinstance(value, Mapping | list | tuple | set | frozenset):
        return "<too deep to log>"
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _SECRET_KEY.search(str(k)) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: values of secret-looking keys become "<redacted>", at any depth.

    A last line of defense only: secrets are SecretStr in the config and code must not log them.
    """
    return {
        key: REDACTED if _SECRET_KEY.search(key) else _redact(value, 1)
        for key, value in event_dict.items()
    }


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        try:
            return sorted(value)  # stable output for the same set
        except TypeError:
            return sorted(value, key=str)
    return str(value)  # addresses, paths, enums: their text form is what a reader wants


def _dumps(event_dict: Any, **_: Any) -> str:
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in ordered)
    return json.dumps(ordered, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def journal_priority(event_dict: Mapping[str, Any]) -> int:
    """The syslog priority of an event (before the ECS mapping): its level, raised for findings.

    A finding's transition is what the ISO must see: warning, and notice once resolved, so
    `journalctl -p warning` shows findings and problems, and never the probes (info).
    """
    level = _PRIORITIES.get(str(event_dict.get("level")), SD_DEBUG)
    name = event_dict.get("event")
    if name == "finding.transition":
        return min(level, SD_NOTICE if event_dict.get("transition") == "resolved" else SD_WARNING)
    if name in _NOTICE_EVENTS:
        return min(level, SD_NOTICE)
    return level


class _Render:
    """The chain's last processor: the line (JSON or ECS) and its priority, for _LineWriter."""

    def __init__(self, ecs: EcsFormatter | None) -> None:
        self.ecs = ecs

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> tuple[tuple[str], dict[str, int]]:
        priority = journal_priority(event_dict)
        if self.ecs is None:
            line = _dumps(event_dict)
        else:  # ECS orders its own keys
            line = json.dumps(
                self.ecs(logger, method, event_dict),
                default=_json_default,
                ensure_ascii=False,
                separators=(",", ":"),
            )
        return (line,), {"priority": priority}


def _is_journal(journal_stream: str, stream: IO[str]) -> bool:
    """Whether `stream` is the one systemd connected to journald: JOURNAL_STREAM names its
    device and inode (systemd.exec(5)); an inherited variable on a redirected stdout does not
    match, and such a stdout gets plain lines."""
    try:
        device, inode = (int(part) for part in journal_stream.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class _LineWriter:
    """The structlog "logger": writes each rendered line to the file and/or stdout, flushed."""

    def __init__(
        self, file: IO[str] | None, stdout: bool, *, journal_stream: str | None = None
    ) -> None:
        # Async log methods (ainfo) and the stdlib bridge write from other threads; the lock
        # keeps lines whole and makes reopen() atomic with respect to writes.
        self.lock = threading.RLock()
        self.file = file
        self.stdout = stdout
        self.write_errors = 0
        self.journal_stream = journal_stream
        self._journal: tuple[object, bool] = (None, False)  # (stdout checked, is journald)

    def _prefix(self, stream: IO[str], priority: int) -> str:
        if not self.journal_stream:
            return ""
        checked, journal = self._journal
        if checked is not stream:  # a redirected sys.stdout is checked afresh
            journal = _is_journal(self.journal_stream, stream)
            self._journal = (stream, journal)
        return f"<{priority}>" if journal else ""

    def msg(self, message: str, priority: int = SD_INFO) -> None:
        line = message + "\n"
        with self.lock:
            if self.file is not None:
                try:
                    self.file.write(line)
                    self.file.flush()
                except (OSError, ValueError) as exc:  # disk full, or closed under us
                    self.write_errors += 1
                    if self.write_errors == 1:
                        # Once, so a full disk does not turn into a flood on stderr.
                        sys.stderr.write(f"relayaudit: cannot write log file: {exc}\n")
            if self.stdout:
                # Looked up per write so a redirected sys.stdout (tests, daemons) is honoured.
                stream = sys.stdout
                stream.write(self._prefix(stream, priority) + line)
                stream.flush()

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = msg
    log = msg


class _StdlibBridge(logging.Handler):
    """Renders records of stdlib loggers (asyncio, aiosmtpd) as the same JSON lines."""

    def __init__(self, handle: LogHandle, level: int) -> None:
        super().__init__(level)
        self._handle = handle

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: MutableMapping[str, Any] = {
                "event": record.getMessage(),
                "logger": record.name,
            }
            if record.exc_info:
                event["exc_info"] = record.exc_info
            self._handle._render_and_write(record.levelname.lower(), event)
        except Exception:
            self.handleError(record)


def _open(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the directory should be ("File exists" misleads)
        raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a directory") from None
    # Line-buffered, and msg() flushes too: a crash loses at most the line being written.
    return open_text_append(path)


class LogHandle:
    """What configure_logging set up: the context bound to every event, and the open file.

    `environ` (os.environ unless given) is read for JOURNAL_STREAM only.
    """

    def __init__(
        self,
        config: LoggingConfig,
        bind: Mapping[str, object],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.path: Path | None = config.file
        self.level = _LEVELS[config.level]
        self._context: dict[str, object] = dict(bind)
        file = None
        if self.path is not None:
            try:
                file = _open(self.path)
            except OSError as exc:
                raise ConfigError(
                    f"logging.file: cannot open '{self.path}' for writing: {exc.strerror or exc}"
                ) from None
        env = os.environ if environ is None else environ
        self._writer = _LineWriter(file, config.stdout, journal_stream=env.get("JOURNAL_STREAM"))
        ecs = EcsFormatter(hostname=socket.gethostname()) if config.format == "ecs" else None
        self._processors: list[Any] = [
            structlog.contextvars.merge_contextvars,
            self._add_bound,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            _Render(ecs),
        ]
        self._bridge = _StdlibBridge(self, max(self.level, logging.WARNING))
        self.closed = False

    @property
    def bound(self) -> dict[str, object]:
        return dict(self._context)

    @property
    def write_errors(self) -> int:
        return self._writer.write_errors

    def bind(self, **values: object) -> None:
        """Add or change context on every later event (e.g. a new sweep_id per sweep).

        A value of None removes the key (`bind(sweep_id=None)` between sweeps).
        """
        merged = {**self._context, **values}
        # A fresh dict, swapped in one assignment, so other threads see old or new, never half.
        self._context = {k: v for k, v in merged.items() if v is not None}

    def unbind(self, *keys: str) -> None:
        self._context = {k: v for k, v in self._context.items() if k not in keys}

    def _add_bound(
        self, _logger: object, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        # Bound context first so sweep_id/shard sit near the front; what the call site passed wins.
        return {**self._context, **event_dict}

    def _render_and_write(self, method: str, event_dict: MutableMapping[str, Any]) -> None:
        """Runs the processor chain by hand (for stdlib records) and writes the line."""
        result: Any = event_dict
        for processor in self._processors:
            result = processor(None, method, result)
        args, kwargs = result
        self._writer.msg(*args, **kwargs)

    def reopen(self) -> bool:
        """Reopen the log file at its path (after logrotate moved it away); call on SIGHUP.

        Never raises: on failure the old file keeps receiving lines, an error event says why,
        and False is returned.
        """
        if self.path is None or self.closed:
            return True
        try:
            fresh = _open(self.path)
        except OSError as exc:
            self._render_and_write(
                "error",
                {"event": "log_reopen_failed", "path": str(self.path), "error": str(exc)},
            )
            return False
        with self._writer.lock:
            old, self._writer.file = self._writer.file, fresh
        if old is not None:
            old.close()
        return True

    def close(self) -> None:
        """Close the file and detach from stdlib logging; later events go to stdout only."""
        if self.closed:
            return
        self.closed = True
        logging.getLogger().removeHandler(self._bridge)
        with self._writer.lock:
            old, self._writer.file = self._writer.file, None
        if old is not None:
            old.close()

    def _install(self) -> None:
        structlog.configure(
            processors=self._processors,
            wrapper_class=structlog.make_filtering_bound_logger(self.level),
            logger_factory=lambda *_args: self._writer,
            # Not cached: module-level loggers must follow a reconfiguration (SIGHUP reload).
            cache_logger_on_first_use=False,
        )
        logging.getLogger().addHandler(self._bridge)


_active: LogHandle | None = None
_active_lock = threading.Lock()


def configure_logging(
    config: LoggingConfig,
    *,
    bind: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> LogHandle:
    """Route structlog (and stdlib warnings) to JSON or ECS lines as `config` says.

    `bind` is context added to every event (e.g. shard); `environ` (default os.environ) says
    whether stdout is journald (JOURNAL_STREAM). Raises ConfigError naming
    `logging.file` when the file cannot be opened; the previous configuration, if any, then
    stays in force, and is otherwise replaced and closed.
    """
    global _active
    handle = LogHandle(config, bind or {}, environ=environ)
    with _active_lock:
        previous, _active = _active, handle
        handle._install()
        if previous is not None:
            previous.close()
    return handle
