// Encoding and strict decoding of every datagram type: the binary wire format v2
// (little-endian integers, length-prefixed strings; docs/PROTOCOL.md §1-§3).
#include "protocol/codec.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include <nlohmann/json.hpp>

namespace chat::protocol {

// Declared in codec.hpp: the first UTF-8 sequence of `s`, its length and code point.
std::size_t utf8_sequence(std::string_view s, char32_t& cp) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  char32_t c = b(0);
  std::size_t n;
  char32_t min;
  if (c < 0x80) {
    cp = c;
    return 1;
  }
  if ((c & 0xE0) == 0xC0) n = 2, min = 0x80, c &= 0x1F;
  else if ((c & 0xF0) == 0xE0) n = 3, min = 0x800, c &= 0x0F;
  else if ((c & 0xF8) == 0xF0) n = 4, min = 0x10000, c &= 0x07;
  else return 0;
  if (s.size() < n) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xC0) != 0x80) return 0;
    c = (c << 6) | (b(k) & 0x3F);
  }
  if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return 0;
  cp = c;
  return n;
}

namespace {

template <class... Ts>
struct overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
overloaded(Ts...) -> overloaded<Ts...>;  // clang 14 (the fuzz build) needs the guide

// ---------------------------------------------------------------- type codes

// The type code of each Message alternative, in variant order. Requests < 64, replies >= 64.
constexpr std::uint8_t kCodes[] = {
    1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11,  // Register .. Lookup
    13, 14, 15, 16, 17,                          // FilePut .. FileOffer (12 is the chunk frame)
    64, 65, 66, 67, 68, 69, 70, 71, 72,          // Ack .. Found
};
static_assert(std::size(kCodes) == std::variant_size_v<Message>);
constexpr std::uint8_t kFirstReply = 64;
constexpr std::size_t kHeader = 10;  // version, type, u64 id/re

constexpr bool is_request_code(std::uint8_t c) { return c >= 1 && c <= 17 && c != kFrameChunk; }

// ---------------------------------------------------------------- encode

// Where encoded bytes go: appended to a string (encode), or only counted (encoded_size and the
// packing sizes), so that every size the codec reports comes from the very code that encodes.
class StringSink {
 public:
  explicit StringSink(std::string& out) : out_(out) {}
  void put(char c) { out_ += c; }
  void put(std::string_view s) { out_.append(s); }
  void put(const std::uint8_t* p, std::size_t n) { out_.append(reinterpret_cast<const char*>(p), n); }

 private:
  std::string& out_;
};

class CountSink {
 public:
  void put(char) { ++size_; }
  void put(std::string_view s) { size_ += s.size(); }
  void put(const std::uint8_t*, std::size_t n) { size_ += n; }
  std::size_t size() const { return size_; }

 private:
  std::size_t size_ = 0;
};

// Dotted-quad IPv4 as inet_pton(AF_INET) accepts it (four decimal octets 0-255, no leading
// zeros, nothing else) into `out`, in one pass with no copy: every table row is encoded with it.
bool parse_ipv4(std::string_view s, std::uint8_t out[4]) {
  std::size_t i = 0;
  for (int k = 0; k < 4; ++k) {
    if (k > 0) {
      if (i >= s.size() || s[i] != '.') return false;
      ++i;
    }
    const std::size_t start = i;
    unsigned v = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9' && i - start < 3) v = v * 10 + static_cast<unsigned>(s[i++] - '0');
    const std::size_t digits = i - start;
    if (digits == 0 || v > 255 || (digits > 1 && s[start] == '0')) return false;
    out[k] = static_cast<std::uint8_t>(v);
  }
  return i == s.size();
}

std::size_t utf8_length(std::string_view s) {
  char32_t cp = 0;
  return utf8_sequence(s, cp);
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Calls emit(piece) for each character of a reason as encode() carries it: invalid bytes
// replaced by U+FFFD, and stopping before the character that would pass kMaxReason bytes.
template <class Emit>
void walk_reason(std::string_view s, Emit&& emit) {
  std::size_t total = 0;
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t n = utf8_length(s.substr(i));
    std::string_view piece = n == 0 ? kReplacement : s.substr(i, n);
    if (total + piece.size() > kMaxReason) return;
    emit(piece);
    total += piece.size();
    i += n == 0 ? 1 : n;
  }
}

// Writes the fields of one datagram into its sink. Lengths that do not fit their prefix are
// saturated (the datagram is then refused, never misread: docs in codec.hpp).
template <class Sink>
class Writer {
 public:
  explicit Writer(Sink& out) : out_(out) {}

