"""ChatApp's wire format version 2 and its envelopes, for simulated clients in the process tests.

Everything here follows the shared design of issue 12 (wire format v2, what is signed and
sealed, the identity file): a datagram is the 10-byte header (version 2, type code, u64 LE id
or re) and the type's fields in order, nothing after them. Messages are plain dicts:
``{"t": "register", "id": 7, "name": "alice", "key": b"...", "every_ms": 0, "token": b"",
"proof": b""}``; `encode` fills fields left out with their zero value, `decode` returns every
field. Text (`text`, `reason`) is str, names are str, keys/signatures/bodies/tokens are bytes.

Crypto is libsodium's (1.0.18, through ctypes), never home-made: Ed25519 identities, X25519
boxes from them (crypto_box_beforenm + crypto_box_easy_afternm), Ed25519 detached signatures.
"""
import ctypes
import json
import os
import struct
import time

VERSION = 2
MAX_DATAGRAM = 1472
MAX_TEXT = 600
MAX_BODY = 1024
MAX_TOKEN = 64
MAX_NAME = 32
MAX_REASON = 200
HEADER = 10

KIND_DIRECT = 1
KIND_RECEIPT = 2
CHANNEL_DOMAIN = b"chatapp-channel-v2"
REGISTER_DOMAIN = b"chatapp-register-v2"
IDENTITY_MAGIC = "chatapp-identity-v1"

# code -> (type name as the C++ side's type_name() says it, fields after the header).
# Field kinds: u8 u16 u64 i64 bool name key sig ip4 body(bytes16) token(bytes8) reason(text),
# and the composite ones handled below: proof (sig, only with a token), entries, items, found.
TYPES = {
    1: ("register", [("name", "name"), ("key", "key"), ("every_ms", "u64"), ("token", "token"),
                     ("proof", "proof")]),
    2: ("dereg", [("name", "name")]),
    3: ("direct", [("from", "name"), ("body", "body")]),
    4: ("save", [("from", "name"), ("to", "name"), ("mid", "u64"), ("force", "bool"), ("body", "body")]),
    5: ("channel", [("from", "name"), ("body", "body")]),
    # The server's requests to a client name it first ("recipient"): it answers only its own.
    6: ("relay", [("recipient", "name"), ("from", "name"), ("mid", "u64"), ("body", "body")]),
    7: ("probe", [("recipient", "name")]),
    8: ("table", [("recipient", "name"), ("epoch", "u64"), ("from", "u64"), ("to", "u64"), ("more", "bool"),
                  ("entries", "entries")]),
    9: ("stored", [("recipient", "name"), ("items", "items")]),
    10: ("keepalive", [("name", "name")]),
    11: ("lookup", [("name", "name")]),
    64: ("ack", [("epoch", "u64"), ("have", "u64"), ("missed", "u64")]),
    65: ("challenge", [("token", "token")]),
    66: ("receipt", [("body", "body")]),
    67: ("reg_ok", [("epoch", "u64"), ("pending", "u64")]),
    68: ("reg_err", [("reason", "reason")]),
    69: ("exists", [("name", "name")]),
    70: ("refused", [("reason", "reason")]),
    71: ("alive", [("live", "bool")]),
    72: ("found", [("known", "bool"), ("entry", "found_entry")]),
}
CODES = {name: code for code, (name, _) in TYPES.items()}
FIXED = {"u8": "<B", "u16": "<H", "u64": "<Q", "i64": "<q"}
ZERO_KEY = bytes(32)


