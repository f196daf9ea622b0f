"""A tiny half-close-aware TCP echo server, run as a subprocess by the interop tests.

    python tests/echo_backend.py [--host 127.0.0.1] [--port 0] [--idle-timeout 1800]

Prints ``echo-backend: listening on HOST:PORT`` to stdout (flushed) once it is listening, then
echoes every byte of every connection back, one thread per connection. When the peer shuts its
write side down (EOF), everything read so far has already been written back (each read is
echoed with ``sendall`` before the next read); the server then shuts its own write side down
(FIN) and closes. Exits on SIGTERM/SIGINT.

A connection idle for ``--idle-timeout`` seconds is closed, and that is printed: the proxy then
passes the EOF on (close_notify, one TLS record). It only guards a forgotten connection, so it is
longer than any test: at 120 s it closed connections in the emulated kTLS VM while a test was
still waiting for an upgrade's pre-flight check (issue 11: a TX rec_seq one record ahead).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading


def serve_one(conn: socket.socket, idle_timeout: float) -> None:
    try:
        conn.settimeout(idle_timeout)  # never hang forever on a forgotten test connection
        while True:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                print(f"echo-backend: closing {conn.getpeername()}: idle for {idle_timeout:g}s", flush=True)
                break
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=1800.0)
    args = parser.parse_args()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(512)
    host, port = listener.getsockname()[:2]

    def stop(*_: object) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"echo-backend: listening on {host}:{port}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn, args.idle_timeout), daemon=True).start()


if __name__ == "__main__":
    main()
