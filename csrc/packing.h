// Padding-free sequence packing: first-fit-decreasing bin packing and packed-array layout.
//
// Plain C++17, no Python types: module.cpp binds these functions. Bad input throws
// std::invalid_argument with a message naming the argument, which pybind11 turns into ValueError.
//
// Ragged data is passed in CSR form: item i of a ragged list is values[offsets[i] .. offsets[i+1]),
// with offsets[0] == 0, non-decreasing, and offsets.back() == values.size().
#pragma once

#include <cstdint>
#include <vector>

namespace rft {

// A read-only view of a contiguous array (std::span is C++20).
template <class T>
struct View {
  const T* data = nullptr;
  int64_t size = 0;
  const T& operator[](int64_t i) const { return data[i]; }
};

// Bins in CSR form: bin b holds sequences items[offsets[b] .. offsets[b+1]).
struct Bins {
  std::vector<int64_t> items;    // [num_seqs] sequence indices, bin by bin, in placement order
  std::vector<int64_t> offsets;  // [num_bins + 1]
};

// Sequences packed one row per bin, each row padded to the budget.
struct PackedRows {
  int64_t num_bins = 0;
  int64_t budget = 0;
  std::vector<int64_t> input_ids;     // [num_bins * budget], pad_id after each row's last token
  std::vector<int64_t> position_ids;  // [num_bins * budget], 0.. within each sequence, 0 on padding
  std::vector<int32_t> cu_seqlens;    // [num_seqs + num_bins]: bin b's n_b + 1 starts, from 0
  std::vector<int64_t> seq_row;       // [num_seqs] row holding sequence i
  std::vector<int64_t> seq_start;     // [num_seqs] column where sequence i starts in that row
};

// Sequences concatenated into one stream, in input order.
struct FlatLayout {
  std::vector<int64_t> position_ids;  // [total_tokens], 0.. within each sequence
  std::vector<int32_t> cu_seqlens;    // [num_seqs + 1], from 0 to total_tokens
};

// First-fit-decreasing: sequences sorted by length descending (ties by index ascending), each
// placed in the lowest-numbered bin with room. O(n log n). Throws if budget <= 0, a length is
// negative, or a length exceeds the budget.
Bins first_fit_decreasing(View<int64_t> lengths, int64_t budget);

// Lays out the tokens of the sequences (CSR: tokens, offsets) into one row per bin
// (CSR: bin_items, bin_offsets), in the bins' order. Every sequence must appear in exactly one
// bin and no bin may hold more than `budget` tokens; budget must fit in int32 (cu_seqlens).
PackedRows pack_rows(View<int64_t> tokens, View<int64_t> offsets, View<int64_t> bin_items,
                     View<int64_t> bin_offsets, int64_t budget, int64_t pad_id);

// Position ids and cu_seqlens of the sequences with the given offsets laid end to end; the
// packed input_ids are the tokens themselves. Total tokens must fit in int32 (cu_seqlens).
FlatLayout flat_layout(View<int64_t> offsets);

}  // namespace rft
