// Python bindings of rftengine._C: numpy in, numpy out.
//
// Inputs are taken as C-contiguous int64 arrays (pybind11 converts other integer dtypes, and
// copies non-contiguous arrays). The C++ work runs without the GIL; its results are handed to
// numpy without a copy. std::invalid_argument from packing.cpp becomes ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "packing.h"

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style>;

rft::View<int64_t> view(const Int64Array& a, const char* name) {
  if (a.ndim() != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " +
                                std::to_string(a.ndim()) + " dimensions");
  return {a.data(), static_cast<int64_t>(a.size())};
}

// Moves a vector into a numpy array of the given shape; the array owns the vector's memory.
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule free_owned(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), owned->data(), free_owned);
}

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  const auto n = static_cast<py::ssize_t>(v.size());
  return to_numpy(std::move(v), {n});
}

py::tuple first_fit_decreasing(const Int64Array& lengths, int64_t budget) {
  const auto lens = view(lengths, "lengths");
  rft::Bins bins;
  {
    py::gil_scoped_release no_gil;
    bins = rft::first_fit_decreasing(lens, budget);
  }
  return py::make_tuple(to_numpy(std::move(bins.items)), to_numpy(std::move(bins.offsets)));
}

py::tuple pack_rows(const Int64Array& tokens, const Int64Array& offsets,
                    const Int64Array& bin_items, const Int64Array& bin_offsets, int64_t budget,
                    int64_t pad_id) {
  const auto t = view(tokens, "tokens");
  const auto o = view(offsets, "offsets");
  const auto bi = view(bin_items, "bin_items");
  const auto bo = view(bin_offsets, "bin_offsets");
  rft::PackedRows rows;
  {
    py::gil_scoped_release no_gil;
    rows = rft::pack_rows(t, o, bi, bo, budget, pad_id);
  }
  const std::vector<py::ssize_t> shape{rows.num_bins, rows.budget};
  return py::make_tuple(to_numpy(std::move(rows.input_ids), shape),
                        to_numpy(std::move(rows.position_ids), shape),
                        to_numpy(std::move(rows.cu_seqlens)), to_numpy(std::move(rows.seq_row)),
                        to_numpy(std::move(rows.seq_start)));
}

py::tuple flat_layout(const Int64Array& offsets) {
  const auto o = view(offsets, "offsets");
  rft::FlatLayout flat;
  {
    py::gil_scoped_release no_gil;
    flat = rft::flat_layout(o);
  }
  return py::make_tuple(to_numpy(std::move(flat.position_ids)),
                        to_numpy(std::move(flat.cu_seqlens)));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rftengine host-side hot paths (padding-free sequence packing). "
            "Use the documented wrappers in rftengine.packing.";

  m.def("first_fit_decreasing", &first_fit_decreasing, py::arg("lengths"), py::arg("budget"),
        "First-fit-decreasing bins of int64 lengths [n] under `budget` tokens.\n"
        "Returns (items int64 [n], offsets int64 [num_bins + 1]): bin b holds sequences\n"
        "items[offsets[b]:offsets[b + 1]] in placement order (length desc, index asc).");

  m.def("pack_rows", &pack_rows, py::arg("tokens"), py::arg("offsets"), py::arg("bin_items"),
        py::arg("bin_offsets"), py::arg("budget"), py::arg("pad_id"),
        "Lays sequence i = tokens[offsets[i]:offsets[i + 1]] out one row per bin.\n"
        "Returns (input_ids int64 [num_bins, budget], position_ids int64 [num_bins, budget],\n"
        "cu_seqlens int32 [num_seqs + num_bins] (bin b's n_b + 1 starts, each from 0),\n"
        "seq_row int64 [num_seqs], seq_start int64 [num_seqs]).");

  m.def("flat_layout", &flat_layout, py::arg("offsets"),
        "Position ids and cu_seqlens of sequences laid end to end.\n"
        "Returns (position_ids int64 [offsets[-1]], cu_seqlens int32 [len(offsets)]).");
}
