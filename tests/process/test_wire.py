"""Self-checks of wire.py, the tests' own v2 codec and envelopes (no ChatApp binary needed):
round trips of every type, the exact bytes of a header and of small datagrams, strict decoding,
seal/open and sign/verify round trips, and tampering refused."""
import os
import struct
import tempfile
import unittest

import wire
from wire import DecodeError, Identity, OpenError

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
SIG = bytes(range(64))

SAMPLES = [
    {"t": "register", "id": 1, "name": "alice", "key": K1, "every_ms": 15000, "token": b"", "proof": b""},
    {"t": "register", "id": 2, "name": "alice", "key": K1, "every_ms": 0, "token": b"t" * 40, "proof": SIG},
    {"t": "dereg", "id": 3, "name": "bob"},
    {"t": "direct", "id": 4, "from": "a.b-c_d", "body": b"\x00\xff" * 100},
    {"t": "save", "id": 5, "from": "a", "to": "b", "mid": 2**64 - 1, "force": True, "body": b"sealed"},
    {"t": "channel", "id": 6, "from": "carol", "body": b"x" * wire.MAX_BODY},
    {"t": "relay", "id": 7, "recipient": "bob", "from": "carol", "mid": 99, "body": b""},
    {"t": "probe", "id": 8, "recipient": "m04"},
    {"t": "table", "id": 9, "recipient": "alice", "epoch": 3, "from": 0, "to": 2, "more": False, "entries": [
        {"name": "alice", "ip": "127.0.0.1", "port": 5000, "online": True, "key": K1},
        {"name": "bob", "ip": "198.123.75.45", "port": 65535, "online": False, "key": K2}]},
    {"t": "table", "id": 10, "recipient": "y" * 32, "epoch": 1, "from": 5, "to": 9, "more": True, "entries": []},
    {"t": "stored", "id": 11, "recipient": "dave", "items": [
        {"from": "bob", "channel": False, "ts_us": 1_700_000_000_000_000, "mid": 12, "key": K2, "body": b"b"},
        {"from": "carol", "channel": True, "ts_us": -1, "mid": 13, "key": K1, "body": b"c" * 300}]},
    {"t": "keepalive", "id": 12, "name": "alice"},
    {"t": "lookup", "id": 13, "name": "zed"},
    {"t": "ack", "re": 14, "epoch": 1, "have": 2, "missed": 3},
    {"t": "challenge", "re": 15, "token": b"\x01" * 64},
    {"t": "receipt", "re": 16, "body": b"r" * 57},
    {"t": "reg_ok", "re": 17, "epoch": 4, "pending": 2},
    {"t": "reg_err", "re": 18, "reason": "the name alice belongs to another identity \u00e9"},
    {"t": "exists", "re": 19, "name": "bob"},
    {"t": "refused", "re": 20, "reason": "mailbox is full"},
    {"t": "alive", "re": 21, "live": True},
    {"t": "found", "re": 22, "known": True, "entry": {"name": "d", "ip": "10.0.0.1", "port": 1024,
                                                        "online": True, "key": K2}},
    {"t": "found", "re": 23, "known": False, "entry": {"name": "", "ip": "0.0.0.0", "port": 0,
                                                         "online": False, "key": bytes(32)}},
]


