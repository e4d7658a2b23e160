"""The one exception hierarchy of relayaudit; every subclass is also the matching builtin."""

from __future__ import annotations

import os

__all__ = [
    "ConfigError",
    "OutputError",
    "ProbeError",
    "RelayAuditError",
    "StateError",
    "os_reason",
]


class RelayAuditError(Exception):
    """Base class of every error relayaudit raises on purpose."""


class ConfigError(RelayAuditError, ValueError):
    """A configuration file, CLI argument or target specification is invalid.

    The message always names where the bad value came from (key path or argument) and the value.
    """


class ProbeError(RelayAuditError, RuntimeError):
    """A probe could not be carried out for a reason that is not a network outcome."""


class StateError(RelayAuditError, RuntimeError):
    """The state store is unusable (locked, corrupt, disk full)."""


class OutputError(RelayAuditError, OSError):
    """An output file (the findings file) cannot be written: disk full, removed, no permission."""


def os_reason(exc: OSError) -> str:
    """The short reason of an OSError; asyncio's bind errors carry a long, repetitive strerror."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