class DecodeError(ValueError):
    """A datagram refused by `decode`; `reason` is a short word (empty, truncated, bad_name...)."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class EncodeError(ValueError):
    """A message `encode(strict=True)` will not write (a field out of the design's bounds)."""


def is_request(m):
    return CODES[m["t"]] < 64


def valid_name(name):
    """1-32 of [A-Za-z0-9_.-], not starting with '.' (as valid_name() in the codec)."""
    if isinstance(name, str):
        try:
            name = name.encode("ascii")
        except UnicodeEncodeError:
            return False
    if not 1 <= len(name) <= MAX_NAME or name[:1] == b".":
        return False
    return all(c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-" for c in name)


# ------------------------------------------------------------------------------------- encoding


def _raw(v):
    return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else bytes(v)


class _Writer:
    def __init__(self, strict):
        self.out = bytearray()
        self.strict = strict

    def check(self, ok, what):
        if self.strict and not ok:
            raise EncodeError(what)

    def fixed(self, kind, v):
        self.out += struct.pack(FIXED[kind], v)

    def boolean(self, v):
        # Non-strict writers may put any byte (bad_value cases): True/False or an int.
        b = int(v)
        self.check(b in (0, 1), f"bool {v!r}")
        self.out.append(b & 0xFF)

    def name(self, v, optional=False):
        raw = _raw(v)
        self.check((optional and raw == b"") or valid_name(raw), f"name {v!r}")
        self.out.append(min(len(raw), 255))
        self.out += raw[:255]

    def blob(self, v, size):
        raw = _raw(v)
        self.check(len(raw) == size, f"{size}-byte field of {len(raw)} bytes")
        self.out += raw

    def bytes16(self, v, limit):
        raw = _raw(v)
        self.check(len(raw) <= limit, f"{len(raw)} bytes, the limit is {limit}")
        self.out += struct.pack("<H", min(len(raw), 0xFFFF)) + raw[:0xFFFF]

    def bytes8(self, v, limit):
        raw = _raw(v)
        self.check(len(raw) <= limit, f"token of {len(raw)} bytes")
        self.out.append(min(len(raw), 255))
        self.out += raw[:255]

    def text(self, v, limit):
        raw = _raw(v)
        if self.strict:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EncodeError("text is not UTF-8") from None
        self.check(len(raw) <= limit, f"text of {len(raw)} bytes")
        self.out += struct.pack("<H", min(len(raw), 0xFFFF)) + raw[:0xFFFF]

    def ip4(self, v):
        parts = [int(p) for p in v.split(".")]
        self.check(len(parts) == 4 and all(0 <= p <= 255 for p in parts), f"ip {v!r}")
        self.out += bytes(parts)

    def entry(self, e, optional_name=False):
        self.name(e.get("name", ""), optional=optional_name)
        self.ip4(e.get("ip", "0.0.0.0"))
        self.fixed("u16", e.get("port", 0))
        self.boolean(e.get("online", False))
        self.blob(e.get("key", ZERO_KEY), 32)

    def item(self, i):
        self.name(i["from"])
        self.boolean(i.get("channel", False))
        self.fixed("i64", i.get("ts_us", 0))
        self.fixed("u64", i.get("mid", 0))
        self.blob(i.get("key", ZERO_KEY), 32)
        self.bytes16(i.get("body", b""), MAX_BODY)


def encode(m, strict=True):
    """The datagram for message dict `m` (``m["t"]`` names the type). Fields left out are zero
    (empty for names, bytes, text). With strict=False the design's bounds are not checked, so
    tests can build datagrams a correct sender never writes (bad names, long bodies, bool 2)."""
    code = m["code"] if "code" in m else CODES[m["t"]]
    name, fields = TYPES.get(code, (None, []))
    w = _Writer(strict)
    hid = m.get("re", 0) if code >= 64 else m.get("id", 0)
    w.out += struct.pack("<BBQ", m.get("v", VERSION), code, hid)
    for field, kind in fields:
        v = m.get(field)
        if kind in FIXED:
            w.fixed(kind, v or 0)
        elif kind == "bool":
            w.boolean(v or False)
        elif kind == "name":
            w.name(v or "")
        elif kind == "key":
            w.blob(v if v is not None else ZERO_KEY, 32)
        elif kind == "body":
            w.bytes16(v or b"", MAX_BODY)
        elif kind == "token":
            w.bytes8(v or b"", MAX_TOKEN)
        elif kind == "reason":
            w.text(v or "", MAX_REASON)
        elif kind == "proof":
            if m.get("token"):
                w.blob(v if v is not None else bytes(64), 64)
            else:
                w.check(not v, "a proof without a token")
        elif kind == "entries":
            es = v or []
            w.fixed("u16", len(es))
            for e in es:
                w.entry(e)
        elif kind == "items":
            items = v or []
            w.fixed("u16", len(items))
            for i in items:
                w.item(i)
        elif kind == "found_entry":
            w.entry(v or {}, optional_name=not m.get("known"))
        else:  # pragma: no cover - the table above is the whole list
            raise AssertionError(kind)
    w.check(len(w.out) <= MAX_DATAGRAM, f"datagram of {len(w.out)} bytes")
    return bytes(w.out)


# ------------------------------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise DecodeError("truncated", f"{n} bytes wanted at {self.pos} of {len(self.data)}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def fixed(self, kind):
        fmt = FIXED[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def boolean(self):
        b = self.take(1)[0]
        if b > 1:
            raise DecodeError("bad_value", f"bool {b}")
        return bool(b)

    def name(self, optional=False):
        raw = self.take(self.take(1)[0])
        if not (optional and raw == b"") and not valid_name(raw):
            raise DecodeError("bad_name", repr(raw))
        return raw.decode("ascii")

    def bytes16(self, limit):
        n = self.fixed("u16")
        if n > limit:
            raise DecodeError("too_long", f"{n} bytes")
        return self.take(n)

    def bytes8(self, limit):
        n = self.take(1)[0]
        if n > limit:
            raise DecodeError("too_long", f"token of {n} bytes")
        return self.take(n)

    def text(self, limit):
        raw = self.bytes16(limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("invalid_utf8") from None

    def ip4(self):
        return ".".join(str(b) for b in self.take(4))

    def entry(self, optional_name=False):
        return {"name": self.name(optional=optional_name), "ip": self.ip4(), "port": self.fixed("u16"),
                "online": self.boolean(), "key": self.take(32)}

    def item(self):
        return {"from": self.name(), "channel": self.boolean(), "ts_us": self.fixed("i64"),
                "mid": self.fixed("u64"), "key": self.take(32), "body": self.bytes16(MAX_BODY)}


def decode(data):
    """The message dict of one datagram; DecodeError for anything that is not exactly one.
    A version-1 (JSON) datagram is DecodeError("old_version"); `decode_v1` reads it."""
    data = bytes(data)
    if not data:
        raise DecodeError("empty")
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("too_large", f"{len(data)} bytes")
    if data[:1] == b"{":
        raise DecodeError("old_version")
    if data[0] != VERSION:
        raise DecodeError("bad_version", str(data[0]))
    r = _Reader(data)
    _, code, hid = struct.unpack("<BBQ", r.take(HEADER))
    if code not in TYPES:
        raise DecodeError("unknown_type", str(code))
    name, fields = TYPES[code]
    m = {"t": name, ("re" if code >= 64 else "id"): hid}
    for field, kind in fields:
        if kind in FIXED:
            m[field] = r.fixed(kind)
        elif kind == "bool":
            m[field] = r.boolean()
        elif kind == "name":
            m[field] = r.name()
        elif kind == "key":
            m[field] = r.take(32)
        elif kind == "body":
            m[field] = r.bytes16(MAX_BODY)
        elif kind == "token":
            m[field] = r.bytes8(MAX_TOKEN)
        elif kind == "reason":
            m[field] = r.text(MAX_REASON)
        elif kind == "proof":
            m[field] = r.take(64) if m["token"] else b""
        elif kind == "entries":
            m[field] = [r.entry() for _ in range(r.fixed("u16"))]
        elif kind == "items":
            m[field] = [r.item() for _ in range(r.fixed("u16"))]
        elif kind == "found_entry":
            m[field] = r.entry(optional_name=not m["known"])
    if r.pos != len(data):
        raise DecodeError("trailing", f"{len(data) - r.pos} bytes after the last field")
    return m


def try_decode(data):
    """`decode`, or None for a datagram it refuses."""
    try:
        return decode(data)
    except DecodeError:
        return None


def header(code, hid):
    """The 10-byte header: version 2, `code`, u64 LE id (or re)."""
    return struct.pack("<BBQ", VERSION, code, hid)


# ------------------------------------------------------------------------------------- version 1


def v1_json(obj):
    """A version-1 datagram as ChatApp 1.x wrote it: {"v":1,"t":...} then the fields, compact."""
    return json.dumps(dict({"v": 1}, **obj), separators=(",", ":")).encode()


def decode_v1(data):
    """The JSON object of a version-1 datagram (an old client's view of it)."""
    m = json.loads(data)
    if not isinstance(m, dict) or m.get("v") != 1:
        raise DecodeError("not_v1", repr(data[:60]))
    return m


# ------------------------------------------------------------------------------------- libsodium


def _load_sodium():
    for name in ("libsodium.so.23", "libsodium.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise ImportError("libsodium is not installed (libsodium23)")
    if lib.sodium_init() < 0:
        raise ImportError("sodium_init failed")
    return lib


_na = _load_sodium()
_ull = ctypes.c_ulonglong
_na.crypto_sign_seed_keypair.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
_na.crypto_sign_detached.argtypes = [ctypes.c_char_p, ctypes.POINTER(_ull), ctypes.c_char_p, _ull, ctypes.c_char_p]
_na.crypto_sign_verify_detached.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _ull, ctypes.c_char_p]
_na.crypto_sign_ed25519_pk_to_curve25519.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_na.crypto_sign_ed25519_sk_to_curve25519.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_na.crypto_box_beforenm.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
_na.crypto_box_easy_afternm.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _ull, ctypes.c_char_p, ctypes.c_char_p]
_na.crypto_box_open_easy_afternm.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _ull, ctypes.c_char_p,
                                             ctypes.c_char_p]
_na.randombytes_buf.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
NONCE = _na.crypto_box_noncebytes()
MAC = _na.crypto_box_macbytes()
assert (NONCE, MAC, _na.crypto_sign_bytes(), _na.crypto_box_beforenmbytes()) == (24, 16, 64, 32)


def random_bytes(n):
    buf = ctypes.create_string_buffer(n)
    _na.randombytes_buf(buf, n)
    return buf.raw


def verify(pk, message, sig):
    """True if `sig` is `pk`'s Ed25519 signature over `message`."""
    if len(pk) != 32 or len(sig) != 64:
        return False
    return _na.crypto_sign_verify_detached(bytes(sig), bytes(message), len(message), bytes(pk)) == 0


def x25519_public(ed_pk):
    out = ctypes.create_string_buffer(32)
    if _na.crypto_sign_ed25519_pk_to_curve25519(out, bytes(ed_pk)) != 0:
        raise ValueError("not an Ed25519 public key")
    return out.raw


def make_private_dirs(path):
    """Creates every missing directory of `path` with mode 0700 (os.makedirs gives the
    intermediate ones the umask's mode: ChatApp refuses a chatapp/ directory open to others)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o700)
        os.chmod(d, 0o700)  # whatever the umask


class Identity:
    """An Ed25519 key pair from a 32-byte seed (random if not given), with its X25519 pair."""

    def __init__(self, seed=None):
        self.seed = bytes(seed) if seed is not None else random_bytes(32)
        if len(self.seed) != 32:
            raise ValueError("the seed is 32 bytes")
        pk = ctypes.create_string_buffer(32)
        sk = ctypes.create_string_buffer(64)
        if _na.crypto_sign_seed_keypair(pk, sk, self.seed) != 0:
            raise ValueError("crypto_sign_seed_keypair failed")
        self.pk, self.sk = pk.raw, sk.raw
        self.x_pk = x25519_public(self.pk)
        xsk = ctypes.create_string_buffer(32)
        if _na.crypto_sign_ed25519_sk_to_curve25519(xsk, self.sk) != 0:
            raise ValueError("crypto_sign_ed25519_sk_to_curve25519 failed")
        self.x_sk = xsk.raw
        self._shared = {}

    @property
    def key(self):
        """The public key as carried on the wire (the Ed25519 one)."""
        return self.pk

    def sign(self, message):
        sig = ctypes.create_string_buffer(64)
        if _na.crypto_sign_detached(sig, None, bytes(message), len(message), self.sk) != 0:
            raise ValueError("crypto_sign_detached failed")
        return sig.raw

    def shared(self, peer_pk):
        """crypto_box_beforenm(peer's X25519 public key, my X25519 secret key), cached per peer."""
        peer_pk = bytes(peer_pk)
        if peer_pk not in self._shared:
            k = ctypes.create_string_buffer(32)
            if _na.crypto_box_beforenm(k, x25519_public(peer_pk), self.x_sk) != 0:
                raise ValueError("crypto_box_beforenm failed (a weak key?)")
            self._shared[peer_pk] = k.raw
        return self._shared[peer_pk]

    def box(self, peer_pk, plain):
        """nonce(24 random bytes) || crypto_box_easy_afternm(plain)."""
        nonce = random_bytes(NONCE)
        c = ctypes.create_string_buffer(len(plain) + MAC)
        if _na.crypto_box_easy_afternm(c, bytes(plain), len(plain), nonce, self.shared(peer_pk)) != 0:
            raise ValueError("crypto_box_easy_afternm failed")
        return nonce + c.raw

    def unbox(self, peer_pk, body):
        """The plaintext of box(), or None if it does not authenticate."""
        body = bytes(body)
        if len(body) < NONCE + MAC:
            return None
        nonce, c = body[:NONCE], body[NONCE:]
        m = ctypes.create_string_buffer(max(1, len(c) - MAC))
        if _na.crypto_box_open_easy_afternm(m, c, len(c), nonce, self.shared(peer_pk)) != 0:
            return None
        return m.raw[:len(c) - MAC]

    # ---- the identity file

    def file_text(self):
        return f"{IDENTITY_MAGIC}\n{self.seed.hex()}\n"

    def save(self, path):
        """Writes the identity file as the client does: parent dirs 0700, the file 0600, O_EXCL."""
        make_private_dirs(os.path.dirname(os.path.abspath(path)))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.file_text())
        return path

    @classmethod
    def load(cls, path):
        with open(path) as f:
            lines = f.read().split("\n")
        if lines[0] != IDENTITY_MAGIC or len(lines) < 2 or len(lines[1]) != 64:
            raise ValueError(f"{path} is not a chatapp-identity-v1 file")
        return cls(bytes.fromhex(lines[1]))


# ------------------------------------------------------------------------------------- envelopes


def lv_name(name):
    """A name inside signed or sealed data: u8 length + bytes."""
    raw = _raw(name)
    return bytes([len(raw)]) + raw


def now_ms():
    return int(time.time() * 1000)


class OpenError(ValueError):
    """A body that does not open, verify or match its datagram."""


def seal_direct(me, peer_pk, mid, to, text, sent_ms=None):
    """A Direct (or Save) body from `me` to the holder of `peer_pk`:
    box(u8 1 || u64 mid || u64 sent_ms || name to || text)."""
    sent_ms = now_ms() if sent_ms is None else sent_ms
    plain = bytes([KIND_DIRECT]) + struct.pack("<QQ", mid, sent_ms) + lv_name(to) + _raw(text)
    return me.box(peer_pk, plain)


def _parse_sealed(plain, kind):
    if plain is None:
        raise OpenError("does not authenticate")
    if len(plain) < 1 or plain[0] != kind:
        raise OpenError(f"kind {plain[:1]!r}, not {kind}")
    return plain


def open_direct(me, sender_pk, body, mid=None, to=None):
    """{"mid", "sent_ms", "to", "text"} of a Direct body `sender_pk` sealed for `me`; OpenError if
    it does not authenticate or (when given) its mid or recipient differ from the datagram's."""
    plain = _parse_sealed(me.unbox(sender_pk, body), KIND_DIRECT)
    if len(plain) < 18:
        raise OpenError("short")
    got_mid, sent_ms = struct.unpack("<QQ", plain[1:17])
    n = plain[17]
    if len(plain) < 18 + n:
        raise OpenError("short name")
    got_to = plain[18:18 + n].decode("ascii", "replace")
    try:
        text = plain[18 + n:].decode("utf-8")
    except UnicodeDecodeError:
        raise OpenError("text is not UTF-8") from None
    if mid is not None and got_mid != mid:
        raise OpenError(f"mid {got_mid} inside, {mid} outside")
    if to is not None and got_to != to:
        raise OpenError(f"sealed for {got_to!r}, not {to!r}")
    return {"mid": got_mid, "sent_ms": sent_ms, "to": got_to, "text": text}


def seal_receipt(me, peer_pk, mid, to):
    """A Receipt body: box(u8 2 || u64 mid || name to), `to` being the direct message's sender."""
    return me.box(peer_pk, bytes([KIND_RECEIPT]) + struct.pack("<Q", mid) + lv_name(to))


def open_receipt(me, sender_pk, body, mid=None, to=None):
    """{"mid", "to"} of a Receipt body; OpenError as open_direct."""
    plain = _parse_sealed(me.unbox(sender_pk, body), KIND_RECEIPT)
    if len(plain) < 10 or len(plain) != 10 + plain[9]:
        raise OpenError("bad length")
    got_mid = struct.unpack("<Q", plain[1:9])[0]
    got_to = plain[10:].decode("ascii", "replace")
    if mid is not None and got_mid != mid:
        raise OpenError(f"mid {got_mid} inside, {mid} outside")
    if to is not None and got_to != to:
        raise OpenError(f"receipt for {got_to!r}, not {to!r}")
    return {"mid": got_mid, "to": got_to}


def channel_signed_data(name_from, mid, sent_ms, text):
    return CHANNEL_DOMAIN + lv_name(name_from) + struct.pack("<QQ", mid, sent_ms) + _raw(text)


def sign_channel(me, name_from, mid, text, sent_ms=None):
    """A Channel body: sig(64) || u64 sent_ms || text, sig = Ed25519 over
    "chatapp-channel-v2" || name from || u64 mid || u64 sent_ms || text."""
    sent_ms = now_ms() if sent_ms is None else sent_ms
    sig = me.sign(channel_signed_data(name_from, mid, sent_ms, text))
    return sig + struct.pack("<Q", sent_ms) + _raw(text)


def open_channel(sender_pk, name_from, mid, body):
    """{"sent_ms", "text"} of a Channel body whose signature by `sender_pk` verifies; else OpenError."""
    body = bytes(body)
    if len(body) < 72:
        raise OpenError("short")
    sig, sent_ms, raw = body[:64], struct.unpack("<Q", body[64:72])[0], body[72:]
    if not verify(sender_pk, channel_signed_data(name_from, mid, sent_ms, raw), sig):
        raise OpenError("bad signature")
    try:
        return {"sent_ms": sent_ms, "text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        raise OpenError("text is not UTF-8") from None


def register_signed_data(name, key, token):
    return REGISTER_DOMAIN + lv_name(name) + bytes(key) + bytes([len(token)]) + bytes(token)


def register_proof(identity, name, token):
    """The Register's proof: Ed25519 over "chatapp-register-v2" || name || key(32) || bytes8 token."""
    return identity.sign(register_signed_data(name, identity.pk, token))