class CodecTest(unittest.TestCase):
    def test_every_type_round_trips(self):
        seen = set()
        for m in SAMPLES:
            with self.subTest(t=m["t"], id=m.get("id", m.get("re"))):
                data = wire.encode(m)
                self.assertEqual(data[0], 2)
                self.assertEqual(data[1], wire.CODES[m["t"]])
                self.assertEqual(wire.decode(data), m)
                self.assertEqual(wire.encode(wire.decode(data)), data)
                seen.add(m["t"])
        self.assertEqual(seen, {name for name, _ in wire.TYPES.values()})

    def test_header_bytes(self):
        self.assertEqual(wire.header(7, 0x0102030405060708), b"\x02\x07\x08\x07\x06\x05\x04\x03\x02\x01")
        self.assertEqual(wire.encode({"t": "probe", "id": 0x0102030405060708, "recipient": "m04"}),
                         b"\x02\x07\x08\x07\x06\x05\x04\x03\x02\x01\x03m04")
        self.assertEqual(wire.encode({"t": "ack", "re": 1}), b"\x02\x40\x01" + bytes(7) + bytes(24))

    def test_exact_bytes_of_small_datagrams(self):
        self.assertEqual(wire.encode({"t": "dereg", "id": 258, "name": "bob"}),
                         b"\x02\x02\x02\x01\x00\x00\x00\x00\x00\x00\x03bob")
        self.assertEqual(wire.encode({"t": "register", "id": 1, "name": "a", "key": K1, "every_ms": 500}),
                         b"\x02\x01" + struct.pack("<Q", 1) + b"\x01a" + K1 + struct.pack("<Q", 500) + b"\x00")
        self.assertEqual(wire.encode({"t": "register", "id": 1, "name": "a", "key": K1, "token": b"tk",
                                      "proof": SIG}),
                         b"\x02\x01" + struct.pack("<Q", 1) + b"\x01a" + K1 + bytes(8) + b"\x02tk" + SIG)
        self.assertEqual(wire.encode({"t": "reg_err", "re": 5, "reason": "no"}),
                         b"\x02\x44\x05" + bytes(7) + b"\x02\x00no")
        self.assertEqual(wire.encode({"t": "table", "id": 1, "recipient": "me", "epoch": 2, "from": 3, "to": 4,
                                      "more": True, "entries": [{"name": "x", "ip": "1.2.3.4", "port": 0x1234,
                                                                 "online": True, "key": K1}]}),
                         b"\x02\x08" + struct.pack("<Q", 1) + b"\x02me" + struct.pack("<QQQ", 2, 3, 4)
                         + b"\x01\x01\x00"
                         + b"\x01x\x01\x02\x03\x04\x34\x12\x01" + K1)
        self.assertEqual(wire.encode({"t": "relay", "id": 1, "recipient": "b", "from": "a", "mid": 9, "body": b"x"}),
                         b"\x02\x06" + struct.pack("<Q", 1) + b"\x01b\x01a" + struct.pack("<QH", 9, 1) + b"x")
        self.assertEqual(wire.encode({"t": "stored", "id": 1, "recipient": "b", "items": []}),
                         b"\x02\x09" + struct.pack("<Q", 1) + b"\x01b\x00\x00")
        self.assertEqual(wire.encode({"t": "alive", "re": 3, "live": False}), b"\x02\x47\x03" + bytes(7) + b"\x00")

    def refused(self, data, reason):
        with self.assertRaises(DecodeError) as cm:
            wire.decode(data)
        self.assertEqual(cm.exception.reason, reason, data[:40])

    def test_strict_decoding(self):
        good = wire.encode({"t": "save", "id": 9, "from": "a", "to": "b", "mid": 1, "force": False, "body": b"s"})
        self.refused(b"", "empty")
        self.refused(b"{\"v\":1}", "old_version")
        self.refused(b"\x01" + good[1:], "bad_version")
        self.refused(b"\x02\x0c" + bytes(8), "unknown_type")
        self.refused(good[:-1], "truncated")
        self.refused(good[:9], "truncated")
        self.refused(good + b"\x00", "trailing")
        self.refused(good.replace(b"\x00\x01\x00s", b"\x02\x01\x00s"), "bad_value")  # force = 2
        self.refused(b"x" * 1473, "too_large")
        self.refused(wire.encode({"t": "dereg", "id": 1, "name": "../x"}, strict=False), "bad_name")
        self.refused(wire.encode({"t": "dereg", "id": 1, "name": ".x"}, strict=False), "bad_name")
        self.refused(wire.encode({"t": "dereg", "id": 1, "name": ""}, strict=False), "bad_name")
        self.refused(wire.encode({"t": "dereg", "id": 1, "name": "y" * 33}, strict=False), "bad_name")
        self.refused(wire.encode({"t": "channel", "id": 1, "from": "a", "body": b"b" * 1025}, strict=False),
                     "too_long")
        self.refused(wire.encode({"t": "refused", "re": 1, "reason": b"\xff\xfe"}, strict=False), "invalid_utf8")
        self.refused(wire.encode({"t": "refused", "re": 1, "reason": "r" * 201}, strict=False), "too_long")
        self.refused(wire.encode({"t": "challenge", "re": 1, "token": b"t" * 65}, strict=False), "too_long")
        # A Table row's name must be valid; an unknown Found may carry an empty one only.
        self.refused(wire.encode({"t": "table", "id": 1, "recipient": "a", "entries": [{"name": ""}]}, strict=False),
                     "bad_name")
        # The server's requests must name their recipient.
        for t in ("relay", "probe", "table", "stored"):
            sender = {"from": "a"} if t == "relay" else {}
            self.refused(wire.encode({"t": t, "id": 1, **sender}, strict=False), "bad_name")
            self.refused(wire.encode({"t": t, "id": 1, "recipient": "../a", **sender}, strict=False), "bad_name")
        self.refused(wire.encode({"t": "found", "re": 1, "known": True, "entry": {"name": ""}}, strict=False),
                     "bad_name")
        # A register without a token carries no proof: 64 more bytes are trailing.
        bare = wire.encode({"t": "register", "id": 1, "name": "a", "key": K1})
        self.refused(bare + SIG, "trailing")

    def test_strict_encoding_refuses_what_a_sender_never_writes(self):
        for m in ({"t": "dereg", "id": 1, "name": "a/b"}, {"t": "direct", "id": 1, "from": "a", "body": b"x" * 1025},
                  {"t": "register", "id": 1, "name": "a", "key": b"short"},
                  {"t": "register", "id": 1, "name": "a", "key": K1, "proof": SIG},
                  {"t": "probe", "id": 1}, {"t": "stored", "id": 1, "recipient": ".x"},
                  {"t": "reg_err", "re": 1, "reason": "r" * 201}):
            with self.subTest(m=m["t"]):
                with self.assertRaises(wire.EncodeError):
                    wire.encode(m)

    def test_v1_json(self):
        self.assertEqual(wire.v1_json({"t": "register", "id": 5, "name": "old"}),
                         b'{"v":1,"t":"register","id":5,"name":"old"}')
        self.assertEqual(wire.decode_v1(b'{"v":1,"t":"reg_err","re":5,"reason":"x"}')["t"], "reg_err")
        self.refused(wire.v1_json({"t": "probe", "id": 1}), "old_version")


