// An embedded Store behind the AsyncStore interface: each call runs at once and answers inline.
#include "offline/async_store.hpp"

#include <exception>
#include <utility>

namespace chat::offline {
namespace {

/// Runs `f` and hands its value, or the exception's text, to `done`.
template <class T, class F, class Done>
void answer(F&& f, Done& done) {
  Reply<T> r;
  try {
    r.value = f();
  } catch (const std::exception& e) {
    r.error = e.what();
  }
  if (done) done(std::move(r));
}

class Embedded final : public AsyncStore {
 public:
  explicit Embedded(std::unique_ptr<Store> store) : store_(std::move(store)) {}

  Snapshot load() override {
    Snapshot s;
    s.clients = store_->load_clients();
    s.here.assign(s.clients.size(), true);
    // Messages are only ever saved for a name in the table.
    for (const auto& row : s.clients)
      if (std::size_t n = store_->count_for(row.name); n > 0) s.mailboxes.emplace(row.name, n);
    s.legacy = store_->legacy_count();
    return s;
  }

  void save(std::vector<NewMessage> batch, std::function<void(Reply<std::vector<bool>>)> done) override {
    answer<std::vector<bool>>([&] { return store_->save(batch); }, done);
  }

  void pending_for(const std::string& to, Cursor after, std::size_t limit,
                   std::function<void(Reply<std::vector<StoredMessage>>)> done) override {
    answer<std::vector<StoredMessage>>([&] { return store_->pending_for(to, after, limit); }, done);
  }

  void count_for(const std::string& to, std::function<void(Reply<std::size_t>)> done) override {
    answer<std::size_t>([&] { return store_->count_for(to); }, done);
  }

  void remove_delivered(const std::string& to, std::vector<std::int64_t> seqs,
                        std::function<void(Reply<bool>)> done) override {
    answer<bool>([&] { store_->remove_delivered(to, seqs); return true; }, done);
  }

  bool keeps_files() const override { return true; }

  void put_file(NewFile f, std::function<void(Reply<bool>)> done) override {
    answer<bool>([&] { return store_->put_file(f); }, done);
  }

  void files_for(const std::string& to, std::function<void(Reply<std::vector<HeldFile>>)> done) override {
    answer<std::vector<HeldFile>>([&] { return store_->files_for(to); }, done);
  }

  void file_data(const std::string& to, std::uint64_t transfer,
                 std::function<void(Reply<std::optional<std::string>>)> done) override {
    answer<std::optional<std::string>>([&] { return store_->file_data(to, transfer); }, done);
  }

  void delete_file(const std::string& to, std::uint64_t transfer, std::function<void(Reply<bool>)> done) override {
    answer<bool>([&] { return store_->delete_file(to, transfer); }, done);
  }

  void file_bytes_for(const std::string& to, std::function<void(Reply<std::uint64_t>)> done) override {
    answer<std::uint64_t>([&] { return store_->file_bytes_for(to); }, done);
  }

  void expire_files(std::int64_t before_us, std::function<void(Reply<std::size_t>)> done) override {
    answer<std::size_t>([&] { return store_->expire_files(before_us); }, done);
  }

  void store_clients(std::vector<RowWrite> rows, std::function<void(Reply<std::vector<bool>>)> done) override {
    // The only writer: the server checked every binding against its own table already.
    answer<std::vector<bool>>(
        [&] {
          std::vector<ClientRow> plain;
          plain.reserve(rows.size());
          for (auto& w : rows) plain.push_back(std::move(w.row));
          store_->store_clients(plain);
          return std::vector<bool>(plain.size(), true);
        },
        done);
  }

 private:
  std::unique_ptr<Store> store_;
};

}  // namespace

// A store that keeps no files answers each file call with this error, at once.
namespace {
template <class T>
void no_files(const std::function<void(Reply<T>)>& done) {
  if (done) done(Reply<T>{std::nullopt, "this server's store keeps no files"});
}
}  // namespace

void AsyncStore::put_file(NewFile, std::function<void(Reply<bool>)> done) { no_files(done); }
void AsyncStore::files_for(const std::string&, std::function<void(Reply<std::vector<HeldFile>>)> done) { no_files(done); }
void AsyncStore::file_data(const std::string&, std::uint64_t, std::function<void(Reply<std::optional<std::string>>)> done) {
  no_files(done);
}
void AsyncStore::delete_file(const std::string&, std::uint64_t, std::function<void(Reply<bool>)> done) { no_files(done); }
void AsyncStore::file_bytes_for(const std::string&, std::function<void(Reply<std::uint64_t>)> done) { no_files(done); }
void AsyncStore::expire_files(std::int64_t, std::function<void(Reply<std::size_t>)> done) { no_files(done); }

std::unique_ptr<AsyncStore> adapt(std::unique_ptr<Store> store) { return std::make_unique<Embedded>(std::move(store)); }

}  // namespace chat::offline
