// One place that names the Asio namespaces ChatApp uses (and includes <utility> first, see STYLE.md).
#pragma once

#include <utility>

#include <boost/asio.hpp>

namespace chat {
namespace net = boost::asio;
using udp = net::ip::udp;
using error_code = boost::system::error_code;
using Clock = std::chrono::steady_clock;
}  // namespace chat
