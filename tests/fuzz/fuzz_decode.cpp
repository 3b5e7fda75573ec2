// Fuzz target: decode() never throws or crashes, and what it accepts survives encode() unchanged.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <tuple>

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
  return 0;
}
