"""A tiny half-close-aware TCP echo server, run as a subprocess by the interop tests.

    python tests/echo_backend.py [--host 127.0.0.1] [--port 0]

Prints ``echo-backend: listening on HOST:PORT`` to stdout (flushed) once it is listening, then
echoes every byte of every connection back, one thread per connection. When the peer shuts its
write side down (EOF), everything read so far has already been written back (each read is
echoed with ``sendall`` before the next read); the server then shuts its own write side down
(FIN) and closes. Exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading


def serve_one(conn: socket.socket) -> None:
    try:
        conn.settimeout(120)  # never hang forever on a forgotten test connection
        while True:
            data = conn.recv(65536)
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
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
