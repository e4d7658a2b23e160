"""How the lab reads a RCPT path: the address tricks a maximally permissive MTA honours."""

from __future__ import annotations

import re
from enum import Enum
from typing import Final

__all__ = ["CONTROL_RE", "RecipientKind", "is_plain_address", "resolve_recipient"]

CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


class RecipientKind(Enum):
    """What a server that honours every address trick would make of a RCPT path."""

    LOCAL = "local"  # a mailbox on this host (or an unqualified name)
    EXTERNAL = "external"  # an address on another host: relaying it is relaying
    BAD = "bad"  # nothing sensible (empty, control characters, leftover extra @)


def is_plain_address(path: str) -> bool:
    """True for exactly local@domain with no %, !, quotes, extra @ or leading @route."""
    local, at, domain = path.partition("@")
    return (
        bool(at and local and domain)
        and "@" not in domain
        and not any(c in path for c in '%!"')
        and CONTROL_RE.search(path) is None
    )


def resolve_recipient(path: str, own_names: frozenset[str]) -> tuple[RecipientKind, str]:
    """Resolve a RCPT path the way a maximally permissive MTA would; returns (kind, address).

    own_names are lower-case: the server's host name, its local domains and "[its IP]".
    The rules, applied in order, are deliberately simple:
    1. drop every double quote ("u@d" -> u@d, "u@d"@T -> u@d@T), a leading source route
       (@T:u@d -> u@d, @a,@b:u@d -> u@d) and trailing @s (u@d@ -> u@d);
    2. while the text ends in @<own name> and what precedes it still holds @, % or !, drop that
       suffix (u@d@T -> u@d, u%d@[IP] -> u%d, d!u@T -> d!u);
    3. with no @ left: the rightmost % becomes @ (u%d -> u@d); else the first ! splits a UUCP
       path (d!u -> u@d); else it is an unqualified local name;
    4. exactly one @ must remain with non-empty sides, else BAD; the domain decides local/external.
    """
    if not path or CONTROL_RE.search(path):
        return RecipientKind.BAD, path
    text = path.replace('"', "")
    if text.startswith("@"):
        _, colon, rest = text.partition(":")
        if not colon:
            return RecipientKind.BAD, path
        text = rest
    text = text.rstrip("@")
    while "@" in text:
        head, _, domain = text.rpartition("@")
        if domain.lower() in own_names and any(c in head for c in "@%!"):
            text = head
        else:
            break
    if "@" not in text:
        if "%" in text:
            user, _, host = text.rpartition("%")
            text = f"{user}@{host}"
        elif "!" in text:
            host, _, user = text.partition("!")
            text = f"{user}@{host}"
        elif text:
            return RecipientKind.LOCAL, text
        else:
            return RecipientKind.BAD, path
    local, _, domain = text.rpartition("@")
    if not local or not domain or "@" in local:
        return RecipientKind.BAD, path
    if domain.lower() in own_names:
        return RecipientKind.LOCAL, text
    return RecipientKind.EXTERNAL, text
