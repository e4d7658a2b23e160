"""The one exception hierarchy of relayaudit; every subclass is also the matching builtin."""

from __future__ import annotations

import errno
import os
from enum import IntEnum

__all__ = [
    "ConfigError",
    "ExitCode",
    "OutputError",
    "ProbeError",
    "RelayAuditError",
    "StateError",
    "TemporaryError",
    "UsageError",
    "listen_error",
    "os_reason",
]


class ExitCode(IntEnum):
    """What a command's exit status means; the codes above 2 are those of BSD's sysexits.h.

    A scheduler acts on them: the Kubernetes Job fails on USAGE, SOFTWARE and CONFIG and retries
    on TEMPFAIL; systemd does not restart the daemon after CONFIG (RestartPreventExitStatus=78).
    """

    OK = 0  # ran to the end; nothing found at or above --fail-on
    FOUND = 1  # ran to the end; found something at or above --fail-on (default: a relay)
    USAGE = 2  # a bad command line: an unknown option, a bad argument, a host that does not resolve
    SOFTWARE = 70  # an internal error (a bug of relayaudit's): the traceback is on standard error
    TEMPFAIL = 75  # temporary: a port in use, a network error with no verdict, a locked store
    CONFIG = 78  # the configuration file (or a file it names) is invalid or unreadable


class RelayAuditError(Exception):
    """Base class of every error relayaudit raises on purpose; `exit_code` is what a command exits with."""

    exit_code = ExitCode.SOFTWARE

    def __init__(self, *args: object, exit_code: ExitCode | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:  # one instance may differ from its class (a locked vs a bad file)
            self.exit_code = exit_code


class ConfigError(RelayAuditError, ValueError):
    """A configuration file, CLI argument or target specification is invalid.

    The message always names where the bad value came from (key path or argument) and the value.
    """

    exit_code = ExitCode.CONFIG


class UsageError(ConfigError):
    """A command-line argument is invalid (not the configuration file): exit 2, like argparse's."""

    exit_code = ExitCode.USAGE


class TemporaryError(RelayAuditError, OSError):
    """Something that may work when tried again: a port in use, a network failure."""

    exit_code = ExitCode.TEMPFAIL


class ProbeError(RelayAuditError, RuntimeError):
    """A probe could not be carried out for a reason that is not a network outcome."""


class StateError(RelayAuditError, RuntimeError):
    """The state store is unusable: locked or the disk full (75), or not a state file at all (78)."""

    exit_code = ExitCode.TEMPFAIL


class OutputError(RelayAuditError, OSError):
    """An output file (the findings file) cannot be written: disk full, removed, no permission."""

    exit_code = ExitCode.TEMPFAIL


def listen_error(what: str, host: str, port: int, exc: OSError) -> RelayAuditError:
    """A bind that failed: a port in use is temporary (75), any other reason is the config's (78)."""
    shown = f"[{host}]" if ":" in host else host
    message = f"{what}: cannot listen on {shown}:{port}: {os_reason(exc)}"
    if exc.errno == errno.EADDRINUSE:
        return TemporaryError(message)
    return ConfigError(message)


def os_reason(exc: OSError) -> str:
    """The short reason of an OSError; asyncio's bind errors carry a long, repetitive strerror."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
