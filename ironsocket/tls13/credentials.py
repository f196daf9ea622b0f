"""Server certificates and private keys, and the choice of one per handshake (RFC 8446 §4.4.2.2).

A `Credential` is a chain (leaf first) plus its private key; `CertificateStore` picks one by the
client's SNI and signature_algorithms, and signs CertificateVerify with the `cryptography`
package.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from .constants import SignatureScheme

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_PSS_HASHES = {
    SignatureScheme.RSA_PSS_RSAE_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PSS_RSAE_SHA384: hashes.SHA384,
    SignatureScheme.RSA_PSS_RSAE_SHA512: hashes.SHA512,
}


class CredentialError(Exception):
    """A certificate or key file that cannot be used, with the reason."""


# NIST SP 800-131A: RSA below 2048 bits is disallowed for signatures. RFC 8448's trace uses a
# 1024-bit key; its replay test lowers the bound explicitly.
MIN_RSA_BITS = 2048


def schemes_for_key(key: PrivateKey, min_rsa_bits: int = MIN_RSA_BITS) -> tuple[SignatureScheme, ...]:
    """The TLS 1.3 signature schemes a key can produce (§4.2.3), in our preference order."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return (SignatureScheme.ECDSA_SECP256R1_SHA256,)
        if isinstance(key.curve, ec.SECP384R1):
            return (SignatureScheme.ECDSA_SECP384R1_SHA384,)
        raise CredentialError(f"unsupported EC curve {key.curve.name} (use P-256 or P-384)")
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < min_rsa_bits:
            raise CredentialError(f"RSA key of {key.key_size} bits is too small (need >= {min_rsa_bits})")
        return (
            SignatureScheme.RSA_PSS_RSAE_SHA256,
            SignatureScheme.RSA_PSS_RSAE_SHA384,
            SignatureScheme.RSA_PSS_RSAE_SHA512,
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return (SignatureScheme.ED25519,)
    raise CredentialError(f"unsupported private key type {type(key).__name__}")


def sign(key: PrivateKey, scheme: SignatureScheme, data: bytes) -> bytes:
    """Sign CertificateVerify content with ``scheme`` (§4.4.3)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = hashes.SHA256() if scheme is SignatureScheme.ECDSA_SECP256R1_SHA256 else hashes.SHA384()
        return key.sign(data, ec.ECDSA(algorithm))
    if isinstance(key, rsa.RSAPrivateKey):
        hash_cls = _PSS_HASHES[scheme]
        return key.sign(
            data,
            padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=hash_cls.digest_size),
            hash_cls(),
        )
    return key.sign(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """A certificate chain (DER, leaf first), its key, and the names the leaf is valid for."""

    chain: tuple[bytes, ...]
    private_key: PrivateKey = field(repr=False)
    names: tuple[str, ...]
    schemes: tuple[SignatureScheme, ...]
    source: str = ""

    def matches(self, server_name: str) -> bool:
        server_name = server_name.lower().rstrip(".")
        for name in self.names:
            if name == server_name:
                return True
            if name.startswith("*.") and "." in server_name:
                if server_name.split(".", 1)[1] == name[2:]:
                    return True
        return False


def credential_from_objects(
    certs: list[x509.Certificate], key: PrivateKey, source: str = "", *, min_rsa_bits: int = MIN_RSA_BITS
) -> Credential:
    if not certs:
        raise CredentialError(f"{source}: no certificate found")
    leaf = certs[0]
    pub = key.public_key()
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*fmt) != pub.public_bytes(*fmt):
        raise CredentialError(f"{source}: the private key does not match the first certificate")
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names += [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return Credential(
        chain=tuple(c.public_bytes(serialization.Encoding.DER) for c in certs),
        private_key=key,
        names=tuple(names),
        schemes=schemes_for_key(key, min_rsa_bits),
        source=source,
    )


def load_credential(cert_file: str | Path, key_file: str | Path) -> Credential:
    """Load a PEM chain (leaf first) and a PEM private key; explain what is wrong if unusable."""
    source = f"{cert_file} + {key_file}"
    try:
        cert_pem = Path(cert_file).read_bytes()
        key_pem = Path(key_file).read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CredentialError(f"{cert_file}: not a PEM certificate chain ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialError(f"{key_file}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise CredentialError(f"{key_file}: unsupported key type {type(key).__name__}")
    return credential_from_objects(certs, key, source)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class CertificateStore:
    """Several credentials; `select` implements the choice by SNI, then signature_algorithms."""

    credentials: tuple[Credential, ...]

    def __post_init__(self) -> None:
        if not self.credentials:
            raise CredentialError("at least one certificate/key pair is required")

    def select(
        self, server_name: str | None, signature_algorithms: tuple[int, ...]
    ) -> tuple[Credential, SignatureScheme] | None:
        """Pick (credential, scheme). Credentials whose names match SNI come first; the rest
        remain fallbacks (clients often send SNI for a name we serve under another cert)."""
        if server_name:
            ordered = [c for c in self.credentials if c.matches(server_name)]
            ordered += [c for c in self.credentials if c not in ordered]
        else:
            ordered = list(self.credentials)
        offered = set(signature_algorithms)
        for cred in ordered:
            # Client preference order among the schemes this key can make (§4.2.3).
            for scheme in signature_algorithms:
                if scheme in cred.schemes and scheme in offered:
                    return cred, SignatureScheme(scheme)
        return None