  void u8(std::uint8_t v) { out_.put(static_cast<char>(v)); }
  void u16(std::uint16_t v) {
    const std::uint8_t b[2] = {static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v >> 8)};
    out_.put(b, 2);
  }
  void u64(std::uint64_t v) {
    std::uint8_t b[8];
    for (int k = 0; k < 8; ++k) b[k] = static_cast<std::uint8_t>(v >> (8 * k));
    out_.put(b, 8);
  }
  void i64(std::int64_t v) { u64(static_cast<std::uint64_t>(v)); }
  void boolean(bool v) { u8(v ? 1 : 0); }
  void name(std::string_view s) {
    u8(static_cast<std::uint8_t>(std::min<std::size_t>(s.size(), 0xFF)));
    out_.put(s);
  }
  void bytes8(std::string_view s) { name(s); }
  void bytes16(std::string_view s) {
    u16(static_cast<std::uint16_t>(std::min<std::size_t>(s.size(), 0xFFFF)));
    out_.put(s);
  }
  void text(std::string_view s) {
    std::size_t n = 0;
    walk_reason(s, [&](std::string_view piece) { n += piece.size(); });
    u16(static_cast<std::uint16_t>(n));
    walk_reason(s, [&](std::string_view piece) { out_.put(piece); });
  }
  void key(const Key& k) { out_.put(k.data(), k.size()); }
  void sig(const Signature& s) { out_.put(s.data(), s.size()); }
  void ip4(const std::string& ip) {
    std::uint8_t b[4] = {0, 0, 0, 0};
    // Counting needs only the size: no parse (encode() counts before it writes).
    if constexpr (!std::is_same_v<Sink, CountSink>) {
      // Network order, first octet first; anything but dotted IPv4 goes as 0.0.0.0.
      if (!parse_ipv4(ip, b)) std::fill(std::begin(b), std::end(b), 0);
    }
    out_.put(b, 4);
  }
  void entry(const Entry& e) {
    name(e.name);
    ip4(e.ip);
    u16(e.port);
    boolean(e.online);
    key(e.key);
  }
  // A row of a not-known Found: the name (possibly empty), the rest zero.
  void bare_entry(const std::string& n) {
    name(n);
    static constexpr std::uint8_t zeros[4 + 2 + 1 + 32] = {};
    out_.put(zeros, sizeof zeros);
  }
  void item(const StoredItem& i) {
    name(i.from);
    boolean(i.channel);
    i64(i.ts_us);
    u64(i.mid);
    key(i.key);
    bytes16(i.body);
  }
  void header(std::size_t index, std::uint64_t id) {
    u8(kVersion);
    u8(kCodes[index]);
    u64(id);
  }

 private:
  Sink& out_;
};