class EnvelopeTest(unittest.TestCase):
    def setUp(self):
        self.alice = Identity(bytes([1]) * 32)
        self.bob = Identity(bytes([2]) * 32)
        self.eve = Identity()

    def test_seed_gives_the_same_key(self):
        self.assertEqual(Identity(bytes([1]) * 32).pk, self.alice.pk)
        self.assertNotEqual(self.alice.pk, self.bob.pk)
        self.assertEqual(len(self.alice.pk), 32)
        self.assertEqual(len(self.alice.x_pk), 32)
        self.assertEqual(self.alice.shared(self.bob.pk), self.bob.shared(self.alice.pk))
        self.assertNotEqual(self.alice.shared(self.bob.pk), self.alice.shared(self.eve.pk))

    def test_sign_and_verify(self):
        sig = self.alice.sign(b"hello")
        self.assertTrue(wire.verify(self.alice.pk, b"hello", sig))
        self.assertFalse(wire.verify(self.alice.pk, b"hellO", sig))
        self.assertFalse(wire.verify(self.bob.pk, b"hello", sig))

    def test_direct_round_trip_and_tampering(self):
        body = wire.seal_direct(self.alice, self.bob.pk, 77, "bob", "h\u00e9llo w\u00f6rld", sent_ms=1234)
        self.assertEqual(len(body), 24 + 16 + 1 + 8 + 8 + 4 + len("h\u00e9llo w\u00f6rld".encode()))
        got = wire.open_direct(self.bob, self.alice.pk, body, mid=77, to="bob")
        self.assertEqual(got, {"mid": 77, "sent_ms": 1234, "to": "bob", "text": "h\u00e9llo w\u00f6rld"})
        for i in (0, 23, 24, 40, len(body) - 1):
            bad = bytearray(body)
            bad[i] ^= 1
            with self.subTest(flipped=i), self.assertRaises(OpenError):
                wire.open_direct(self.bob, self.alice.pk, bytes(bad))
        with self.assertRaises(OpenError):
            wire.open_direct(self.bob, self.eve.pk, body)  # not from eve
        with self.assertRaises(OpenError):
            wire.open_direct(self.eve, self.alice.pk, body)  # not for eve
        with self.assertRaises(OpenError):
            wire.open_direct(self.bob, self.alice.pk, body, mid=78)
        with self.assertRaises(OpenError):
            wire.open_direct(self.bob, self.alice.pk, body, to="carol")
        with self.assertRaises(OpenError):
            wire.open_direct(self.bob, self.alice.pk, body[:39])
        # Two seals of the same message differ (random nonce).
        self.assertNotEqual(body, wire.seal_direct(self.alice, self.bob.pk, 77, "bob", "h\u00e9llo w\u00f6rld",
                                                   sent_ms=1234))

    def test_receipt_is_not_a_direct(self):
        r = wire.seal_receipt(self.bob, self.alice.pk, 77, "alice")
        self.assertEqual(wire.open_receipt(self.alice, self.bob.pk, r, mid=77, to="alice"), {"mid": 77, "to": "alice"})
        with self.assertRaises(OpenError):
            wire.open_direct(self.alice, self.bob.pk, r)  # kind 2 is not a direct message
        d = wire.seal_direct(self.bob, self.alice.pk, 77, "alice", "x")
        with self.assertRaises(OpenError):
            wire.open_receipt(self.alice, self.bob.pk, d)
        bad = bytearray(r)
        bad[-1] ^= 0x80
        with self.assertRaises(OpenError):
            wire.open_receipt(self.alice, self.bob.pk, bytes(bad))

    def test_channel_round_trip_and_tampering(self):
        body = wire.sign_channel(self.alice, "alice", 5, "to all", sent_ms=99)
        self.assertEqual(len(body), 64 + 8 + 6)
        self.assertEqual(wire.open_channel(self.alice.pk, "alice", 5, body), {"sent_ms": 99, "text": "to all"})
        for what, args in (("another key", (self.eve.pk, "alice", 5, body)),
                           ("another sender", (self.alice.pk, "alicf", 5, body)),
                           ("another mid", (self.alice.pk, "alice", 6, body)),
                           ("another text", (self.alice.pk, "alice", 5, body[:-1] + b"L")),
                           ("another time", (self.alice.pk, "alice", 5, body[:64] + b"\x00" * 8 + body[72:])),
                           ("a flipped signature", (self.alice.pk, "alice", 5, bytes([body[0] ^ 1]) + body[1:])),
                           ("too short", (self.alice.pk, "alice", 5, body[:71]))):
            with self.subTest(what), self.assertRaises(OpenError):
                wire.open_channel(*args)
        forged = wire.sign_channel(self.eve, "alice", 5, "to all", sent_ms=99)
        with self.assertRaises(OpenError):
            wire.open_channel(self.alice.pk, "alice", 5, forged)

    def test_register_proof(self):
        token = wire.random_bytes(40)
        proof = wire.register_proof(self.alice, "alice", token)
        data = b"chatapp-register-v2" + b"\x05alice" + self.alice.pk + bytes([40]) + token
        self.assertTrue(wire.verify(self.alice.pk, data, proof))
        self.assertFalse(wire.verify(self.alice.pk, data[:-1] + bytes([data[-1] ^ 1]), proof))
        self.assertFalse(wire.verify(self.bob.pk, data, proof))
        self.assertNotEqual(proof, wire.register_proof(self.alice, "alicf", token))

    def test_identity_file(self):
        d = tempfile.mkdtemp(prefix="chatapp-wire-")
        self.addCleanup(__import__("shutil").rmtree, d, True)
        path = os.path.join(d, "chatapp", "identities", "alice.key")
        self.alice.save(path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            self.assertEqual(os.stat(d).st_mode & 0o777, 0o700, d)  # identities/ and chatapp/
        with open(path) as f:
            self.assertEqual(f.read(), "chatapp-identity-v1\n" + "01" * 32 + "\n")
        self.assertEqual(Identity.load(path).pk, self.alice.pk)
        with self.assertRaises(FileExistsError):
            self.bob.save(path)  # O_EXCL: never over an existing identity


if __name__ == "__main__":
    unittest.main()
