"""Every bound the TLS 1.3 core puts on what a peer may make it do (h11's rule: named, justified).

A peer that follows RFC 8446 never comes near any of these; a peer that hits one gets a fatal
alert (unexpected_message unless noted) instead of costing us CPU, memory or output without end.
Each constant says which RFC rule or which attack it answers. The engine (`server.py`) and the
userspace record layer (`session.py`) import them from here and nowhere else.
"""

from __future__ import annotations

# -- handshake (server.py) --------------------------------------------------------------------
# The largest ClientHello the §4.1.2 struct allows: version 2 + random 32 + session id 1+32 +
# cipher suites 2+(2^16-2) + compression 1+255 + extensions 2+(2^16-1) = 131396 bytes of body
# (OpenSSL's CLIENT_HELLO_MAX_LENGTH is the same number). Anything legal fits, e.g. a
# signature_algorithms list of ~32,700 entries (tlsfuzzer's "tolerance" case).
MAX_CLIENT_HELLO_SIZE = 2 + 32 + (1 + 32) + (2 + 0xFFFE) + (1 + 255) + (2 + 0xFFFF)
# Any other handshake message a client sends us before Finished (only Finished, <= 64 bytes).
MAX_HANDSHAKE_MESSAGE_SIZE = 64 * 1024
# §4.2.10: a server that rejects 0-RTT skips records it cannot deprotect (or, after a
# HelloRetryRequest, every application_data record before the second ClientHello) "up to the
# configured max_early_data_size". We never accept early data; this bounds what we skip, counted
# in received bytes including the 5-byte record header (so empty records are not free).
MAX_EARLY_DATA_SKIP = 64 * 1024
# §5 / Appendix D.4: in middlebox compatibility mode a client sends exactly one
# change_cipher_spec (before its second ClientHello or before its encrypted flight). The RFC
# says to drop it; a second one has no purpose, so 200,000 of them are not dropped for free.
MAX_CHANGE_CIPHER_SPEC_RECORDS = 1
# §4.2.11: a ClientHello may offer many PSK identities; each one we try costs an AES-GCM open.
# Clients offer one (OpenSSL, NSS, GnuTLS, BoringSSL); we look at this many, the rest are ignored.
MAX_PSK_IDENTITIES_TRIED = 4

# -- after the handshake (session.py) ---------------------------------------------------------
# A KeyUpdate (§4.6.3) is one byte of body; NewSessionTicket/CertificateRequest are not
# expected from a client at all. Bounds the post-handshake reassembly buffer.
MAX_POST_HANDSHAKE_MESSAGE_SIZE = 1024
# §5.1 allows zero-length application_data records (traffic analysis countermeasure), but a run
# of them carries nothing: at most this many in a row (OpenSSL's MAX_EMPTY_RECORDS is 32), then
# unexpected_message. A record with content resets the count.
MAX_CONSECUTIVE_EMPTY_RECORDS = 32
# §4.6.3 KeyUpdates exist to stay under the AEAD limits (§5.5), i.e. they follow data. Each one
# costs an HKDF and a new AEAD key, and one with update_requested makes us send one too. At
# most this many from the peer between two of its application_data records that carry data.
MAX_KEY_UPDATES_WITHOUT_DATA = 32
# §5.5: we start our own KeyUpdate (update_not_requested) when the write key has this many
# records left before its usage limit (2^24.5 records for AES-GCM). Any value >= 2 keeps one
# record for the KeyUpdate itself and the last one for a closing alert; more is harmless.
WRITE_KEY_UPDATE_MARGIN = 1 << 16