template <class Sink>
void write_message(Sink& sink, const Message& m) {
  Writer<Sink> w(sink);
  w.header(m.index(), request_id(m) | reply_to(m));  // exactly one is set (0 for the other)
  std::visit(overloaded{
                 [&](const Register& r) {
                   w.name(r.name);
                   w.key(r.key);
                   w.u64(r.every_ms);
                   w.bytes8(r.token);
                   if (!r.token.empty()) w.sig(r.proof);
                 },
                 [&](const Dereg& r) { w.name(r.name); },
                 [&](const Direct& r) {
                   w.name(r.from);
                   w.bytes16(r.body);
                 },
                 [&](const Save& r) {
                   w.name(r.from);
                   w.name(r.to);
                   w.u64(r.mid);
                   w.boolean(r.force);
                   w.bytes16(r.body);
                 },
                 [&](const Channel& r) {
                   w.name(r.from);
                   w.bytes16(r.body);
                 },
                 [&](const Relay& r) {
                   w.name(r.recipient);
                   w.name(r.from);
                   w.u64(r.mid);
                   w.bytes16(r.body);
                 },
                 [&](const Probe& r) { w.name(r.recipient); },
                 [&](const Table& r) {
                   w.name(r.recipient);
                   w.u64(r.epoch);
                   w.u64(r.from);
                   w.u64(r.to);
                   w.boolean(r.more);
                   w.u16(static_cast<std::uint16_t>(std::min<std::size_t>(r.entries.size(), 0xFFFF)));
                   for (const Entry& e : r.entries) w.entry(e);
                 },
                 [&](const Stored& r) {
                   w.name(r.recipient);
                   w.u16(static_cast<std::uint16_t>(std::min<std::size_t>(r.items.size(), 0xFFFF)));
                   for (const StoredItem& i : r.items) w.item(i);
                 },
                 [&](const KeepAlive& r) { w.name(r.name); },
                 [&](const Lookup& r) { w.name(r.name); },
                 [&](const FilePut& r) {
                   w.name(r.from);
                   w.name(r.to);
                   w.u64(r.transfer);
                   w.u64(r.size);
                   w.key(r.ack_key);
                 },
                 [&](const FileCommit& r) {
                   w.name(r.from);
                   w.u64(r.transfer);
                   w.bytes16(r.body);
                 },
                 [&](const FileGet& r) {
                   w.name(r.name);
                   w.u64(r.transfer);
                   w.key(r.ack_key);
                 },
                 [&](const FileDone& r) {
                   w.name(r.name);
                   w.u64(r.transfer);
                   w.boolean(r.saved);
                 },
                 [&](const FileOffer& r) {
                   w.name(r.recipient);
                   w.name(r.from);
                   w.i64(r.ts_us);
                   w.u64(r.transfer);
                   w.u64(r.size);
                   w.key(r.key);
                   w.bytes16(r.body);
                 },
                 [&](const Ack& r) {
                   w.u64(r.epoch);
                   w.u64(r.have);
                   w.u64(r.missed);
                 },
                 [&](const Challenge& r) { w.bytes8(r.token); },
                 [&](const Receipt& r) { w.bytes16(r.body); },
                 [&](const RegOk& r) {
                   w.u64(r.epoch);
                   w.u64(r.pending);
                 },
                 [&](const RegErr& r) { w.text(r.reason); },
                 [&](const Exists& r) { w.name(r.name); },
                 [&](const Refused& r) { w.text(r.reason); },
                 [&](const Alive& r) { w.boolean(r.live); },
                 [&](const Found& r) {
                   w.boolean(r.known);
                   if (r.known) w.entry(r.entry);
                   else w.bare_entry(r.entry.name);
                 },
             },
             m);
}

// ---------------------------------------------------------------- decode

