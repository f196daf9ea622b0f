"""TLS 1.3 KeyUpdate and record_size_limit with kTLS (tls.rst "TLS 1.3 Key Updates",
"TLS_TX_MAX_PAYLOAD_LEN").

Three kinds of test:

- host tests (no marker): the KeyUpdate message rules, the payload limit a record_size_limit
  asks for, and `relay.KtlsChannel`'s rekey logic against `FakeKernel`, a stand-in for the
  handful of `ktls` calls it makes, that keeps each direction's key and rec_seq as the kernel
  would: the secrets after N rekeys, the order KeyUpdate-then-TLS_TX, a full socket, our own
  KeyUpdate before the record limit, and agreement with the userspace `Session`;
- ``ktls`` (the 6.1 VM run): a client KeyUpdate on this kernel — a clean close where the
  kernel cannot rekey (6.1, 6.12), the connection going on where it can;
- ``ktls7`` (the ``--kernel 7`` VM run: ``tools/vm/ktls-vm run --kernel 7 -- python -m pytest
  -m ktls7 tests/test_ktls_rekey.py``): 1,000 KeyUpdates each way on one streaming connection,
  byte-exact, counted by the kernel; our own KeyUpdates at a (lowered) record limit; a
  record_size_limit=2^10 client that stays in kTLS and gets no record over the limit.

The client of the VM tests is `KernelPeer`: the small RFC 8446 client of
tests/tls13/test_server.py for the handshake, then the project's own `RecordProtection` and
key schedule for the records, over a real socket to the real in-process proxy.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import Iterator

import pytest

from ironsocket import handover, ktls
from ironsocket.relay import KtlsChannel, RecordMode, RelayClosed
from ironsocket.tls13.alerts import Alert, RemoteProtocolError
from ironsocket.tls13.constants import AlertDescription, CipherSuite, ContentType, ExtensionType, Group, HandshakeType
from ironsocket.tls13.handoff import Handoff, TrafficKeys
from ironsocket.tls13.keyschedule import derive_traffic_keys, next_traffic_secret
from ironsocket.tls13.limits import MAX_KEY_UPDATES_WITHOUT_DATA, WRITE_KEY_UPDATE_MARGIN
from ironsocket.tls13.records import AES_GCM_RECORD_LIMIT, RecordProtection
from ironsocket.tls13.post_handshake import KEY_UPDATE_NOT_REQUESTED, KEY_UPDATE_REQUESTED, parse_key_update
from ironsocket.tls13.session import Session
from tests.test_proxy import TIMEOUT, echo_backend, make_proxy, only_connection, wait_until  # noqa: F401
from tests.tls13.test_server import Client

SUITE = CipherSuite.TLS_AES_128_GCM_SHA256


def ladder(suite: CipherSuite, secret: bytes, n: int) -> bytes:
    """application_traffic_secret_N from _0 (RFC 8446 §7.2), n times "traffic upd"."""
    for _ in range(n):
        secret = next_traffic_secret(suite, secret)
    return secret


def keys_for(suite: CipherSuite, secret: bytes, rec_seq: int = 0) -> TrafficKeys:
    key, iv = derive_traffic_keys(suite, secret)
    return TrafficKeys(traffic_secret=secret, key=key, iv=iv, rec_seq=rec_seq)


# ---------------------------------------------------------------- host: pure rules
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (KEY_UPDATE_NOT_REQUESTED, False),
        (KEY_UPDATE_REQUESTED, True),
        (bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 2)), AlertDescription.illegal_parameter),  # §4.6.3
        (bytes((HandshakeType.KEY_UPDATE, 0, 0, 2, 0, 0)), AlertDescription.decode_error),
        (bytes((HandshakeType.KEY_UPDATE, 0, 0, 1)), AlertDescription.decode_error),
        (bytes((HandshakeType.NEW_SESSION_TICKET, 0, 0, 1, 0)), AlertDescription.unexpected_message),
        (b"", AlertDescription.unexpected_message),
    ],
)
def test_parse_key_update(message: bytes, expected: bool | AlertDescription) -> None:
    if isinstance(expected, AlertDescription):
        with pytest.raises(Alert) as exc:
            parse_key_update(message)
        assert exc.value.description is expected
    else:
        assert parse_key_update(message) is expected


@pytest.mark.parametrize(("limit", "payload"), [(None, 1 << 14), ((1 << 14) + 1, 1 << 14), (1 << 14, (1 << 14) - 1),
                                                (1024, 1023), (64, 63)])
def test_max_payload_for_record_size_limit(limit: int | None, payload: int) -> None:
    # RFC 8449 §4: in TLS 1.3 the limit counts the inner content type; the kernel's option does not.
    assert ktls.max_payload_for(limit) == payload
    assert ktls.TLS_TX_MAX_PAYLOAD_LEN == 5


# ---------------------------------------------------------------- host: KtlsChannel vs a fake kernel
class FakeKernel:
    """The kernel state KtlsChannel drives through `ktls`: each direction's keys and rec_seq,
    the records sealed (with the key that sealed them) and the records waiting to be read."""

    def __init__(self, suite: CipherSuite, read_secret: bytes, write_secret: bytes) -> None:
        self.suite = suite
        self.rx = keys_for(suite, read_secret)
        self.tx = keys_for(suite, write_secret)
        self.tx_seq = 0
        self.sent: list[tuple[int, bytes, bytes]] = []  # (content type, body, TX key that sealed it)
        self.incoming: list[tuple[int, bytes]] = []
        self.socket_full = False
        self.can_rekey = True
        self.rx_updates = self.tx_updates = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(ktls, "update_rx", self.update_rx)
        monkeypatch.setattr(ktls, "update_tx", self.update_tx)
        monkeypatch.setattr(ktls, "send_record", self.send_record)
        monkeypatch.setattr(ktls, "recv_record", self.recv_record)
        monkeypatch.setattr(ktls, "tx_rec_seq", lambda sock, suite: self.tx_seq)
        monkeypatch.setattr(ktls, "read_back", self.read_back)

    def update_rx(self, sock: socket.socket, suite: CipherSuite, keys: TrafficKeys) -> None:
        if not self.can_rekey:
            raise ktls.KtlsRekeyUnsupported("kernel cannot rekey RX (TLS 1.3 KeyUpdate)", 16)
        assert suite is self.suite and keys.rec_seq == 0
        self.rx, self.rx_updates = keys, self.rx_updates + 1

    def update_tx(self, sock: socket.socket, suite: CipherSuite, keys: TrafficKeys) -> None:
        assert suite is self.suite and keys.rec_seq == 0
        self.tx, self.tx_seq, self.tx_updates = keys, 0, self.tx_updates + 1

    def send_record(self, sock: socket.socket, content_type: int, body: bytes) -> int:
        if self.socket_full:
            raise BlockingIOError(11, "socket full")
        self.sent.append((content_type, body, self.tx.key))
        self.tx_seq += 1
        return len(body)

    def recv_record(self, sock: socket.socket, bufsize: int) -> tuple[int, bytes]:
        return self.incoming.pop(0)

    def read_back(self, sock: socket.socket) -> ktls.KtlsState:
        return ktls.KtlsState(cipher_suite=self.suite,
                              tx=ktls.DirectionState(rec_seq=self.tx_seq, key=self.tx.key, iv=self.tx.iv),
                              rx=ktls.DirectionState(rec_seq=0, key=self.rx.key, iv=self.rx.iv))


@pytest.fixture
def channel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KtlsChannel, FakeKernel]]:
    read0, write0 = bytes(range(32)), bytes(range(32, 64))
    kernel = FakeKernel(SUITE, read0, write0)
    kernel.install(monkeypatch)
    a, b = socket.socketpair()
    with a, b:
        yield KtlsChannel(a, SUITE, read0, write0), kernel


def client_key_update(ch: KtlsChannel, kernel: FakeKernel, requested: bool) -> None:
    kernel.incoming.append((ContentType.HANDSHAKE, KEY_UPDATE_REQUESTED if requested else KEY_UPDATE_NOT_REQUESTED))
    assert ch.control_record() is False


def test_secrets_after_n_client_key_updates(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    read0, write0 = ch.read_secret, ch.write_secret
    requested = [i % 3 == 0 for i in range(60)]
    for i, req in enumerate(requested):
        client_key_update(ch, kernel, req)
        ch.data_seen()  # the relay does this when client data moves
        answered = sum(requested[: i + 1])
        assert ch.read_secret == ladder(SUITE, read0, i + 1) and kernel.rx.traffic_secret == ch.read_secret
        assert ch.write_secret == ladder(SUITE, write0, answered) and kernel.tx.traffic_secret == ch.write_secret
    assert (ch.rekeys_rx, ch.rekeys_tx, kernel.rx_updates, kernel.tx_updates) == (60, 20, 60, 20)
    # each KeyUpdate of ours went out under the key before the switch, then TLS_TX was set
    assert [body for _, body, _ in kernel.sent] == [KEY_UPDATE_NOT_REQUESTED] * 20
    assert [key for _, _, key in kernel.sent] == [keys_for(SUITE, ladder(SUITE, write0, n)).key for n in range(20)]
    # what an upgrade carries: the current secrets, next to the kernel's keys derived from them
    write, read = ch.traffic_keys()
    assert (write.traffic_secret, read.traffic_secret) == (ch.write_secret, ch.read_secret)
    assert (write.key, read.key) == (kernel.tx.key, kernel.rx.key)


def test_same_secrets_as_the_userspace_session(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    """The kTLS channel and the userspace Session follow the same client KeyUpdates to the same
    secrets (so a connection's state means the same whichever record layer holds it)."""
    ch, kernel = channel
    handoff = Handoff(cipher_suite=SUITE, group=Group.X25519, read=keys_for(SUITE, ch.read_secret),
                      write=keys_for(SUITE, ch.write_secret))
    session = Session(handoff)
    client_write = RecordProtection.from_secret(SUITE, ch.read_secret)
    for i in range(40):
        req = i % 2 == 1
        message = KEY_UPDATE_REQUESTED if req else KEY_UPDATE_NOT_REQUESTED
        records = client_write.seal(ContentType.HANDSHAKE, message)  # under the old key, then switch
        client_write = RecordProtection.from_secret(SUITE, next_traffic_secret(SUITE, client_write.traffic_secret))
        session.receive_data(records + client_write.seal(ContentType.APPLICATION_DATA, b"x"))
        session.next_event()  # KeyUpdateReceived
        session.next_event()  # ApplicationData
        client_key_update(ch, kernel, req)
        ch.data_seen()
    snap = session.snapshot()
    assert snap.read.traffic_secret == ch.read_secret
    assert snap.write.traffic_secret == ch.write_secret


def test_socket_full_owes_one_key_update(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    write0 = ch.write_secret
    kernel.socket_full = True
    for _ in range(3):  # three requests before we can answer: one answer (§4.6.3)
        client_key_update(ch, kernel, True)
    assert ch.tx_update_owed and ch.write_secret == write0 and not kernel.sent
    assert ch.key_update_due()
    with pytest.raises(BlockingIOError):
        ch.send_key_update()
    kernel.socket_full = False
    ch.send_key_update()
    assert not ch.tx_update_owed and not ch.key_update_due()
    assert ch.write_secret == ladder(SUITE, write0, 1) and len(kernel.sent) == 1 and kernel.tx_updates == 1


def test_own_key_update_before_the_record_limit(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    write0 = ch.write_secret
    assert ch.tx_rekey_at == AES_GCM_RECORD_LIMIT - WRITE_KEY_UPDATE_MARGIN  # §5.5, limits.py
    kernel.tx_seq = ch.tx_rekey_at - 1
    assert not ch.key_update_due()
    kernel.tx_seq = ch.tx_rekey_at
    assert ch.key_update_due()
    ch.send_key_update()
    assert kernel.sent[-1][:2] == (ContentType.HANDSHAKE, KEY_UPDATE_NOT_REQUESTED)
    assert kernel.tx_seq == 0 and ch.write_secret == ladder(SUITE, write0, 1) and not ch.key_update_due()
    assert ch.read_secret == kernel.rx.traffic_secret and kernel.rx_updates == 0  # RX untouched
    chacha = KtlsChannel(ch.sock, CipherSuite.TLS_CHACHA20_POLY1305_SHA256, bytes(32), bytes(32))
    assert chacha.tx_rekey_at == (1 << 64) - 1 - WRITE_KEY_UPDATE_MARGIN  # §5.3: only the sequence bounds it


def test_no_key_update_after_close_notify(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    ch.send_close_notify()
    kernel.tx_seq = ch.tx_rekey_at
    client_key_update(ch, kernel, True)
    assert not ch.key_update_due() and kernel.tx_updates == 0 and len(kernel.sent) == 1  # the close_notify


def test_bad_key_update_gets_the_alert(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    kernel.incoming.append((ContentType.HANDSHAKE, bytes((HandshakeType.KEY_UPDATE, 0, 0, 1, 2))))
    with pytest.raises(RemoteProtocolError) as exc:
        ch.control_record()
    assert exc.value.alert is AlertDescription.illegal_parameter
    assert kernel.sent == [(ContentType.ALERT, bytes((2, AlertDescription.illegal_parameter)), kernel.tx.key)]
    assert kernel.rx_updates == 0


def test_key_updates_without_data_are_bounded(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    for _ in range(MAX_KEY_UPDATES_WITHOUT_DATA):
        client_key_update(ch, kernel, False)
    kernel.incoming.append((ContentType.HANDSHAKE, KEY_UPDATE_NOT_REQUESTED))
    with pytest.raises(RemoteProtocolError) as exc:
        ch.control_record()
    assert exc.value.alert is AlertDescription.unexpected_message
    assert kernel.rx_updates == MAX_KEY_UPDATES_WITHOUT_DATA


def test_kernel_that_cannot_rekey_closes_cleanly(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    kernel.can_rekey = False
    read0 = ch.read_secret
    kernel.incoming.append((ContentType.HANDSHAKE, KEY_UPDATE_REQUESTED))
    with pytest.raises(RelayClosed, match="closing the connection cleanly"):
        ch.control_record()
    assert ch.read_secret == read0 and not ch.tx_update_owed and not kernel.sent


def test_traffic_keys_refuses_secrets_the_kernel_does_not_hold(channel: tuple[KtlsChannel, FakeKernel]) -> None:
    ch, kernel = channel
    ch.read_secret = next_traffic_secret(SUITE, ch.read_secret)  # as if a rekey had been lost
    with pytest.raises(ktls.KtlsError, match="do not derive"):
        ch.traffic_keys()


# ---------------------------------------------------------------- the VM: a real client, a real kernel
class KernelPeer:
    """A TLS 1.3 client over a real socket: the handshake by tests/tls13's `Client`, then records
    with the project's `RecordProtection`; KeyUpdates both ways, byte-exact data, and a log of
    every record received (its length and how many came under each server key)."""

    def __init__(self, address: tuple[str, int], *, suite: CipherSuite = SUITE,
                 record_size_limit: int | None = None) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # lock-step small writes
        self.suite = suite
        hs = Client(suites=(suite,))
        exts = hs.extensions()
        if record_size_limit is not None:
            exts.append((ExtensionType.RECORD_SIZE_LIMIT, record_size_limit.to_bytes(2, "big")))
        self.sock.sendall(hs.hello_record(exts=exts))
        self._raw = bytearray()
        while hs.finished is None:
            self._fill()
            end = self._complete_records()
            hs.receive(bytes(self._raw[:end]))
            del self._raw[:end]
        assert not self._raw, "the server sent records before our Finished"
        self.sock.sendall(hs.finished_record())
        assert hs.app_write is not None and hs.app_read is not None
        self.write, self.read = hs.app_write, hs.app_read
        self.data = bytearray()
        self.server_key_updates = 0
        self.records_per_server_key: list[int] = []
        self._records_this_key = 0
        self.record_lengths: list[int] = []
        self.alerts: list[bytes] = []
        self.eof = False

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            raise ConnectionError("EOF from the server")
        self._raw += chunk

    def _complete_records(self) -> int:
        pos = 0
        while len(self._raw) - pos >= 5 and len(self._raw) - pos >= 5 + int.from_bytes(self._raw[pos + 3 : pos + 5], "big"):
            pos += 5 + int.from_bytes(self._raw[pos + 3 : pos + 5], "big")
        return pos

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"".join(self.write.seal(ContentType.APPLICATION_DATA, data[i : i + 16384])
                                   for i in range(0, len(data), 16384)))

    def key_update(self, *, requested: bool) -> None:
        """Our KeyUpdate under the current key, then the next client secret (§4.6.3)."""
        self.sock.sendall(self.write.seal(ContentType.HANDSHAKE, KEY_UPDATE_REQUESTED if requested
                                          else KEY_UPDATE_NOT_REQUESTED))
        self.write = RecordProtection.from_secret(self.suite, next_traffic_secret(self.suite, self.write.traffic_secret))

    def pump(self) -> None:
        """Read and open what arrives: data, the server's KeyUpdates (next read key), alerts."""
        self._fill()
        end = self._complete_records()
        pos = 0
        while pos < end:
            length = int.from_bytes(self._raw[pos + 3 : pos + 5], "big")
            header, body = bytes(self._raw[pos : pos + 5]), bytes(self._raw[pos + 5 : pos + 5 + length])
            pos += 5 + length
            assert header[0] == ContentType.APPLICATION_DATA
            self.record_lengths.append(length)
            inner, content = self.read.open(header, body)
            self._records_this_key += 1
            if inner == ContentType.APPLICATION_DATA:
                self.data += content
            elif inner == ContentType.ALERT:
                self.alerts.append(content)
            elif inner == ContentType.HANDSHAKE and content[0] == HandshakeType.KEY_UPDATE:
                assert parse_key_update(content) is False  # the server never asks
                self.server_key_updates += 1
                self.records_per_server_key.append(self._records_this_key)
                self._records_this_key = 0
                self.read = RecordProtection.from_secret(self.suite,
                                                         next_traffic_secret(self.suite, self.read.traffic_secret))
            else:
                assert inner == ContentType.HANDSHAKE and content[0] == HandshakeType.NEW_SESSION_TICKET, (inner, content[:1])
        del self._raw[:end]

    def recv_exact(self, n: int) -> bytes:
        while len(self.data) < n:
            self.pump()
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    def wait_server_key_updates(self, n: int) -> None:
        while self.server_key_updates < n:
            self.pump()

    def close(self) -> None:
        self.sock.close()


def _kernel_or_skip(*, rekey: bool) -> ktls.KtlsProbe:
    p = ktls.probe()
    missing = [] if p.available else [f"kTLS ({p.reason})"]
    if rekey and p.available:
        missing += [what for what, ok in (("TLS_TX rekey", p.rekey_tx), ("TLS_RX rekey", p.rekey_rx),
                                          ("TLS_TX_MAX_PAYLOAD_LEN", p.tx_max_payload_len)) if not ok]
    if missing:
        why = f"kernel {p.kernel_release} lacks {', '.join(missing)}"
        if os.environ.get("IRONSOCKET_REQUIRE_KTLS"):
            pytest.fail(f"IRONSOCKET_REQUIRE_KTLS is set but the {why}")
        pytest.skip(why)
    return p


@pytest.fixture(scope="module")
def kernel7() -> ktls.KtlsProbe:
    return _kernel_or_skip(rekey=True)


def stat_delta(before: dict[str, int], *names: str) -> dict[str, int]:
    after = ktls.tls_stat()
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


REKEY_STATS = ("TlsRxRekeyOk", "TlsTxRekeyOk", "TlsRxRekeyReceived", "TlsRxRekeyError", "TlsTxRekeyError",
               "TlsDecryptError")


@pytest.mark.ktls
def test_client_key_update_on_this_kernel(echo_backend, make_proxy) -> None:  # noqa: F811
    """Where the kernel cannot rekey RX (6.1, 6.12), a client KeyUpdate ends the connection
    cleanly: a close_notify under the unchanged server key, then EOF, the reason logged.
    Where it can, the connection goes on under the new keys."""
    probe = _kernel_or_skip(rekey=False)
    server = make_proxy(echo_backend)
    client = KernelPeer(server.address)
    client.send(b"before")
    assert client.recv_exact(6) == b"before"
    info = only_connection(server)
    assert info.mode is RecordMode.KTLS_SW
    client.key_update(requested=True)
    if probe.rekey_rx:
        client.send(b"after")
        assert client.recv_exact(5) == b"after"
        client.wait_server_key_updates(1)
        client.close()
        return
    with pytest.raises(ConnectionError):
        while True:
            client.pump()
    assert client.alerts == [bytes((1, AlertDescription.close_notify))] and client.server_key_updates == 0
    wait_until(lambda: not server.connections, what="clean close after KeyUpdate")
    assert "KeyUpdate" in info.relay.stats.close_reason and "closing the connection cleanly" in info.relay.stats.close_reason
    client.close()


def _chunks(seed: int, count: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, largest)) for _ in range(count)]


@pytest.mark.ktls
@pytest.mark.ktls7
@pytest.mark.parametrize(("suite", "count"), [(CipherSuite.TLS_AES_128_GCM_SHA256, 1000),
                                              (CipherSuite.TLS_AES_256_GCM_SHA384, 20),
                                              (CipherSuite.TLS_CHACHA20_POLY1305_SHA256, 20)],
                         ids=lambda v: v.name if isinstance(v, CipherSuite) else str(v))
@pytest.mark.parametrize("requested", [False, True], ids=["update_not_requested", "update_requested"])
def test_key_updates_on_one_streaming_connection(kernel7, echo_backend, make_proxy, suite: CipherSuite,  # noqa: F811
                                                 count: int, requested: bool) -> None:
    """``count`` client KeyUpdates with data between them; with update_requested each one is
    answered by ours (TLS_TX rekeyed) before the next. Byte-exact, counted by the kernel, and
    the state an upgrade would carry holds the current secrets and sequence numbers."""
    server = make_proxy(echo_backend, suites=(suite,))
    before = ktls.tls_stat()
    client = KernelPeer(server.address, suite=suite)
    sent, got = hashlib.sha256(), hashlib.sha256()
    client_secrets = [client.write.traffic_secret]
    for i, chunk in enumerate(_chunks(count, count + 1, 3000)):
        client.send(chunk)
        sent.update(chunk)
        if i == count:
            got.update(client.recv_exact(len(chunk)))  # the last chunk: after the last KeyUpdate
            break
        client.key_update(requested=requested)
        client_secrets.append(client.write.traffic_secret)
        if requested:
            client.wait_server_key_updates(i + 1)
        got.update(client.recv_exact(len(chunk)))
    assert got.digest() == sent.digest()
    assert len(set(client_secrets)) == count + 1
    info = only_connection(server)
    channel = info.relay.client
    assert isinstance(channel, KtlsChannel) and info.mode is RecordMode.KTLS_SW
    assert (channel.rekeys_rx, channel.rekeys_tx) == (count, count if requested else 0)
    assert client.server_key_updates == (count if requested else 0)
    assert stat_delta(before, *REKEY_STATS) == {
        "TlsRxRekeyOk": count, "TlsTxRekeyOk": count if requested else 0, "TlsRxRekeyReceived": count,
        "TlsRxRekeyError": 0, "TlsTxRekeyError": 0, "TlsDecryptError": 0}
    entry = handover.connection_entry(info)
    assert entry.rx.traffic_secret == client.write.traffic_secret
    assert entry.tx.traffic_secret == client.read.traffic_secret
    assert (entry.rx.rec_seq, entry.tx.rec_seq) == (client.write.rec_seq, client.read.rec_seq)
    assert entry.ktls is not None and entry.ktls.tx_update_owed is False
    client.close()


@pytest.mark.ktls
@pytest.mark.ktls7
def test_server_key_update_at_the_record_limit(kernel7, echo_backend, make_proxy) -> None:  # noqa: F811
    """Our own KeyUpdate when TX's rec_seq reaches ``tx_rekey_at`` (the §5.5 margin before the
    AES-GCM limit; lowered to 8 records here): no key seals more than 8 data records + its
    KeyUpdate, and the client reads every byte."""
    server = make_proxy(echo_backend, suites=(SUITE,))
    before = ktls.tls_stat()
    client = KernelPeer(server.address)
    client.send(b"hello")
    assert client.recv_exact(5) == b"hello"
    channel = only_connection(server).relay.client
    assert isinstance(channel, KtlsChannel)
    channel.tx_rekey_at = 8
    sent, got = hashlib.sha256(), hashlib.sha256()
    for chunk in _chunks(7, 600, 1000):  # lock-step: each echo is one or two records
        client.send(chunk)
        sent.update(chunk)
        got.update(client.recv_exact(len(chunk)))
    assert got.digest() == sent.digest()
    assert client.server_key_updates == channel.rekeys_tx >= 600 // 9 - 1
    assert max(client.records_per_server_key) <= 8 + 1
    assert channel.rekeys_rx == 0
    assert stat_delta(before, "TlsTxRekeyOk", "TlsTxRekeyError", "TlsDecryptError") == {
        "TlsTxRekeyOk": channel.rekeys_tx, "TlsTxRekeyError": 0, "TlsDecryptError": 0}
    client.close()


@pytest.mark.ktls
@pytest.mark.ktls7
def test_record_size_limit_stays_in_ktls(kernel7, echo_backend, make_proxy) -> None:  # noqa: F811
    """RFC 8449 record_size_limit = 2^10: the connection is in kTLS with TLS_TX_MAX_PAYLOAD_LEN
    2^10 - 1, and every record it receives (through TX rekeys too) is at most 2^10 bytes of
    inner plaintext (content + type) plus the AEAD tag."""
    limit = 1 << 10
    server = make_proxy(echo_backend, suites=(SUITE,))
    client = KernelPeer(server.address, record_size_limit=limit)
    payload = random.Random(10).randbytes(200_000)
    client.send(payload[:100_000])
    assert client.recv_exact(100_000) == payload[:100_000]
    info = only_connection(server)
    assert info.mode is RecordMode.KTLS_SW and isinstance(info.relay.client, KtlsChannel)
    assert ktls.tx_max_payload_len(info.relay.client.sock) == limit - 1
    client.key_update(requested=True)
    client.wait_server_key_updates(1)
    client.send(payload[100_000:])
    assert client.recv_exact(100_000) == payload[100_000:]
    tag = 16
    assert max(client.record_lengths) == limit + tag  # full records, none larger
    assert client.server_key_updates == 1
    client.close()


@pytest.mark.ktls7
def test_key_updates_across_an_exec_upgrade(tmp_path, echo_backend) -> None:  # noqa: F811
    """KeyUpdates both ways, an exec upgrade of the real ``serve`` process, then more: the
    upgrade carries the current generation (inspect-keys' fingerprints are those of the keys
    the client now uses) and the new program derives the next keys from the carried secrets.
    kTLS on the 7.x kernel; on the host the userspace record layer (same assertions)."""
    from ironsocket.inspect import fingerprint
    from tests.test_upgrade import Server, inspect

    if ktls.probe().available:
        _kernel_or_skip(rekey=True)
    server = Server(tmp_path, echo_backend[1])
    try:
        client = KernelPeer(("127.0.0.1", server.port))
        chunks = iter(_chunks(11, 41, 2000))

        def rekeys(n: int) -> None:
            for _ in range(n):
                chunk = next(chunks)
                client.send(chunk)
                client.key_update(requested=True)
                client.wait_server_key_updates(client.server_key_updates + 1)
                assert client.recv_exact(len(chunk)) == chunk

        rekeys(20)
        (before,) = inspect(server)
        assert before["mode"] == ("ktls-sw" if ktls.probe().available else "userspace")
        assert before["rx"]["fingerprint"] == fingerprint(client.write.key, client.write.iv)
        assert before["tx"]["fingerprint"] == fingerprint(client.read.key, client.read.iv)
        assert (before["rx"]["rec_seq"], before["tx"]["rec_seq"]) == (client.write.rec_seq, client.read.rec_seq)
        result = server.upgrade()
        assert result.returncode == 0, result.stderr + server.text()[-3000:]
        (after,) = inspect(server)
        assert (after["id"], after["tx"], after["rx"]) == (before["id"], before["tx"], before["rx"])
        rekeys(20)
        last = next(chunks)
        client.send(last)
        assert client.recv_exact(len(last)) == last
        assert client.server_key_updates == 40
        client.close()
    finally:
        server.close()
