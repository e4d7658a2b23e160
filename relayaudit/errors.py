"""The one exception hierarchy of relayaudit; every subclass is also the matching builtin."""

from __future__ import annotations

__all__ = ["ConfigError", "OutputError", "ProbeError", "RelayAuditError", "StateError"]


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
