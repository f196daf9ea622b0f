#!/usr/bin/env python3
"""The CPU of a userspace relay's two pumps per 64-byte echo round trip, in one process.

No server, no engine, no other thread: a `relay.Relay` over two socketpairs (client side and
backend side), its `OpenToBackend` and `SealToClient` pumps stepped by hand until they wait,
the client's records sealed and opened here with the same `RecordProtection`. Only the pumps'
steps are timed (``time.thread_time``: this thread's CPU, so other jobs on the machine count
far less than in echo_cpu.py, whose server sleeps and wakes twice per round trip), their four
syscalls included. Compare trees by running it with PYTHONPATH=DIR (the tree's ironsocket is
then imported instead of this one's), alternating, several times.

    tools/bench/echo_steps.py [--round-trips 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    import ironsocket
    from ironsocket.engine import WaitFor
    from ironsocket.relay import OpenToBackend, Relay, SealToClient, UserspaceChannel
    from ironsocket.tls13.constants import CipherSuite
    from ironsocket.tls13.handoff import Handoff, TrafficKeys
    from ironsocket.tls13.records import RecordProtection
    from ironsocket.tls13.session import Session

    suite = CipherSuite.TLS_AES_128_GCM_SHA256

    def keys() -> TrafficKeys:
        return TrafficKeys(traffic_secret=os.urandom(32), key=os.urandom(16), iv=os.urandom(12), rec_seq=0)

    c2s, s2c = keys(), keys()
    session = Session(Handoff(cipher_suite=suite, group=None, read=c2s, write=s2c))
    client_write, client_read = RecordProtection.from_keys(suite, c2s), RecordProtection.from_keys(suite, s2c)
    relay_client, client = socket.socketpair()
    relay_backend, backend = socket.socketpair()

    class NoEngine:  # the pumps are stepped here
        def add(self, relay: object, idle_timeout: object) -> None:
            return None

    relay = Relay(1, UserspaceChannel(relay_client, session), relay_backend, engine=NoEngine(),  # type: ignore[arg-type]
                  idle_timeout=None)
    c2b, b2c = OpenToBackend(relay), SealToClient(relay)
    msg = b"p" * 64

    def until_wait(pump: OpenToBackend | SealToClient) -> float:
        t0 = time.thread_time()
        try:
            while not pump.step():
                pass
        except WaitFor:
            pass
        return time.thread_time() - t0

    def round_trip() -> float:
        client.sendall(client_write.seal(23, msg))
        spent = until_wait(c2b)
        data = backend.recv(1024)
        backend.sendall(data)
        spent += until_wait(b2c)
        record = client.recv(1024)
        content_type, echoed = client_read.open(record[:5], record[5:])
        if echoed != msg:
            raise SystemExit("the echo differs from what was sent")
        return spent

    for _ in range(500):
        round_trip()
    runs = []
    for _ in range(a.repeat):
        runs.append(sum(round_trip() for _ in range(a.round_trips)) / a.round_trips * 1e6)
    print(f"{os.path.dirname(os.path.dirname(ironsocket.__file__))}: pump steps, CPU µs per round trip (both "
          f"directions, their 4 syscalls included), {a.repeat} × {a.round_trips}: median {statistics.median(runs):.1f} "
          f"[{min(runs):.1f}–{max(runs):.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
