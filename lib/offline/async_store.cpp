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

std::unique_ptr<AsyncStore> adapt(std::unique_ptr<Store> store) { return std::make_unique<Embedded>(std::move(store)); }

}  // namespace chat::offline
