// The duplicate filter: bounded in entries and in time.
#include "transport/dedup.hpp"

namespace chat::transport {

DuplicateFilter::Seen DuplicateFilter::check(const RequestKey& key,
                                             std::chrono::steady_clock::time_point now,
                                             const std::string** reply) {
  expire(now);
  auto it = entries_.find(key);
  if (it != entries_.end()) {
    if (!it->second.answered) return Seen::pending;
    *reply = &it->second.reply;
    return Seen::answered;
  }
  // Room for this one within capacity: the oldest goes first.
  if (order_.size() >= capacity_) expire_oldest();
  entries_.emplace(key, Entry{now, false, {}});
  order_.emplace_back(now, key);
  return Seen::fresh;
}

void DuplicateFilter::answer(const RequestKey& key, std::string reply) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;  // expired meanwhile: a repeat will be handed up again
  it->second.answered = true;
  it->second.reply = std::move(reply);
}

void DuplicateFilter::forget(const RequestKey& key) { entries_.erase(key); }

void DuplicateFilter::expire(std::chrono::steady_clock::time_point now) {
  while (!order_.empty() && (order_.size() > capacity_ || now - order_.front().first > window_))
    expire_oldest();
}

void DuplicateFilter::expire_oldest() {
  auto it = entries_.find(order_.front().second);
  // The same key may have been forgotten and seen again later: only erase the entry this
  // order slot stands for.
  if (it != entries_.end() && it->second.seen == order_.front().first) entries_.erase(it);
  order_.pop_front();
}

}  // namespace chat::transport
