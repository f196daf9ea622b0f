"""A throw-away self-signed certificate for the demo defaults (`ironsocket serve` with no args).

The demo's certificate is made once per server, not once per program image: clients that
pinned it (``curl --pinnedpubkey``, a browser exception) keep working across upgrades and
reloads. `demo_credential` keeps the PEM (certificate and key) in a sealed memfd that is
deliberately *not* close-on-exec, so it survives every exec of the same PID (upgrade, reload,
rollback), and names it in ``$IRONSOCKET_DEMO_CERT_FD``; the exec'd program reads it back.
Never on disk. With ``--workers N`` the supervisor makes it once and passes the memfd to every
worker (`shared_fds`, ``pass_fds``: the same fd number, named by the same variable), so every
worker serves the same certificate, and keeps it across its own upgrades. Other children
started with ``close_fds`` (the upgrade's check child) do not get the fd and make their own.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .tls13.credentials import Credential, credential_from_objects

ENV_FD = "IRONSOCKET_DEMO_CERT_FD"
_MEMFD_NAME = "ironsocket-demo-cert"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def demo_credential() -> Credential:
    """The demo's self-signed credential: the one this process already had before an exec (see
    the module doc), else a new one, kept for the next exec."""
    carried = _carried()
    if carried is not None:
        return carried
    cert, key = _generate()
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.memfd_create(_MEMFD_NAME, os.MFD_ALLOW_SEALING)  # no MFD_CLOEXEC: it is for the exec
    os.write(fd, pem)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    os.environ[ENV_FD] = str(fd)
    return credential_from_objects([cert], key, source="embedded self-signed")


def shared_fds() -> tuple[int, ...]:
    """The demo certificate's memfd, if this process has one (for a child's ``pass_fds``: the
    ``--workers`` supervisor gives it to every worker), else nothing."""
    fd = _carried_fd()
    return () if fd is None else (fd,)


def _carried_fd() -> int | None:
    text = os.environ.get(ENV_FD, "")
    if not text.isdigit():
        return None
    fd = int(text)
    try:  # the fd must be our memfd (in a child without it, that number may be anything or nothing)
        if os.readlink(f"/proc/self/fd/{fd}") != f"/memfd:{_MEMFD_NAME} (deleted)":
            return None
    except OSError:
        return None
    return fd


def _carried() -> Credential | None:
    fd = _carried_fd()
    if fd is None:
        return None
    try:
        pem = os.pread(fd, 1 << 16, 0)
        cert = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    return credential_from_objects([cert], key, source="embedded self-signed (kept across the upgrade)")


def self_signed_credential(common_name: str = "localhost") -> Credential:
    """An ECDSA P-256 certificate for localhost/127.0.0.1/::1, valid for 30 days, in memory only."""
    cert, key = _generate(common_name)
    return credential_from_objects([cert], key, source="embedded self-signed")


def _generate(common_name: str = "localhost") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(common_name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key
