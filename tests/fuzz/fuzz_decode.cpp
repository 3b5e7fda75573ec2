// Fuzz target: decode() never throws, what it accepts survives encode(), and the codec's sizes and id rewriting hold.
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

[[noreturn]] void fail(const char* what, std::string_view input, const std::string& encoded) {
  std::fprintf(stderr, "fuzz_decode: %s\n  input:   %.*s\n  encoded: %s\n", what,
               static_cast<int>(input.size()), input.data(), encoded.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);

  // The text checks the prompt runs on whatever is typed must hold on any bytes too.
  std::ignore = proto::check_text(bytes);
  std::ignore = proto::valid_name(bytes);
  std::ignore = proto::valid_ipv4(bytes);
  {
    std::string raw(bytes);  // any bytes at all, not only what encode() wrote
    std::ignore = proto::set_encoded_id(raw, 1);
  }

  proto::Decoded d = proto::decode(bytes);  // an exception escaping here is a finding
  if (!d) {
    if (d.error == proto::DecodeError::none) fail("refused without a reason", bytes, "");
    return 0;
  }
  if (d.error != proto::DecodeError::none) fail("decoded but with an error", bytes, "");
  const proto::Message& m = *d.message;

  // Exactly one of request id / reply-to is set: the endpoint routes on it.
  if ((proto::request_id(m) != 0) == (proto::reply_to(m) != 0))
    fail("neither or both of id and re are set", bytes, "");

  // Round trip: what decode() accepted, encode() writes in a form decode() accepts again,
  // to an equal message; and encoding is a function of the message (a fixed point).
  std::string once = proto::encode(m);
  proto::Decoded again = proto::decode(once);
  if (!again) fail(proto::to_string(again.error), bytes, once);
  if (!(*again.message == m)) fail("round trip changed the message", bytes, once);
  if (proto::encode(*again.message) != once) fail("encode is not a fixed point", bytes, once);
  if (std::string_view(proto::type_name(m)) != proto::type_name(*again.message))
    fail("round trip changed the type", bytes, once);

  // The codec's sizes, which the roles pack and pad by, agree with what it writes.
  if (proto::encoded_size(m) != once.size()) fail("encoded_size is not the encoded size", bytes, once);
  if (const auto* s = std::get_if<proto::Stored>(&m)) {
    std::size_t bound = proto::stored_overhead();
    for (const auto& item : s->items) bound += proto::stored_item_size(item);
    if (once.size() > bound) fail("stored datagram larger than its size bound", bytes, once);
  }
  if (const auto* t = std::get_if<proto::Table>(&m)) {
    std::size_t bound = proto::table_overhead();
    for (const auto& e : t->entries) bound += proto::entry_size(e);
    if (once.size() > bound) fail("table datagram larger than its size bound", bytes, once);
  }

  // An id written over the placeholder gives the request's own encoding; nothing else is touched.
  std::string rewritten = once;
  if (std::uint64_t id = proto::request_id(m); id != 0) {
    proto::Message template_message = m;
    std::visit(
        [](auto& x) {
          if constexpr (requires { x.id; }) x.id = proto::kIdPlaceholder;
        },
        template_message);
    rewritten = proto::encode(template_message);
    if (!proto::set_encoded_id(rewritten, id) || rewritten != once)
      fail("set_encoded_id did not give the request's encoding", bytes, rewritten);
  } else if (proto::set_encoded_id(rewritten, 1) || rewritten != once) {
    fail("set_encoded_id rewrote a reply", bytes, rewritten);
  }
  return 0;
}