// Reads fields front to back, never past the end. The first failure sticks: every later read
// gives a zero value and leaves the error as it is, so a decoder reads straight through and
// asks error() once at the end.
class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}

  DecodeError error() const { return error_; }
  bool ok() const { return error_ == DecodeError::none; }
  void fail(DecodeError e) {
    if (ok()) error_ = e;
  }
  // The datagram must end here.
  void end() {
    if (ok() && pos_ != s_.size()) fail(DecodeError::trailing);
  }

  std::string_view raw(std::size_t n) {
    if (!ok()) return {};
    if (s_.size() - pos_ < n) {
      fail(DecodeError::truncated);
      pos_ = s_.size();
      return {};
    }
    std::string_view v = s_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  std::uint8_t u8() {
    std::string_view b = raw(1);
    return b.empty() ? 0 : static_cast<std::uint8_t>(b[0]);
  }
  std::uint16_t u16() { return static_cast<std::uint16_t>(le(raw(2))); }
  std::uint64_t u64() { return le(raw(8)); }
  std::int64_t i64() { return static_cast<std::int64_t>(u64()); }
  bool boolean() {
    std::uint8_t v = u8();
    if (v > 1) fail(DecodeError::bad_value);
    return v == 1;
  }
  // A file's transfer id: never 0.
  std::uint64_t transfer() { return id(); }
  // A request id or a reply's re: 0 means "none" inside the program.
  std::uint64_t id() {
    std::uint64_t v = u64();
    if (ok() && v == 0) fail(DecodeError::bad_value);
    return v;
  }
  std::string name() {
    std::string n = name_or_empty();
    if (ok() && !valid_name(n)) fail(DecodeError::bad_name);
    return n;
  }
  std::string name_or_empty() {
    std::string_view n = raw(u8());
    if (ok() && !n.empty() && !valid_name(n)) fail(DecodeError::bad_name);
    return std::string(n);
  }
  std::string bytes8(std::size_t max) { return limited(u8(), max); }
  std::string bytes16(std::size_t max) { return limited(u16(), max); }
  std::string text(std::size_t max) {
    std::string t = limited(u16(), max);
    if (ok() && !valid_utf8(t)) fail(DecodeError::invalid_utf8);
    return t;
  }
  template <std::size_t N>
  std::array<std::uint8_t, N> fixed() {
    std::array<std::uint8_t, N> a{};
    std::string_view b = raw(N);
    if (!b.empty()) std::memcpy(a.data(), b.data(), N);
    return a;
  }
  std::string ip4() {
    std::string_view b = raw(4);
    if (b.empty()) return {};
    std::string ip;
    ip.reserve(15);
    for (std::size_t k = 0; k < 4; ++k) {
      const unsigned v = static_cast<unsigned char>(b[k]);
      if (k > 0) ip += '.';
      if (v >= 100) ip += static_cast<char>('0' + v / 100);
      if (v >= 10) ip += static_cast<char>('0' + v / 10 % 10);
      ip += static_cast<char>('0' + v % 10);
    }
    return ip;
  }
  Entry entry() {
    Entry e;
    e.name = name();
    e.ip = ip4();
    e.port = u16();
    if (ok() && e.port == 0) fail(DecodeError::bad_value);
    e.online = boolean();
    e.key = fixed<32>();
    return e;
  }
  // The row of a not-known Found: a name or none, and nothing else (all zero).
  Entry bare_entry() {
    Entry e;
    e.name = name_or_empty();
    std::string_view rest = raw(4 + 2 + 1 + 32);
    if (ok() && std::any_of(rest.begin(), rest.end(), [](char c) { return c != 0; }))
      fail(DecodeError::bad_value);
    return e;
  }
  StoredItem item() {
    StoredItem i;
    i.from = name();
    i.channel = boolean();
    i.ts_us = i64();
    if (ok() && i.ts_us < 0) fail(DecodeError::bad_value);
    i.mid = u64();
    i.key = fixed<32>();
    i.body = bytes16(kMaxBody);
    return i;
  }

 private:
  static std::uint64_t le(std::string_view b) {
    std::uint64_t v = 0;
    for (std::size_t k = b.size(); k-- > 0;) v = v << 8 | static_cast<unsigned char>(b[k]);
    return v;
  }
  std::string limited(std::size_t n, std::size_t max) {
    if (ok() && n > max) fail(DecodeError::text_too_long);
    return std::string(raw(n));
  }

  std::string_view s_;
  std::size_t pos_ = 0;
  DecodeError error_ = DecodeError::none;
};

// The fields after the header, for type `code`; nullopt (with r's error set) if refused.
// The fields of each message are read in their wire order by a braced initialiser, whose
// clauses C++ evaluates left to right ([dcl.init.list]).
std::optional<Message> read_body(Reader& r, std::uint8_t code, std::uint64_t id) {
  switch (code) {
    case 1: {
      Register m{id, r.name(), r.fixed<32>(), r.u64(), r.bytes8(kMaxToken), {}};
      if (!m.token.empty()) m.proof = r.fixed<64>();
      return m;
    }
    case 2: return Dereg{id, r.name()};
    case 3: return Direct{id, r.name(), r.bytes16(kMaxBody)};
    case 4: return Save{id, r.name(), r.name(), r.u64(), r.boolean(), r.bytes16(kMaxBody)};
    case 5: return Channel{id, r.name(), r.bytes16(kMaxBody)};
    case 6: return Relay{id, r.name(), r.name(), r.u64(), r.bytes16(kMaxBody)};
    case 7: return Probe{id, r.name()};
    case 8: {
      Table m{id, r.name(), r.u64(), r.u64(), r.u64(), r.boolean(), {}};
      if (r.ok() && m.to < m.from) r.fail(DecodeError::bad_value);
      std::size_t n = r.u16();
      for (std::size_t k = 0; k < n && r.ok(); ++k) m.entries.push_back(r.entry());
      return m;
    }
    case 9: {
      Stored m{id, r.name(), {}};
      std::size_t n = r.u16();
      for (std::size_t k = 0; k < n && r.ok(); ++k) m.items.push_back(r.item());
      return m;
    }
    case 10: return KeepAlive{id, r.name()};
    case 11: return Lookup{id, r.name()};
    case 13: {
      FilePut m{id, r.name(), r.name(), r.transfer(), r.u64(), r.fixed<32>()};
      return m;
    }
    case 14: return FileCommit{id, r.name(), r.transfer(), r.bytes16(kMaxBody)};
    case 15: return FileGet{id, r.name(), r.transfer(), r.fixed<32>()};
    case 16: return FileDone{id, r.name(), r.transfer(), r.boolean()};
    case 17: {
      FileOffer m{id, r.name(), r.name(), r.i64(), r.transfer(), r.u64(), r.fixed<32>(), r.bytes16(kMaxBody)};
      if (r.ok() && m.ts_us < 0) r.fail(DecodeError::bad_value);
      return m;
    }
    case 64: return Ack{id, r.u64(), r.u64(), r.u64()};
    case 65: return Challenge{id, r.bytes8(kMaxToken)};
    case 66: return Receipt{id, r.bytes16(kMaxBody)};
    case 67: return RegOk{id, r.u64(), r.u64()};
    case 68: return RegErr{id, r.text(kMaxReason)};
    case 69: return Exists{id, r.name()};
    case 70: return Refused{id, r.text(kMaxReason)};
    case 71: return Alive{id, r.boolean()};
    case 72: {
      Found m{id, r.boolean(), {}};
      m.entry = m.known ? r.entry() : r.bare_entry();
      return m;
    }
    default: r.fail(DecodeError::unknown_type); return std::nullopt;
  }
}

}  // namespace

