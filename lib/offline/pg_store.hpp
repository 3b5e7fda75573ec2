// The PostgreSQL store: several servers share one database (names and keys, the client table,
// the mailboxes, the files kept for offline recipients) and hear each other's changes through a
// change log; see docs/ARCHITECTURE.md.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>
#include "offline/async_store.hpp"

namespace chat::offline {

struct PgOptions {
  std::string uri;        // libpq connection URI, e.g. postgresql://user@host:port/db
  std::string server_id;  // this server's name among the servers (ChatApp passes "<hostname>/<bind address>:<udp port>")
  std::chrono::milliseconds lease_every{2'000};  // renewal period
  std::chrono::milliseconds lease_for{10'000};   // a lease not renewed for this long has expired
  std::chrono::milliseconds poll_every{1'000};   // change-log read without a notification (backstop)
};

/// Connects (blocking), creates or checks the schema, and returns a store whose calls run on
/// `io`. Throws StoreError with the reason (unreachable, a newer schema, not a ChatApp database).
/// load() (blocking, once, before io.run()) takes the lease and starts the lease renewal and
/// the change-log reads (from the snapshot on). While the database is unreachable every call
/// answers "the database is unreachable: <reason>", posted to `io` (never inside the call),
/// and the store reconnects in the background. Single-threaded: use it from `io`'s thread;
/// a callback must not destroy the store.
std::unique_ptr<AsyncStore> open_pg_store(boost::asio::io_context& io, PgOptions o);

/// The operator's --release-name against a shared database (blocking): the name's row, its
/// saved messages and the files kept for it, in one transaction. Throws StoreError.
Released pg_release(const std::string& uri, const std::string& name);

}  // namespace chat::offline
