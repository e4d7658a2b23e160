"""A TLS server certificate for 127.0.0.1 that clients trust through SSL_CERT_FILE (tests only)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TrustedTLS", "trusted_tls"]


@dataclass(frozen=True)
class TrustedTLS:
    server: ssl.SSLContext  # presents the certificate
    cafile: Path  # the certificate alone: set SSL_CERT_FILE to it and default contexts trust it


def trusted_tls(directory: Path) -> TrustedTLS:
    """A self-signed certificate for 127.0.0.1 and localhost, written under `directory`.

    Code under test verifies certificates with the system's trust store (ssl's default
    context); OpenSSL reads SSL_CERT_FILE, so a test trusts this one without any test-only
    switch in the code.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayaudit test gateway")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cafile = directory / "trusted-ca.pem"
    cafile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile = directory / "trusted-key.pem"
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(cafile, keyfile)
    return TrustedTLS(server=server, cafile=cafile)
