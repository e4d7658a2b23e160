"""Facts about a server from its first session: greeting, EHLO keywords, TLS and certificate, software guess."""

from __future__ import annotations

import re
import ssl

from relayaudit.evidence import Capabilities, Reply, SessionFacts, TlsFacts
from relayaudit.software import ehlo_signs, greeting_signs, guess
from relayaudit.wire import Ehlo

__all__ = ["capabilities", "hostname_from", "session_facts", "software", "tls_facts"]

_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def hostname_from(text: str) -> str | None:
    """The name a server gives itself: the first word of its greeting or EHLO reply."""
    first = text.split(None, 1)[0] if text.split() else ""
    return first.lower() if "." in first and _HOSTNAME.match(first) else None


def software(greeting: str, ehlo: Ehlo | None) -> str | None:
    """The first session's guess, from the greeting's product token and the EHLO reply (the
    verdict weighs the battery's refusals in too: `software.guess_of`)."""
    signs = greeting_signs(greeting)
    if ehlo is not None:
        signs += ehlo_signs(ehlo.text, ehlo.extensions)
    return guess(signs).name


def tls_facts(obj: ssl.SSLObject | ssl.SSLSocket | None) -> TlsFacts:
    """Protocol, cipher and certificate of a TLS connection."""
    if obj is None:
        return TlsFacts(error="no TLS object on the transport")
    cipher = obj.cipher()
    der = obj.getpeercert(binary_form=True)
    facts: dict[str, object] = {
        "protocol": obj.version(),
        "cipher": cipher[0] if cipher else None,
    }
    if der:
        from cryptography import x509  # noqa: PLC0415 - only sessions with TLS pay for this import

        try:
            cert = x509.load_der_x509_certificate(der)
            facts |= {
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "not_after": cert.not_valid_after_utc,
                "self_signed": cert.issuer == cert.subject,
            }
        except ValueError as exc:
            facts["error"] = f"certificate not parseable: {exc}"
    return TlsFacts.model_validate(facts)


def capabilities(ehlo: Ehlo) -> Capabilities:
    """What one EHLO reply offers (the one after STARTTLS, recorded beside the plain one)."""
    ext = ehlo.extensions
    size_text = ext.get("size", "")
    return Capabilities(
        capabilities=tuple(sorted(ext)),
        auth_mechanisms=tuple(m.upper() for m in ehlo.auth),
        size=int(size_text) if size_text.isdigit() else None,
        pipelining="pipelining" in ext,
        eightbitmime="8bitmime" in ext,
    )


def session_facts(banner: Reply, ehlo: Ehlo | None) -> SessionFacts:
    """The facts of the first session; `ehlo` None: the server took HELO only."""
    ext = ehlo.extensions if ehlo is not None else {}
    ehlo_text = ehlo.text if ehlo is not None else ""
    size_text = ext.get("size", "")
    return SessionFacts(
        banner=banner,
        ehlo=ehlo is not None,
        hostname=hostname_from(banner.text) or hostname_from(ehlo_text),
        capabilities=tuple(sorted(ext)),
        auth_mechanisms=tuple(m.upper() for m in ehlo.auth) if ehlo is not None else (),
        starttls="starttls" in ext,
        size=int(size_text) if size_text.isdigit() else None,
        pipelining="pipelining" in ext,
        eightbitmime="8bitmime" in ext,
        software=software(banner.text, ehlo),
    )