std::string encode(const Message& m) {
  std::string out;
  out.reserve(encoded_size(m));
  StringSink sink(out);
  write_message(sink, m);
  return out;
}

std::size_t encoded_size(const Message& m) {
  CountSink sink;
  write_message(sink, m);
  return sink.size();
}

Decoded decode(std::string_view bytes) {
  if (bytes.empty()) return {std::nullopt, DecodeError::empty};
  if (bytes.size() > kMaxDatagram) return {std::nullopt, DecodeError::too_large};
  if (bytes[0] == '{') return {std::nullopt, DecodeError::old_version};
  if (static_cast<std::uint8_t>(bytes[0]) != kVersion) return {std::nullopt, DecodeError::bad_version};
  Reader r(bytes);
  r.u8();  // the version, checked above
  const std::uint8_t code = r.u8();
  if (!r.ok()) return {std::nullopt, r.error()};
  if (!is_request_code(code) && (code < kFirstReply || code > 72))
    return {std::nullopt, DecodeError::unknown_type};
  const std::uint64_t id = r.id();
  std::optional<Message> m = read_body(r, code, id);
  r.end();
  if (!r.ok()) return {std::nullopt, r.error()};
  return {std::move(m), DecodeError::none};
}

Shared share(const Message& m) {
  Message blank = m;
  bool addressed = false;
  std::visit(
      [&](auto& x) {
        if constexpr (requires { x.recipient; }) {
          x.recipient.clear();
          addressed = true;
        }
      },
      blank);
  if (!addressed) throw std::invalid_argument(std::string("share: a ").append(type_name(m)).append(" has no recipient"));
  std::string bytes = encode(blank);
  // The header, then the empty recipient's length byte, then what every recipient shares.
  return Shared{static_cast<std::uint8_t>(bytes[1]), bytes.substr(kHeader + 1)};
}

std::string address(const Shared& s, std::uint64_t id, std::string_view recipient) {
  std::string out;
  out.reserve(kHeader + 1 + recipient.size() + s.tail.size());
  StringSink sink(out);
  Writer<StringSink> w(sink);
  w.u8(kVersion);
  w.u8(s.code);
  w.u64(id);
  w.name(recipient);
  out.append(s.tail);
  return out;
}

std::size_t stored_item_size(const StoredItem& item) {
  CountSink sink;
  Writer<CountSink>(sink).item(item);
  return sink.size();
}

std::size_t stored_overhead(std::string_view recipient) {
  return encoded_size(Stored{1, std::string(recipient), {}});
}

std::size_t entry_size(const Entry& e) {
  CountSink sink;
  Writer<CountSink>(sink).entry(e);
  return sink.size();
}

std::size_t table_overhead(std::string_view recipient) {
  return encoded_size(Table{1, std::string(recipient), 0, 0, 0, false, {}});
}

