"""Command line: `ironsocket serve`, `ironsocket doctor`."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import ktls
from .server import KtlsMode, ProxyConfig, ProxyServer, StartupError, parse_hostport
from .tls13.constants import CipherSuite, Group
from .tls13.credentials import CertificateStore, CredentialError, load_credential

app = typer.Typer(add_completion=False, no_args_is_help=False, help="ironsocket: a TLS 1.3 terminating proxy that hands connections to kernel TLS.")
log = logging.getLogger("ironsocket")

SUITE_NAMES = {s.name: s for s in CipherSuite} | {s.name.removeprefix("TLS_"): s for s in CipherSuite}
GROUP_NAMES = {"x25519": Group.X25519, "p256": Group.SECP256R1, "secp256r1": Group.SECP256R1,
               "p384": Group.SECP384R1, "secp384r1": Group.SECP384R1}


def _fail(message: str) -> None:
    typer.echo(f"ironsocket: error: {message}", err=True)
    raise typer.Exit(2)


def _parse_list(text: str | None, table: dict, what: str) -> tuple:
    if not text:
        return ()
    out = []
    for item in text.split(","):
        key = item.strip()
        value = table.get(key) or table.get(key.upper()) or table.get(key.lower())
        if value is None:
            _fail(f"unknown {what} {key!r}; choose from {', '.join(sorted(set(table)))}")
        out.append(value)
    return tuple(out)


def _open_keylog(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    handle = os.fdopen(fd, "a", buffering=1)
    lock = threading.Lock()

    def write(line: str) -> None:
        with lock:
            handle.write(line + "\n")

    return write


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept TLS on.")] = "127.0.0.1:8443",
    backend: Annotated[Optional[str], typer.Option(help="HOST:PORT of the plain TCP backend. Default: a built-in demo HTTP backend.")] = None,
    cert: Annotated[Optional[list[Path]], typer.Option(help="PEM certificate chain (leaf first); repeat together with --key.")] = None,
    key: Annotated[Optional[list[Path]], typer.Option(help="PEM private key for the --cert at the same position.")] = None,
    alpn: Annotated[Optional[str], typer.Option(help="ALPN protocols, server preference, comma separated (e.g. h2,http/1.1).")] = None,
    ciphers: Annotated[Optional[str], typer.Option(help="Cipher suites in preference order, e.g. TLS_AES_256_GCM_SHA384,TLS_CHACHA20_POLY1305_SHA256.")] = None,
    groups: Annotated[Optional[str], typer.Option(help="Key exchange groups in preference order: x25519,p256,p384.")] = None,
    ktls_mode: Annotated[KtlsMode, typer.Option("--ktls", help="auto: kernel TLS when available; require: refuse to start without it; off: userspace only.")] = KtlsMode.AUTO,
    handshake_timeout: Annotated[float, typer.Option(help="Seconds a client has to complete the handshake.")] = 10.0,
    idle_timeout: Annotated[float, typer.Option(help="Seconds without bytes in either direction before a connection is closed (0: never).")] = 300.0,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to connect to the backend.")] = 5.0,
    max_connections: Annotated[int, typer.Option(help="Connections served at once; more wait in the listen backlog.")] = 10_000,
    keylog: Annotated[Optional[Path], typer.Option(help="Write TLS secrets in NSS key log format to this file (created 0600). Only for debugging.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Terminate TLS 1.3 on LISTEN and relay plaintext to BACKEND."""
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .tls13.server import DEFAULT_CIPHER_SUITES, DEFAULT_GROUPS, ServerConfig

    cert, key = cert or [], key or []
    if len(cert) != len(key):
        _fail(f"--cert and --key come in pairs: got {len(cert)} --cert and {len(key)} --key")
    try:
        if cert:
            credentials = tuple(load_credential(c, k) for c, k in zip(cert, key))
        else:
            from .selfsigned import self_signed_credential

            credentials = (self_signed_credential(),)
            typer.echo("ironsocket: no --cert given: using a generated self-signed certificate for localhost", err=True)
        store = CertificateStore(credentials)
    except CredentialError as exc:
        _fail(str(exc))
    try:
        listen_addr = parse_hostport(listen)
        backend_addr = parse_hostport(backend) if backend else None
    except ValueError as exc:
        _fail(str(exc))
    tls = ServerConfig(
        certificates=store,
        cipher_suites=_parse_list(ciphers, SUITE_NAMES, "cipher suite") or DEFAULT_CIPHER_SUITES,
        groups=_parse_list(groups, GROUP_NAMES, "group") or DEFAULT_GROUPS,
        alpn_protocols=tuple(p.strip() for p in alpn.split(",") if p.strip()) if alpn else (),
        keylog=_open_keylog(keylog) if keylog else None,
    )
    demo = None
    server: ProxyServer | None = None
    if backend_addr is None:
        from .demo import DemoBackend

        demo = DemoBackend(lambda addr: server.connection_for_backend_peer(addr) if server else None)
        demo.start()
        backend_addr = demo.address
        typer.echo(f"ironsocket: no --backend given: built-in demo backend on {backend_addr[0]}:{backend_addr[1]}", err=True)
    config = ProxyConfig(
        listen=listen_addr, backend=backend_addr, tls=tls, ktls=ktls_mode,
        handshake_timeout=handshake_timeout, connect_timeout=connect_timeout,
        idle_timeout=idle_timeout or None, max_connections=max_connections,
    )
    stop = threading.Event()
    try:
        server = ProxyServer(config)
        server.start()
    except StartupError as exc:
        if demo:
            demo.stop()
        _fail(str(exc))
    assert server is not None
    host, port = server.address
    typer.echo(f"ironsocket: serving TLS 1.3 on {host}:{port}, record layer: {server.record_layer}", err=True)
    if demo:
        typer.echo(f"ironsocket: try: curl -k https://{host}:{port}/", err=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    typer.echo("ironsocket: stopping", err=True)
    server.stop()
    if demo:
        demo.stop()


@app.command()
def doctor() -> None:
    """Report what this kernel's TLS offload (kTLS) can do."""
    typer.echo(ktls.probe().describe())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
