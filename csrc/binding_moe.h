// binding_moe.h: PyMoE, the Python object of one MoE operator (hybrid._native.MoE): it checks
// submit()'s arrays and keeps them alive until sync(). In a header, in a named namespace, so the
// test-only module (binding_testing.cpp) can take the very same C++ type as an argument (its
// inject_fault reaches the operator of a MoE object that hybrid._native made); only the two
// binding files include it.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "binding_args.h"
#include "core/moe.h"
#include "core/packed_layer.h"

namespace hybrid {
namespace py = pybind11;

struct PyMoE {
  // Declared before `op` so they outlive it: the operator's destructor waits for a pending job,
  // and only then may the arrays it reads and writes be released.
  std::vector<py::object> keep;  // x, ids, weights, skip_mask, y of the pending job
  uint64_t keep_gen = 0;
  uint64_t next_gen = 0;
  std::shared_ptr<PackedLayer> layer;
  std::unique_ptr<MoeOperator> op;

  void submit(const py::object& xo, const py::object& ido, const py::object& wo, const py::object& so,
              const py::object& yo, bool accumulate) {
    const int64_t E = layer->num_experts(), H = layer->hidden();
    py::array x = as_array(xo, "x"), ids = as_array(ido, "ids"), w = as_array(wo, "weights");
    py::array y = as_array(yo, "y");
    MoeCall c;
    SrcDtype xt = float_kind(x, "x");
    c.x_type = xt == SrcDtype::F32 ? ElemType::F32 : ElemType::BF16;
    check_layout(x, "x", {-1, H});
    const int64_t B = x.shape(0);
    if (is_dtype<int32_t>(ids)) c.ids_type = ElemType::I32;
    else if (is_dtype<int64_t>(ids)) c.ids_type = ElemType::I64;
    else bad_dtype(ids, "ids", "int32 or int64");
    check_layout(ids, "ids", {B, -1});
    const int64_t K = ids.shape(1);
    if (K < 1) throw py::value_error("ids must have at least one pick per token, got shape " + shape_str(ids));
    if (!is_dtype<float>(w)) bad_dtype(w, "weights", "float32");
    check_layout(w, "weights", {B, K});
    SrcDtype yt = float_kind(y, "y");
    c.y_type = yt == SrcDtype::F32 ? ElemType::F32 : ElemType::BF16;
    check_layout(y, "y", {B, H}, true);
    if (y.data() == x.data() && B > 0) throw py::value_error("y must not be the same buffer as x");
    py::object skip_keep = py::none();
    if (!so.is_none()) {
      py::array s = as_array(so, "skip_mask");
      if (!is_dtype<uint8_t>(s) && !is_dtype<bool>(s)) bad_dtype(s, "skip_mask", "bool or uint8");
      check_layout(s, "skip_mask", {E});
      c.skip = static_cast<const uint8_t*>(s.data());
      skip_keep = s;
    }
    // Expert ids are checked here, before anything runs (the operator checks again).
    const int64_t n = B * K;
    if (c.ids_type == ElemType::I32) {
      const int32_t* p = static_cast<const int32_t*>(ids.data());
      for (int64_t i = 0; i < n; ++i)
        if (p[i] < 0 || p[i] >= E)
          throw py::value_error("ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) + "] = " +
                                std::to_string(p[i]) + " is out of range [0, " + std::to_string(E) + ")");
    } else {
      const int64_t* p = static_cast<const int64_t*>(ids.data());
      for (int64_t i = 0; i < n; ++i)
        if (p[i] < 0 || p[i] >= E)
          throw py::value_error("ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) + "] = " +
                                std::to_string(p[i]) + " is out of range [0, " + std::to_string(E) + ")");
    }
    c.x = x.data();
    c.ids = ids.data();
    c.weights = static_cast<const float*>(w.data());
    c.y = y.mutable_data();
    c.accumulate = accumulate;
    c.b = B;
    c.k = K;
    {
      py::gil_scoped_release release;
      op->submit(c);  // throws (nothing started) when a job is pending
    }
    keep = {x, ids, w, skip_keep, y};
    keep_gen = ++next_gen;
  }

  void sync() {
    uint64_t gen = keep_gen;
    bool had = op->pending();
    try {
      py::gil_scoped_release release;
      op->sync();
    } catch (...) {
      if (had && keep_gen == gen) keep.clear();
      throw;
    }
    // Only the caller that waited for the job releases its arrays; a job submitted meanwhile by
    // another thread has a newer generation and keeps its own.
    if (had && keep_gen == gen && !op->pending()) keep.clear();
  }
};

}  // namespace hybrid
