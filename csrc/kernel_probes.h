// kernel_probes.h: what binding.cpp's test-only entry points do (kernel_quantize_row_a8,
// kernel_matmul_a8 / _f32 / _a16, reference_matmul_a16, kernel_gemv_t_bf16): run one ISA's
// KernelTable entry on numpy arrays, checked, so tests can compare every ISA with the scalar
// reference. Only binding.cpp includes it; the bindings themselves stay in that one file.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "binding_args.h"
#include "dispatch.h"
#include "kernels.h"
#include "kernels_scalar.h"

namespace hybrid {
namespace py = pybind11;

// ---- per-ISA kernel entries (tests) ----------------------------------------------------------

inline py::tuple py_kernel_quantize_row_a8(const std::string& isa, const py::object& xo) {
  const KernelTable& t = resolved_table(isa);
  py::array x = as_array(xo, "x");
  if (!is_dtype<float>(x)) bad_dtype(x, "x", "float32");
  check_layout(x, "x", {-1, -1});
  int64_t T = x.shape(0), K = x.shape(1);
  if (K <= 0 || K % kGroup) throw py::value_error("x: K must be a positive multiple of 32, got " + std::to_string(K));
  py::array_t<int8_t> q({T, K});
  py::array_t<float> sc({T, K / kGroup});
  py::array_t<int32_t> gs({T, K / kGroup});
  const float* xp = static_cast<const float*>(x.data());
  int8_t* qp = q.mutable_data();
  float* sp = sc.mutable_data();
  int32_t* gp = gs.mutable_data();
  {
    py::gil_scoped_release r;
    for (int64_t i = 0; i < T; ++i) t.quantize_row_a8(xp + i * K, K, qp + i * K, sp + i * (K / kGroup), gp + i * (K / kGroup));
  }
  return py::make_tuple(q, sc, gs);
}

inline py::array_t<float> py_kernel_matmul_a8(const std::string& isa, const std::string& fmt, const py::object& qw,
                                       const py::object& sw, int64_t n, int64_t k, const py::object& qo,
                                       const py::object& so, const py::object& go, int64_t b0, int64_t b1) {
  const KernelTable& t = resolved_table(isa);
  WeightFormat f = parse_format(fmt);
  if (f == WeightFormat::BF16) throw py::value_error("matmul_a8 takes int4 or int8 weights, not bf16");
  PackedMatrix m = packed_from_arrays(f, qw, sw, n, k);
  std::tie(b0, b1) = block_range(n, b0, b1);
  py::array q = as_array(qo, "q"), s = as_array(so, "scale"), g = as_array(go, "gsum");
  if (!is_dtype<int8_t>(q)) bad_dtype(q, "q", "int8");
  if (!is_dtype<float>(s)) bad_dtype(s, "scale", "float32");
  if (!is_dtype<int32_t>(g)) bad_dtype(g, "gsum", "int32");
  check_layout(q, "q", {-1, k});
  int64_t T = q.shape(0);
  check_layout(s, "scale", {T, k / kGroup});
  check_layout(g, "gsum", {T, k / kGroup});
  QuantizedActs a{static_cast<const int8_t*>(q.data()), static_cast<const float*>(s.data()),
                  static_cast<const int32_t*>(g.data()), T, k, k};
  py::array_t<float> out({T, (b1 - b0) * kRowBlock});
  float* op = out.mutable_data();
  int64_t ldo = (b1 - b0) * kRowBlock;
  {
    py::gil_scoped_release r;
    t.matmul_a8(m, b0, b1, a, op, ldo);
  }
  return out;
}

enum class FloatEntry { F32, A16, A16Reference };

inline py::array_t<float> float_matmul(FloatEntry which, const std::string& isa, const std::string& fmt, const py::object& qw,
                                const py::object& sw, int64_t n, int64_t k, const py::object& xo, int64_t b0, int64_t b1) {
  WeightFormat f = parse_format(fmt);
  decltype(KernelTable::matmul_f32) fn = nullptr;
  if (which == FloatEntry::A16Reference) {
    fn = reference_matmul_a16;
  } else {
    const KernelTable& t = resolved_table(isa);
    fn = which == FloatEntry::F32 ? t.matmul_f32 : t.matmul_a16;
    if (fn == nullptr) throw py::value_error("ISA '" + isa + "' has no matmul_a16 (it needs avx512_bf16)");
  }
  if (which != FloatEntry::F32 && f != WeightFormat::BF16)
    throw py::value_error("matmul_a16 takes bf16 weights, got " + fmt);
  PackedMatrix m = packed_from_arrays(f, qw, sw, n, k);
  std::tie(b0, b1) = block_range(n, b0, b1);
  py::array x = as_array(xo, "x");
  if (!is_dtype<float>(x)) bad_dtype(x, "x", "float32");
  check_layout(x, "x", {-1, k});
  int64_t T = x.shape(0), ldo = (b1 - b0) * kRowBlock;
  py::array_t<float> out({T, ldo});
  float* op = out.mutable_data();
  const float* xp = static_cast<const float*>(x.data());
  {
    py::gil_scoped_release r;
    fn(m, b0, b1, xp, T, k, op, ldo);
  }
  return out;
}

// ---- transposed bf16 GEMV (KernelTable::gemv_t_bf16, tests) ----------------------------------
// out [T, n1 - n0] (+)= x [T, K] . w [K, N][:, n0:n1] with one ISA's kernel, inline. Operands as
// dense_gemv takes them: unit inner stride, any row stride (w may be a column slice of a wider
// matrix), no copies.

// A 2-D float32 numpy array under dense_ld's stride rules.
inline DenseOperand f32_from_numpy(const py::object& o, const char* name, bool writable) {
  py::array a = as_array(o, name);
  if (!is_dtype<float>(a)) bad_dtype(a, name, "float32");
  if (a.ndim() != 2) check_layout(a, name, {-1, -1});  // raises with the shape
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
  const int64_t s0 = a.strides(0), s1 = a.strides(1);
  if (s0 % 4 || s1 % 4)
    throw py::value_error(std::string(name) + " strides must be whole elements, got (" + std::to_string(s0) + ", " +
                          std::to_string(s1) + ") bytes");
  DenseOperand d{static_cast<char*>(const_cast<void*>(a.data())), a.shape(0), a.shape(1), 0, false, name};
  d.ld = dense_ld(name, d.rows, d.cols, s0 / 4, s1 / 4, "elements");
  return d;
}

inline py::object py_kernel_gemv_t_bf16(const std::string& isa, const py::object& wo, const py::object& xo, int64_t n0,
                                 int64_t n1, bool accumulate, const py::object& oo) {
  const KernelTable& kt = dense_table(isa);
  DenseOperand w = dense_from_numpy(wo, "w", false), x = f32_from_numpy(xo, "x", false);
  if (x.cols != w.rows)
    throw py::value_error("x has " + std::to_string(x.cols) + " inputs per row but w has " + std::to_string(w.rows) +
                          " rows (x " + x.shape() + ", w " + w.shape() + ": x [T, K] and w [K, N])");
  if (n1 == -1) n1 = w.cols;
  if (n0 < 0 || n0 >= n1 || n1 > w.cols)
    throw py::value_error("column range [n0, n1) = [" + std::to_string(n0) + ", " + std::to_string(n1) +
                          ") must satisfy 0 <= n0 < n1 <= N = " + std::to_string(w.cols) + " (n1 = -1: N)");
  py::object res = oo;
  if (oo.is_none()) {
    if (accumulate) throw py::value_error("accumulate=True needs out (the sums are added to it)");
    res = py::array_t<float>({x.rows, n1 - n0});
  }
  DenseOperand out = f32_from_numpy(res, "out", true);
  if (out.rows != x.rows || out.cols != n1 - n0)
    throw py::value_error("out must have shape [T, n1 - n0] = [" + std::to_string(x.rows) + ", " +
                          std::to_string(n1 - n0) + "], got " + out.shape());
  for (const DenseOperand* in : {&w, &x}) {
    auto [a0, a1] = out.span();
    auto [b0, b1] = in->span();
    if (a0 < b1 && b0 < a1) throw py::value_error(std::string("out must not overlap ") + in->name);
  }
  {
    py::gil_scoped_release release;
    kt.gemv_t_bf16(reinterpret_cast<const uint16_t*>(w.data), w.ld, w.rows, n0, n1,
                   reinterpret_cast<const float*>(x.data), x.rows, x.ld, reinterpret_cast<float*>(out.data), out.ld,
                   accumulate);
  }
  return res;
}

}  // namespace hybrid
