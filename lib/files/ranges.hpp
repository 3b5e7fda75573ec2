// Sets of chunk indices as sorted, merged half-open ranges: what a receiver holds, what a sender
// knows was delivered, what a sidecar file records.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace chat::files {

/// Chunks start, start+1, ..., end-1 (half-open; empty if start >= end).
struct Range {
  std::uint32_t start = 0;
  std::uint32_t end = 0;
  bool operator==(const Range&) const = default;
};

/// A set of chunk indices kept as disjoint, non-adjacent ranges (adjacent ones are merged).
class RangeSet {
 public:
  RangeSet() = default;
  /// The union of `ranges` (any order, overlaps allowed).
  explicit RangeSet(const std::vector<Range>& ranges);

  /// Adds [start, end); an empty range adds nothing.
  void insert(std::uint32_t start, std::uint32_t end);
  /// Adds chunk `i`.
  void insert(std::uint32_t i) { insert(i, i + 1); }
  bool contains(std::uint32_t i) const;
  /// The end of the range holding chunk `i` (the first chunk after it not held); `i` if not held.
  std::uint32_t end_of(std::uint32_t i) const;
  /// The parts of [start, end) not in the set, ascending.
  std::vector<Range> missing(std::uint32_t start, std::uint32_t end) const;
  /// The end of the range that starts at 0 (the first chunk not held), 0 if chunk 0 is not held.
  std::uint32_t prefix_end() const;
  /// How many chunks the set holds.
  std::uint64_t count() const { return count_; }
  /// How many ranges it is made of.
  std::size_t size() const { return spans_.size(); }
  bool empty() const { return spans_.empty(); }
  /// The ranges, ascending.
  std::vector<Range> ranges() const;
  /// The ranges as start -> end, for walking them without a copy.
  const std::map<std::uint32_t, std::uint32_t>& spans() const { return spans_; }

  bool operator==(const RangeSet& o) const { return spans_ == o.spans_; }

 private:
  std::map<std::uint32_t, std::uint32_t> spans_;  // start -> end; disjoint and non-adjacent
  std::uint64_t count_ = 0;
};

}  // namespace chat::files
