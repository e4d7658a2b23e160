"""The lab's TLS: a self-signed server certificate per host name, made once per process."""

from __future__ import annotations

import functools
import os
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TLS_HANDSHAKE_TIMEOUT", "server_tls_context"]

TLS_HANDSHAKE_TIMEOUT: Final = 10.0


@functools.cache
def _tls_key() -> ec.EllipticCurvePrivateKey:
    # One key per process: EC P-256 is generated in microseconds, RSA 2048 in ~100 ms.
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def server_tls_context(hostname: str) -> ssl.SSLContext:
    """A server context with a self-signed 1-day certificate for hostname, made once per process."""
    key = _tls_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))  # tolerate small clock skew of clients
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files; the key lives on disk for the duration of this call only.
    with tempfile.TemporaryDirectory(prefix="relaylab-") as tmp:
        path = os.path.join(tmp, "cert.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        ctx.load_cert_chain(path)
    return ctx
