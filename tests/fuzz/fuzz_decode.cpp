// Fuzz target: decode() never throws or reads outside the datagram, what it accepts is exactly
// the encoding of the message (decode -> encode -> decode gives it back, byte for byte), the
// codec's sizes and id rewriting hold, and v1_refusal() is total.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <tuple>
#include <variant>

#include "protocol/codec.hpp"

namespace {

namespace proto = chat::protocol;

// Up to 64 bytes of `s` in hex, for a report.
std::string hex(std::string_view s) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < 64; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    out += digits[c >> 4];
    out += digits[c & 0xF];
  }
  if (s.size() > 64) out += "...";
  return out;
}

[[noreturn]] void fail(const char* what, std::string_view input, std::string_view encoded) {
  std::fprintf(stderr, "fuzz_decode: %s\n  input (%zu bytes):   %s\n  encoded (%zu bytes): %s\n", what, input.size(),
               hex(input).c_str(), encoded.size(), hex(encoded).c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);

  // The text checks the prompt runs on whatever is typed must hold on any bytes too.
  std::ignore = proto::check_text(bytes);
  std::ignore = proto::valid_name(bytes);
  std::ignore = proto::valid_ipv4(bytes);
  // The answer to a version-1 request: total, and itself a v1 datagram (never a v2 one).
  if (std::optional<std::string> v1 = proto::v1_refusal(bytes)) {
    if (bytes.empty() || bytes[0] != '{') fail("v1_refusal answered something that is not v1", bytes, *v1);
    if (proto::decode(*v1).error != proto::DecodeError::old_version) fail("v1_refusal's answer is not v1", bytes, *v1);
    if (proto::v1_refusal(*v1)) fail("v1_refusal answered its own answer", bytes, *v1);
  }

  proto::Decoded d = proto::decode(bytes);  // an exception escaping here is a finding
  if (!d) {
    if (d.error == proto::DecodeError::none) fail("refused without a reason", bytes, "");
    if (d.error == proto::DecodeError::count_) fail("refused with count_", bytes, "");
    if (!bytes.empty() && bytes[0] == '{' && bytes.size() <= proto::kMaxDatagram &&
        d.error != proto::DecodeError::old_version)
      fail("a '{' datagram not refused as old_version", bytes, "");
    return 0;
  }
  if (d.error != proto::DecodeError::none) fail("decoded but with an error", bytes, "");
  const proto::Message& m = *d.message;

  // Exactly one of request id / reply-to is set: the endpoint routes on it.
  if ((proto::request_id(m) != 0) == (proto::reply_to(m) != 0))
    fail("neither or both of id and re are set", bytes, "");

  // Round trip: what decode() accepted is exactly encode() of the message (one encoding per
  // message), and decodes to an equal message again.
  std::string once = proto::encode(m);
  if (once != bytes) fail("accepted bytes that are not the message's encoding", bytes, once);
  proto::Decoded again = proto::decode(once);
  if (!again) fail(proto::to_string(again.error), bytes, once);
  if (!(*again.message == m)) fail("round trip changed the message", bytes, once);
  if (std::string_view(proto::type_name(m)) != proto::type_name(*again.message))
    fail("round trip changed the type", bytes, once);

  // The codec's sizes, which the roles pack by, agree with what it writes.
  if (proto::encoded_size(m) != once.size()) fail("encoded_size is not the encoded size", bytes, once);
  if (const auto* s = std::get_if<proto::Stored>(&m)) {
    std::size_t sum = proto::stored_overhead(s->recipient);
    for (const auto& item : s->items) sum += proto::stored_item_size(item);
    if (once.size() != sum) fail("stored datagram size is not overhead + item sizes", bytes, once);
  }
  if (const auto* t = std::get_if<proto::Table>(&m)) {
    std::size_t sum = proto::table_overhead(t->recipient);
    for (const auto& e : t->entries) sum += proto::entry_size(e);
    if (once.size() != sum) fail("table datagram size is not overhead + entry sizes", bytes, once);
  }

  // A server request shared once and addressed again is byte for byte the same datagram.
  std::visit(
      [&](const auto& x) {
        if constexpr (requires { x.recipient; }) {
          std::string again = proto::address(proto::share(m), x.id, x.recipient);
          if (again != once) fail("address(share(m)) is not encode(m)", bytes, again);
        }
      },
      m);
  return 0;
}