const char* to_string(DecodeError e) {
  switch (e) {
    case DecodeError::none: return "none";
    case DecodeError::empty: return "empty";
    case DecodeError::too_large: return "too_large";
    case DecodeError::old_version: return "old_version";
    case DecodeError::bad_version: return "bad_version";
    case DecodeError::unknown_type: return "unknown_type";
    case DecodeError::truncated: return "truncated";
    case DecodeError::trailing: return "trailing";
    case DecodeError::bad_name: return "bad_name";
    case DecodeError::text_too_long: return "text_too_long";
    case DecodeError::invalid_utf8: return "invalid_utf8";
    case DecodeError::bad_value: return "bad_value";
    case DecodeError::count_: break;
  }
  return "unknown";
}

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > kMaxName || name.front() == '.') return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t n = utf8_length(s.substr(i));
    if (n == 0) return false;
    i += n;
  }
  return true;
}

bool valid_ipv4(std::string_view s) {
  std::uint8_t b[4];
  return parse_ipv4(s, b);
}

std::string check_text(std::string_view text) {
  if (!valid_utf8(text)) return "message is not valid UTF-8 (is the terminal set to UTF-8?)";
  if (text.size() > kMaxText)
    return std::string("message too long: ")
        .append(std::to_string(text.size()))
        .append(" bytes, the limit is ")
        .append(std::to_string(kMaxText))
        .append(" bytes");
  return {};
}

namespace {

// The request tags of protocol version 1 (its "t" values; the others were replies).
bool v1_request_tag(std::string_view t) {
  static constexpr std::string_view tags[] = {"register", "dereg", "direct", "save",      "channel", "relay",
                                              "probe",    "table", "stored", "keepalive", "lookup"};
  return std::find(std::begin(tags), std::end(tags), t) != std::end(tags);
}

// Bracket nesting outside strings within `limit` (version 1's own guard, kept so that no
// input can make the JSON parser recurse deeply).
bool nesting_within(std::string_view s, int limit) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > limit) return false;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return true;
}

}  // namespace

std::optional<std::string> v1_refusal(std::string_view bytes) {
  // Version 1 datagrams started with '{' and were at most kMaxDatagram bytes, nested 4 deep.
  if (bytes.empty() || bytes[0] != '{' || bytes.size() > kMaxDatagram || !nesting_within(bytes, 4))
    return std::nullopt;
  using json = nlohmann::json;
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  auto v = j.find("v");
  auto t = j.find("t");
  auto id = j.find("id");
  if (v == j.end() || !v->is_number_unsigned() || v->get<std::uint64_t>() != 1) return std::nullopt;
  if (t == j.end() || !t->is_string() || !v1_request_tag(t->get_ref<const std::string&>())) return std::nullopt;
  if (id == j.end() || !id->is_number_unsigned() || id->get<std::uint64_t>() == 0) return std::nullopt;
  // Written by hand in version 1's own field order; the reason needs no escaping.
  const bool reg = t->get_ref<const std::string&>() == "register";
  return std::string(reg ? R"({"v":1,"t":"reg_err","re":)" : R"({"v":1,"t":"refused","re":)")
      .append(std::to_string(id->get<std::uint64_t>()))
      .append(R"(,"reason":")")
      .append(kV1RefusalReason)
      .append("\"}");
}

std::uint64_t request_id(const Message& m) {
  return std::visit(
      [](const auto& x) -> std::uint64_t {
        if constexpr (requires { x.id; }) return x.id;
        else return 0;
      },
      m);
}

std::uint64_t reply_to(const Message& m) {
  return std::visit(
      [](const auto& x) -> std::uint64_t {
        if constexpr (requires { x.re; }) return x.re;
        else return 0;
      },
      m);
}

const char* type_name(const Message& m) {
  static constexpr const char* names[] = {"register", "dereg",     "direct",  "save",   "channel",
                                          "relay",    "probe",     "table",   "stored", "keepalive",
                                          "lookup",   "file_put",  "file_commit", "file_get", "file_done",
                                          "file_offer", "ack",       "challenge", "receipt", "reg_ok",
                                          "reg_err",  "exists",    "refused", "alive",  "found"};
  static_assert(std::size(names) == std::variant_size_v<Message>);
  return names[m.index()];
}

}  // namespace chat::protocol
