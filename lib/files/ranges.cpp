// Sets of chunk indices as merged ranges.
#include "files/ranges.hpp"

#include <algorithm>
#include <iterator>

namespace chat::files {

RangeSet::RangeSet(const std::vector<Range>& ranges) {
  for (const Range& r : ranges) insert(r.start, r.end);
}

void RangeSet::insert(std::uint32_t start, std::uint32_t end) {
  if (start >= end) return;
  auto it = spans_.upper_bound(start);
  if (it != spans_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= start) {  // overlaps or touches the range before: grow that one
      start = prev->first;
      end = std::max(end, prev->second);
      count_ -= prev->second - prev->first;
      spans_.erase(prev);
    }
  }
  while (it != spans_.end() && it->first <= end) {  // swallow the ranges it reaches
    end = std::max(end, it->second);
    count_ -= it->second - it->first;
    it = spans_.erase(it);
  }
  spans_.emplace(start, end);
  count_ += end - start;
}

bool RangeSet::contains(std::uint32_t i) const {
  auto it = spans_.upper_bound(i);
  if (it == spans_.begin()) return false;
  return std::prev(it)->second > i;
}

std::uint32_t RangeSet::end_of(std::uint32_t i) const {
  auto it = spans_.upper_bound(i);
  if (it == spans_.begin() || std::prev(it)->second <= i) return i;
  return std::prev(it)->second;
}

std::vector<Range> RangeSet::missing(std::uint32_t start, std::uint32_t end) const {
  std::vector<Range> out;
  if (start >= end) return out;
  std::uint32_t pos = start;
  auto it = spans_.upper_bound(start);
  if (it != spans_.begin()) pos = std::max(pos, std::prev(it)->second);
  for (; it != spans_.end() && it->first < end && pos < end; ++it) {
    if (it->first > pos) out.push_back({pos, it->first});
    pos = std::max(pos, it->second);
  }
  if (pos < end) out.push_back({pos, end});
  return out;
}

std::uint32_t RangeSet::prefix_end() const {
  if (spans_.empty() || spans_.begin()->first != 0) return 0;
  return spans_.begin()->second;
}

std::vector<Range> RangeSet::ranges() const {
  std::vector<Range> out;
  out.reserve(spans_.size());
  for (const auto& [s, e] : spans_) out.push_back({s, e});
  return out;
}

}  // namespace chat::files
