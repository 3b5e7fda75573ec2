// Encoding and strict decoding of every datagram type (JSON over UDP).
#include "protocol/codec.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <charconv>

#include <nlohmann/json.hpp>

namespace chat::protocol {
namespace {

using json = nlohmann::json;

template <class... Ts>
struct overloaded : Ts... {
  using Ts::operator()...;
};
template <class... Ts>
overloaded(Ts...) -> overloaded<Ts...>;  // clang 14 (the fuzz build) needs the guide

// ---------------------------------------------------------------- encode

// Where encoded bytes go: appended to a string (encode), or only counted (encoded_size and the
// packing sizes), so that every size the codec reports comes from the very code that encodes.
class StringSink {
 public:
  StringSink() { out_.reserve(192); }
  void put(char c) { out_ += c; }
  void put(std::string_view s) { out_ += s; }
  void fill(std::size_t n, char c) { out_.append(n, c); }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class CountSink {
 public:
  void put(char) { ++size_; }
  void put(std::string_view s) { size_ += s.size(); }
  void fill(std::size_t n, char) { size_ += n; }
  std::size_t take() const { return size_; }

 private:
  std::size_t size_ = 0;
};

template <class Sink, class T>
void put_number(Sink& out, T v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  out.put(std::string_view(buf, static_cast<std::size_t>(end - buf)));
}

// Length of the well-formed UTF-8 sequence starting `s` (first byte >= 0x80), or 0.
std::size_t utf8_length(std::string_view s) {
  auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned c = b(0);
  std::size_t n;
  unsigned min;
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
  return n;
}

// True for an ASCII byte JSON carries as it is (not a control character, quote or backslash).
constexpr bool plain(unsigned char c) { return c >= 0x20 && c < 0x80 && c != '"' && c != '\\'; }

// A JSON string; invalid UTF-8 becomes U+FFFD (one per bad byte), never an exception.
template <class Sink>
void put_string(Sink& out, std::string_view s) {
  out.put('"');
  std::size_t i = 0;
  while (i < s.size()) {
    // Bytes that stand for themselves go in one run (the common case, and one count for CountSink).
    std::size_t run = i;
    while (run < s.size() && plain(static_cast<unsigned char>(s[run]))) ++run;
    if (run > i) {
      out.put(s.substr(i, run - i));
      i = run;
      continue;
    }
    auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      std::size_t n = utf8_length(s.substr(i));
      if (n == 0) {
        out.put("\xEF\xBF\xBD");
        ++i;
      } else {
        out.put(s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"': out.put("\\\""); break;
      case '\\': out.put("\\\\"); break;
      case '\b': out.put("\\b"); break;
      case '\f': out.put("\\f"); break;
      case '\n': out.put("\\n"); break;
      case '\r': out.put("\\r"); break;
      case '\t': out.put("\\t"); break;
      default:
        if (c < 0x20) {
          static constexpr char hex[] = "0123456789abcdef";
          out.put("\\u00");
          out.put(hex[c >> 4]);
          out.put(hex[c & 0xF]);
        } else {
          out.put(static_cast<char>(c));
        }
    }
    ++i;
  }
  out.put('"');
}

// One table row: ["name","ip",port,online].
template <class Sink>
void put_entry(Sink& out, const Entry& e) {
  out.put('[');
  put_string(out, e.name);
  out.put(',');
  put_string(out, e.ip);
  out.put(',');
  put_number(out, e.port);
  out.put(e.online ? ",1]" : ",0]");
}

// One saved message: ["from",kind,ts_us,mid,"text"].
template <class Sink>
void put_item(Sink& out, const StoredItem& i) {
  out.put('[');
  put_string(out, i.from);
  out.put(i.channel ? ",1," : ",0,");
  put_number(out, i.ts_us);
  out.put(',');
  put_number(out, i.mid);
  out.put(',');
  put_string(out, i.text);
  out.put(']');
}

// Writes one datagram straight into its sink: no JSON tree, one allocation. The output is the
// JSON a tree would give (keys in another order), checked by the round-trip tests and fuzzer.
// The header is always {"v":1,"t":"<tag>" and a request's id comes right after it, which is
// what set_encoded_id relies on.
template <class Sink>
class Writer {
 public:
  explicit Writer(const char* type) {
    out_.put("{\"v\":");
    put_number(out_, kVersion);
    out_.put(",\"t\":\"");
    out_.put(type);
    out_.put('"');
  }
  Writer& u64(const char* key, std::uint64_t v) {
    this->key(key);
    put_number(out_, v);
    return *this;
  }
  Writer& boolean(const char* key, bool v) {
    this->key(key);
    out_.put(v ? "true" : "false");
    return *this;
  }
  Writer& str(const char* key, std::string_view v) {
    this->key(key);
    put_string(out_, v);
    return *this;
  }
  // A string of `n` spaces.
  Writer& blank(const char* key, std::size_t n) {
    this->key(key);
    out_.put('"');
    out_.fill(n, ' ');
    out_.put('"');
    return *this;
  }
  Writer& entry(const char* key, const Entry& e) {
    this->key(key);
    put_entry(out_, e);
    return *this;
  }
  Writer& entries(const std::vector<Entry>& es) {
    key("e");
    out_.put('[');
    for (std::size_t i = 0; i < es.size(); ++i) {
      if (i > 0) out_.put(',');
      put_entry(out_, es[i]);
    }
    out_.put(']');
    return *this;
  }
  Writer& items(const std::vector<StoredItem>& is) {
    key("items");
    out_.put('[');
    for (std::size_t i = 0; i < is.size(); ++i) {
      if (i > 0) out_.put(',');
      put_item(out_, is[i]);
    }
    out_.put(']');
    return *this;
  }
  auto done() {
    out_.put('}');
    return out_.take();
  }

