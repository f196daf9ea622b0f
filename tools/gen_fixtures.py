#!/usr/bin/env python3
"""Generate the test PKI in fixtures/certs/.

    .venv/bin/python tools/gen_fixtures.py [--out DIR]

Writes (file names are fixed; keys and serials are fresh on every run):

  ca.pem / ca.key                    root CA, ECDSA P-256, self-signed
  intermediate.pem / intermediate.key  intermediate CA (ECDSA P-256), signed by the root
  <name>.pem / <name>.key / <name>-leaf.pem
      for name in ecdsa-p256, ecdsa-p384, rsa2048, ed25519:
      leaf for "localhost" (SAN DNS:localhost, IP:127.0.0.1, IP:::1) signed by the
      intermediate; <name>.pem = leaf + intermediate (the chain a server sends),
      <name>-leaf.pem = the leaf alone
  alpha.test.pem/.key/-leaf.pem, beta.test.pem/.key/-leaf.pem
      ECDSA P-256 leaves for SNI tests (SAN alpha.test / beta.test), same layout

Validity: now - 1 day .. now + 10 years.  Keys: unencrypted PKCS#8 PEM.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "fixtures" / "certs"

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
NOT_BEFORE = NOW - dt.timedelta(days=1)
NOT_AFTER = NOW + dt.timedelta(days=3653)  # 10 years incl. leap days

LOCALHOST_SANS = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]

README = """\
Test-only PKI for ironsocket (NOT secret, never use outside tests): a root CA (ca.pem), an intermediate
(intermediate.pem) and localhost leaves (ecdsa-p256, ecdsa-p384, rsa2048, ed25519) plus SNI leaves alpha.test/beta.test;
`<name>.pem` = leaf + intermediate chain, `<name>-leaf.pem` = leaf only, `<name>.key` = PKCS#8 key.
Regenerate (new keys, validity now-1d..now+10y) with: `.venv/bin/python tools/gen_fixtures.py`
"""


def name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ironsocket test"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def sign_hash(issuer_key) -> hashes.HashAlgorithm | None:
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def make_ca(subject: str, key, issuer_name: x509.Name | None, issuer_key, path_len: int) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer_name or name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, sign_hash(issuer_key))


def make_leaf(cn: str, sans: list[x509.GeneralName], key, issuer: x509.Certificate, issuer_key) -> x509.Certificate:
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, sign_hash(issuer_key))


def pem_cert(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # fresh file, default mode
    path.write_bytes(data)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: fixtures/certs)")
    out: Path = ap.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_ca("ironsocket test root CA", ca_key, None, ca_key, path_len=1)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = make_ca("ironsocket test intermediate CA", int_key, ca.subject, ca_key, path_len=0)
    write(out / "ca.pem", pem_cert(ca))
    write(out / "ca.key", pem_key(ca_key))
    write(out / "intermediate.pem", pem_cert(inter))
    write(out / "intermediate.key", pem_key(int_key))

    leaves = [
        ("ecdsa-p256", "localhost", LOCALHOST_SANS, lambda: ec.generate_private_key(ec.SECP256R1())),
        ("ecdsa-p384", "localhost", LOCALHOST_SANS, lambda: ec.generate_private_key(ec.SECP384R1())),
        ("rsa2048", "localhost", LOCALHOST_SANS, lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ed25519", "localhost", LOCALHOST_SANS, ed25519.Ed25519PrivateKey.generate),
        ("alpha.test", "alpha.test", [x509.DNSName("alpha.test")], lambda: ec.generate_private_key(ec.SECP256R1())),
        ("beta.test", "beta.test", [x509.DNSName("beta.test")], lambda: ec.generate_private_key(ec.SECP256R1())),
    ]
    for stem, cn, sans, keygen in leaves:
        key = keygen()
        leaf = make_leaf(cn, sans, key, inter, int_key)
        write(out / f"{stem}.pem", pem_cert(leaf, inter))
        write(out / f"{stem}-leaf.pem", pem_cert(leaf))
        write(out / f"{stem}.key", pem_key(key))

    (out / "README.md").write_text(README)
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
