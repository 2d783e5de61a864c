#include "packing.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace rft {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string str(int64_t v) { return std::to_string(v); }

void check_budget(int64_t budget, int64_t max_budget) {
  if (budget <= 0) fail("budget must be > 0, got " + str(budget));
  if (budget > max_budget)
    fail("budget must be <= " + str(max_budget) + " (cu_seqlens are int32), got " + str(budget));
}

// Offsets of a CSR list over `num_values` values: [0, ..., num_values], non-decreasing.
void check_offsets(const char* name, View<int64_t> offsets, int64_t num_values) {
  const std::string n = name;
  if (offsets.size < 1) fail(n + " must have at least 1 entry (a leading 0), got 0");
  if (offsets[0] != 0) fail(n + "[0] must be 0, got " + str(offsets[0]));
  for (int64_t i = 1; i < offsets.size; ++i) {
    if (offsets[i] < offsets[i - 1])
      fail(n + " must be non-decreasing, got " + n + "[" + str(i) + "] = " + str(offsets[i]) +
           " < " + n + "[" + str(i - 1) + "] = " + str(offsets[i - 1]));
  }
  if (offsets[offsets.size - 1] != num_values)
    fail(n + " must end at " + str(num_values) + " (the number of values), got " +
         str(offsets[offsets.size - 1]));
}

}  // namespace

Bins first_fit_decreasing(View<int64_t> lengths, int64_t budget) {
  check_budget(budget, std::numeric_limits<int64_t>::max());
  const int64_t n = lengths.size;
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0) fail("lengths[" + str(i) + "] must be >= 0, got " + str(lengths[i]));
    if (lengths[i] > budget)
      fail("sequence " + str(i) + " has length " + str(lengths[i]) + " > budget " + str(budget));
  }

  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return lengths[a] != lengths[b] ? lengths[a] > lengths[b] : a < b;
  });

  // First fit in O(log n) per sequence: a max segment tree over the remaining room of n
  // candidate bins (never more bins than sequences). Bins not yet opened hold the full budget,
  // so the leftmost leaf with room is an open bin or the next bin to open. Padding leaves hold -1
  // and are never chosen, since leaf 0 always has room >= 0 and every length is >= 0.
  int64_t leaves = 1;
  while (leaves < n) leaves *= 2;
  std::vector<int64_t> room(2 * leaves, -1);
  std::fill(room.begin() + leaves, room.begin() + leaves + n, budget);
  for (int64_t node = leaves - 1; node >= 1; --node)
    room[node] = std::max(room[2 * node], room[2 * node + 1]);

  std::vector<int64_t> bin_of(n);
  int64_t num_bins = 0;
  for (int64_t i : order) {
    int64_t node = 1;
    while (node < leaves) node = room[2 * node] >= lengths[i] ? 2 * node : 2 * node + 1;
    room[node] -= lengths[i];
    bin_of[i] = node - leaves;
    num_bins = std::max(num_bins, bin_of[i] + 1);
    for (node /= 2; node >= 1; node /= 2) room[node] = std::max(room[2 * node], room[2 * node + 1]);
  }

  // Group by bin (counting sort), keeping placement order within each bin.
  Bins bins;
  bins.offsets.assign(num_bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++bins.offsets[bin_of[i] + 1];
  std::partial_sum(bins.offsets.begin(), bins.offsets.end(), bins.offsets.begin());
  std::vector<int64_t> cursor(bins.offsets.begin(), bins.offsets.end() - 1);
  bins.items.resize(n);
  for (int64_t i : order) bins.items[cursor[bin_of[i]]++] = i;
  return bins;
}

PackedRows pack_rows(View<int64_t> tokens, View<int64_t> offsets, View<int64_t> bin_items,
                     View<int64_t> bin_offsets, int64_t budget, int64_t pad_id) {
  check_budget(budget, kInt32Max);
  check_offsets("offsets", offsets, tokens.size);
  check_offsets("bin_offsets", bin_offsets, bin_items.size);
  const int64_t num_seqs = offsets.size - 1;
  const int64_t num_bins = bin_offsets.size - 1;
  if (bin_items.size != num_seqs)
    fail("bin_items must list each of the " + str(num_seqs) + " sequences once, got " +
         str(bin_items.size) + " entries");

  PackedRows out;
  out.num_bins = num_bins;
  out.budget = budget;
  out.input_ids.assign(num_bins * budget, pad_id);
  out.position_ids.assign(num_bins * budget, 0);
  out.cu_seqlens.resize(num_seqs + num_bins);
  out.seq_row.resize(num_seqs);
  out.seq_start.resize(num_seqs);

  std::vector<char> placed(num_seqs, 0);
  for (int64_t b = 0; b < num_bins; ++b) {
    int64_t* ids = out.input_ids.data() + b * budget;
    int64_t* pos = out.position_ids.data() + b * budget;
    int32_t* cu = out.cu_seqlens.data() + bin_offsets[b] + b;  // bin b's n_b + 1 entries
    int64_t used = 0;
    *cu++ = 0;
    for (int64_t k = bin_offsets[b]; k < bin_offsets[b + 1]; ++k) {
      const int64_t i = bin_items[k];
      if (i < 0 || i >= num_seqs)
        fail("bin_items[" + str(k) + "] must be a sequence index in [0, " + str(num_seqs) +
             "), got " + str(i));
      if (placed[i]) fail("sequence " + str(i) + " appears in more than one place in bin_items");
      placed[i] = 1;
      const int64_t len = offsets[i + 1] - offsets[i];
      if (used + len > budget)
        fail("bin " + str(b) + " holds more than budget " + str(budget) +
             " tokens (overflows at sequence " + str(i) + ")");
      std::memcpy(ids + used, tokens.data + offsets[i], len * sizeof(int64_t));
      std::iota(pos + used, pos + used + len, int64_t{0});
      out.seq_row[i] = b;
      out.seq_start[i] = used;
      used += len;
      *cu++ = static_cast<int32_t>(used);
    }
  }
  return out;
}

FlatLayout flat_layout(View<int64_t> offsets) {
  if (offsets.size < 1) fail("offsets must have at least 1 entry (a leading 0), got 0");
  const int64_t total = offsets[offsets.size - 1];
  if (total > kInt32Max)
    fail("total tokens must be <= " + str(kInt32Max) + " (cu_seqlens are int32), got " +
         str(total));
  check_offsets("offsets", offsets, total);

  FlatLayout out;
  out.position_ids.resize(total);
  out.cu_seqlens.resize(offsets.size);
  for (int64_t i = 0; i + 1 < offsets.size; ++i) {
    std::iota(out.position_ids.begin() + offsets[i], out.position_ids.begin() + offsets[i + 1],
              int64_t{0});
    out.cu_seqlens[i] = static_cast<int32_t>(offsets[i]);
  }
  out.cu_seqlens[offsets.size - 1] = static_cast<int32_t>(total);
  return out;
}

}  // namespace rft