 private:
  void key(const char* k) {
    out_.put(",\"");
    out_.put(k);
    out_.put("\":");
  }

  Sink out_;
};

// The datagram for `m` into a Sink: the bytes for StringSink, their number for CountSink.
template <class Sink>
auto write_message(const Message& m) {
  using W = Writer<Sink>;
  return std::visit(
      overloaded{
          [](const Register& r) {
            W w("register");
            w.u64("id", r.id).str("name", r.name);
            if (r.every_ms > 0) w.u64("every", r.every_ms);
            if (r.pad > 0) w.blank("pad", std::min(r.pad, kMaxDatagram));
            return w.done();
          },
          [](const Dereg& r) { return W("dereg").u64("id", r.id).str("name", r.name).done(); },
          [](const Direct& r) {
            return W("direct").u64("id", r.id).str("from", r.from).str("text", r.text).done();
          },
          [](const Save& r) {
            return W("save")
                .u64("id", r.id)
                .str("from", r.from)
                .str("to", r.to)
                .u64("mid", r.mid)
                .boolean("force", r.force)
                .str("text", r.text)
                .done();
          },
          [](const Channel& r) {
            return W("channel").u64("id", r.id).str("from", r.from).str("text", r.text).done();
          },
          [](const Relay& r) {
            return W("relay").u64("id", r.id).str("from", r.from).u64("mid", r.mid).str("text", r.text).done();
          },
          [](const Probe& r) { return W("probe").u64("id", r.id).done(); },
          [](const Table& r) {
            return W("table")
                .u64("id", r.id)
                .u64("epoch", r.epoch)
                .u64("from", r.from)
                .u64("to", r.to)
                .boolean("more", r.more)
                .entries(r.entries)
                .done();
          },
          [](const Stored& r) { return W("stored").u64("id", r.id).items(r.items).done(); },
          [](const KeepAlive& r) { return W("keepalive").u64("id", r.id).str("name", r.name).done(); },
          [](const Lookup& r) { return W("lookup").u64("id", r.id).str("name", r.name).done(); },
          [](const Ack& r) {
            W w("ack");
            w.u64("re", r.re);
            if (r.epoch != 0 || r.have != 0) w.u64("epoch", r.epoch).u64("have", r.have);
            if (r.missed != 0) w.u64("missed", r.missed);
            return w.done();
          },
          [](const RegOk& r) {
            W w("reg_ok");
            w.u64("re", r.re).u64("epoch", r.epoch).u64("pending", r.pending);
            return w.done();
          },
          [](const RegErr& r) { return W("reg_err").u64("re", r.re).str("reason", r.reason).done(); },
          [](const Exists& r) { return W("exists").u64("re", r.re).str("name", r.name).done(); },
          [](const Refused& r) { return W("refused").u64("re", r.re).str("reason", r.reason).done(); },
          [](const Alive& r) { return W("alive").u64("re", r.re).boolean("live", r.live).done(); },
          [](const Found& r) {
            W w("found");
            w.u64("re", r.re).boolean("known", r.known);
            // An unknown name has no row to carry: at most the name that was asked for.
            if (r.known) w.entry("e", r.entry);
            else if (!r.entry.name.empty()) w.str("name", r.entry.name);
            return w.done();
          },
      },
      m);
}

// ---------------------------------------------------------------- decode

// Thrown only inside decode() to unwind a field check; never escapes it.
struct Refuse {
  DecodeError why;
};

const json& field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) throw Refuse{DecodeError::missing_field};
  return *it;
}

std::uint64_t get_u64(const json& j, const char* key) {
  const json& v = field(j, key);
  if (!v.is_number_unsigned()) throw Refuse{DecodeError::wrong_type};
  return v.get<std::uint64_t>();
}

std::uint64_t get_id(const json& j, const char* key) {
  std::uint64_t id = get_u64(j, key);
  if (id == 0) throw Refuse{DecodeError::bad_value};  // 0 means "no id" internally
  return id;
}

bool get_bool(const json& j, const char* key) {
  const json& v = field(j, key);
  if (!v.is_boolean()) throw Refuse{DecodeError::wrong_type};
  return v.get<bool>();
}

const std::string& as_string(const json& v) {
  if (!v.is_string()) throw Refuse{DecodeError::wrong_type};
  return v.get_ref<const std::string&>();
}

std::string get_name(const json& v) {
  const std::string& s = as_string(v);
  if (!valid_name(s)) throw Refuse{DecodeError::bad_name};
  return s;
}

std::string get_text(const json& v) {
  const std::string& s = as_string(v);
  // Both limits, as at the prompt: a text that passed could not be carried on (relay, delivery).
  if (s.size() > kMaxText || escaped_size(s) > kMaxTextEncoded) throw Refuse{DecodeError::text_too_long};
  return s;
}

std::string get_reason(const json& v) {
  const std::string& s = as_string(v);
  if (s.size() > kMaxReason) throw Refuse{DecodeError::text_too_long};
  return s;
}

std::uint64_t element_u64(const json& v) {
  if (!v.is_number_unsigned()) throw Refuse{DecodeError::wrong_type};
  return v.get<std::uint64_t>();
}

Entry get_entry(const json& v) {
  if (!v.is_array() || v.size() != 4) throw Refuse{DecodeError::wrong_type};
  Entry e;
  e.name = get_name(v[0]);
  e.ip = as_string(v[1]);
  if (!valid_ipv4(e.ip)) throw Refuse{DecodeError::bad_value};
  std::uint64_t port = element_u64(v[2]);
  if (port == 0 || port > 65535) throw Refuse{DecodeError::bad_value};
  e.port = static_cast<std::uint16_t>(port);
  std::uint64_t online = element_u64(v[3]);
  if (online > 1) throw Refuse{DecodeError::bad_value};
  e.online = online == 1;
  return e;
}

StoredItem get_item(const json& v) {
  if (!v.is_array() || v.size() != 5) throw Refuse{DecodeError::wrong_type};
  StoredItem i;
  i.from = get_name(v[0]);
  std::uint64_t kind = element_u64(v[1]);
  if (kind > 1) throw Refuse{DecodeError::bad_value};
  i.channel = kind == 1;
  std::uint64_t ts = element_u64(v[2]);
  if (ts > static_cast<std::uint64_t>(INT64_MAX)) throw Refuse{DecodeError::bad_value};
  i.ts_us = static_cast<std::int64_t>(ts);
  i.mid = element_u64(v[3]);
  i.text = get_text(v[4]);
  return i;
}

const json& get_array(const json& j, const char* key) {
  const json& v = field(j, key);
  if (!v.is_array()) throw Refuse{DecodeError::wrong_type};
  return v;
}

Message decode_body(const std::string& t, const json& j) {
  if (t == "register") {
    Register r{get_id(j, "id"), get_name(field(j, "name")), 0};
    if (auto p = j.find("pad"); p != j.end()) r.pad = as_string(*p).size();
    if (j.contains("every")) r.every_ms = get_u64(j, "every");  // absent from older clients
    return r;
  }
  if (t == "dereg") return Dereg{get_id(j, "id"), get_name(field(j, "name"))};
  if (t == "direct") return Direct{get_id(j, "id"), get_name(field(j, "from")), get_text(field(j, "text"))};
  if (t == "save")
    return Save{get_id(j, "id"),  get_name(field(j, "from")), get_name(field(j, "to")),
                get_u64(j, "mid"), get_bool(j, "force"),        get_text(field(j, "text"))};
  if (t == "channel") return Channel{get_id(j, "id"), get_name(field(j, "from")), get_text(field(j, "text"))};
  if (t == "relay")
    return Relay{get_id(j, "id"), get_name(field(j, "from")), get_u64(j, "mid"), get_text(field(j, "text"))};
  if (t == "probe") return Probe{get_id(j, "id")};
  if (t == "table") {
    Table r{get_id(j, "id"), get_u64(j, "epoch"), get_u64(j, "from"), get_u64(j, "to"),
            get_bool(j, "more"), {}};
    if (r.to < r.from) throw Refuse{DecodeError::bad_value};
    for (const auto& e : get_array(j, "e")) r.entries.push_back(get_entry(e));
    return r;
  }
  if (t == "stored") {
    Stored r{get_id(j, "id"), {}};
    for (const auto& i : get_array(j, "items")) r.items.push_back(get_item(i));
    return r;
  }
  if (t == "keepalive") return KeepAlive{get_id(j, "id"), get_name(field(j, "name"))};
  if (t == "lookup") return Lookup{get_id(j, "id"), get_name(field(j, "name"))};
  if (t == "ack") {
    Ack r{get_id(j, "re"), 0, 0, 0};
    if (j.contains("epoch") || j.contains("have")) {
      r.epoch = get_u64(j, "epoch");
      r.have = get_u64(j, "have");
    }
    if (j.contains("missed")) r.missed = get_u64(j, "missed");  // absent in older senders' acks
    return r;
  }
  if (t == "reg_ok") {
    return RegOk{get_id(j, "re"), get_u64(j, "epoch"), get_u64(j, "pending")};
  }
  if (t == "reg_err") return RegErr{get_id(j, "re"), get_reason(field(j, "reason"))};
  if (t == "exists") return Exists{get_id(j, "re"), get_name(field(j, "name"))};
  if (t == "refused") return Refused{get_id(j, "re"), get_reason(field(j, "reason"))};
  if (t == "alive") return Alive{get_id(j, "re"), get_bool(j, "live")};
  if (t == "found") {
    Found r{get_id(j, "re"), get_bool(j, "known"), {}};
    // A row comes only with known, a bare name only without: either contradiction is refused.
    if (r.known) {
      if (j.contains("name")) throw Refuse{DecodeError::bad_value};
      r.entry = get_entry(field(j, "e"));
    } else {
      if (j.contains("e")) throw Refuse{DecodeError::bad_value};
      if (auto n = j.find("name"); n != j.end()) r.entry.name = get_name(*n);
    }
    return r;
  }
  throw Refuse{DecodeError::unknown_type};
}

// Nesting depth of brackets outside strings; stops counting once past the limit.
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

std::string encode(const Message& m) { return write_message<StringSink>(m); }

std::size_t encoded_size(const Message& m) { return write_message<CountSink>(m); }

void pad_to(Register& r, std::size_t size) {
  r.pad = 0;
  const std::size_t bare = encoded_size(r);
  size = std::min(size, kMaxDatagram);  // a longer datagram would be refused as too_large
  if (bare >= size) return;
  r.pad = 1;
  const std::size_t field = encoded_size(r) - bare - 1;  // ,"pad":"" without its content
  if (bare + field + 1 > size) {
    // Less than the field itself short of `size`: no pad fits exactly. Overshoot (by at most 9
    // bytes) rather than stay short, as padding is there to reach at least `size` (the server's
    // amplification allowance), but never past kMaxDatagram.
    if (bare + field + 1 > kMaxDatagram) r.pad = 0;
    return;
  }
  r.pad = size - bare - field;
}

bool set_encoded_id(std::string& bytes, std::uint64_t id) {
  if (id == 0) return false;  // 0 means "no id" and would be refused on receipt
  // The id is looked for only where the encoder puts it, right after the type tag (a tag has
  // no quote), so no string content, a text or a name, can ever be taken for it.
  static const std::string head = "{\"v\":" + std::to_string(kVersion) + ",\"t\":\"";
  static const std::string key = ",\"id\":";
  static const std::string placeholder = std::to_string(kIdPlaceholder);
  if (bytes.size() < head.size() || bytes.compare(0, head.size(), head) != 0) return false;
  const std::size_t tag_end = bytes.find('"', head.size());
  if (tag_end == std::string::npos) return false;
  const std::size_t number_at = tag_end + 1 + key.size();
  const std::size_t after = number_at + placeholder.size();
  if (after >= bytes.size()) return false;
  if (bytes.compare(tag_end + 1, key.size(), key) != 0 ||
      bytes.compare(number_at, placeholder.size(), placeholder) != 0)
    return false;
  // The placeholder must be the whole number, not the start of a longer one.
  if (bytes[after] != ',' && bytes[after] != '}') return false;
  bytes.replace(number_at, placeholder.size(), std::to_string(id));
  return true;
}

std::size_t stored_item_size(const StoredItem& item) {
  CountSink out;
  put_item(out, item);
  return out.take() + 1;  // the comma before it (one more than needed, for the first item)
}

std::size_t stored_overhead() {
  // Everything but the items, with the longest id.
  static const std::size_t size = encoded_size(Stored{kIdPlaceholder, {}});
  return size;
}

std::size_t entry_size(const Entry& e) {
  CountSink out;
  put_entry(out, e);
  return out.take() + 1;  // the comma before it (one more than needed, for the first entry)
}

std::size_t table_overhead() {
  // Everything but the entries, with the longest numbers and "false" (longer than "true").
  static const std::size_t size = encoded_size(
      Table{kIdPlaceholder, UINT64_MAX, UINT64_MAX, UINT64_MAX, false, {}});
  return size;
}

Decoded decode(std::string_view bytes) {
  if (bytes.empty()) return {std::nullopt, DecodeError::empty};
  if (bytes.size() > kMaxDatagram) return {std::nullopt, DecodeError::too_large};
  if (!valid_utf8(bytes)) return {std::nullopt, DecodeError::invalid_utf8};
  if (!nesting_within(bytes, kMaxDepth)) return {std::nullopt, DecodeError::too_deep};
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return {std::nullopt, DecodeError::not_json};
  if (!j.is_object()) return {std::nullopt, DecodeError::not_object};
  auto v = j.find("v");
  if (v == j.end() || !v->is_number_unsigned() || v->get<std::uint64_t>() != kVersion)
    return {std::nullopt, DecodeError::bad_version};
  auto t = j.find("t");
  if (t == j.end() || !t->is_string()) return {std::nullopt, DecodeError::unknown_type};
  try {
    return {decode_body(t->get_ref<const std::string&>(), j), DecodeError::none};
  } catch (const Refuse& r) {
    return {std::nullopt, r.why};
  } catch (const std::exception&) {  // defensive: nlohmann type errors
    return {std::nullopt, DecodeError::wrong_type};
  }
}

const char* to_string(DecodeError e) {
  switch (e) {
    case DecodeError::none: return "none";
    case DecodeError::empty: return "empty";
    case DecodeError::too_large: return "too_large";
    case DecodeError::invalid_utf8: return "invalid_utf8";
    case DecodeError::too_deep: return "too_deep";
    case DecodeError::not_json: return "not_json";
    case DecodeError::not_object: return "not_object";
    case DecodeError::bad_version: return "bad_version";
    case DecodeError::unknown_type: return "unknown_type";
    case DecodeError::missing_field: return "missing_field";
    case DecodeError::wrong_type: return "wrong_type";
    case DecodeError::bad_name: return "bad_name";
    case DecodeError::text_too_long: return "text_too_long";
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
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned c = *p;
    if (c < 0x80) { ++p; continue; }
    int n;
    unsigned min;
    if ((c & 0xE0) == 0xC0) { n = 1; min = 0x80; c &= 0x1F; }
    else if ((c & 0xF0) == 0xE0) { n = 2; min = 0x800; c &= 0x0F; }
    else if ((c & 0xF8) == 0xF0) { n = 3; min = 0x10000; c &= 0x07; }
    else return false;
    if (end - p <= n) return false;
    for (int k = 1; k <= n; ++k) {
      if ((p[k] & 0xC0) != 0x80) return false;
      c = (c << 6) | (p[k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return false;
    p += n + 1;
  }
  return true;
}

bool valid_ipv4(std::string_view s) {
  if (s.size() < 7 || s.size() > 15 || s.find('\0') != std::string_view::npos) return false;
  char buf[16];
  s.copy(buf, s.size());
  buf[s.size()] = '\0';
  in_addr a{};
  return inet_pton(AF_INET, buf, &a) == 1;
}

std::size_t escaped_size(std::string_view text) {
  std::size_t n = 0;
  for (unsigned char c : text) {
    if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') n += 2;
    else if (c < 0x20) n += 6;
    else ++n;
  }
  return n;
}

std::string check_text(std::string_view text) {
  // encode() would replace each bad byte with a 3-byte U+FFFD: refuse instead of changing it.
  if (!valid_utf8(text)) return "message is not valid UTF-8 (is the terminal set to UTF-8?)";
  if (text.size() > kMaxText)
    return "message too long: " + std::to_string(text.size()) + " bytes, the limit is " +
           std::to_string(kMaxText) + " bytes";
  // Only control characters can get here (each takes 6 bytes on the wire).
  if (std::size_t n = escaped_size(text); n > kMaxTextEncoded)
    return "message too long: its control characters take " + std::to_string(n) +
           " bytes on the wire, the limit is " + std::to_string(kMaxTextEncoded);
  return {};
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
  static constexpr const char* names[] = {"register", "dereg",   "direct",    "save",   "channel",
                                          "relay",    "probe",   "table",     "stored", "keepalive",
                                          "lookup",   "ack",     "reg_ok",    "reg_err", "exists",
                                          "refused",  "alive",   "found"};
  static_assert(std::size(names) == std::variant_size_v<Message>);
  return names[m.index()];
}

}  // namespace chat::protocol
