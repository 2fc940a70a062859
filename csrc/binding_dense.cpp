// binding_dense.cpp: the device Linear's native front doors of hybrid._native (registered by
// binding.cpp's module through bind_dense): the dense bf16 / int8 GEMV (core/dense.h) on numpy
// arrays or torch tensors, and the packed-weight linear (a GGUF tensor kept in its blocks). The
// operand checks (DenseOperand, TensorView, ...) are binding_args.h's.
#include "binding_dense.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>

#include "binding_args.h"
#include "core/dense.h"
#include "core/dispatch.h"
#include "core/kernels.h"
#include "core/pack.h"
#include "core/thread_pool.h"

namespace hybrid {
namespace py = pybind11;
namespace {

// ---- dense bf16 GEMV ------------------------------------------------------------------------
// out [T, N] = x [T, K] . w [N, K]^T for the device Linear on CPU (dense.h). Two front doors
// share the checks and the call: dense_gemv takes numpy arrays (bf16 as uint16 bits), and
// dense_gemv_torch takes torch CPU tensors directly, reading dtype / shape / strides / data_ptr
// from the tensor objects, because a torch -> numpy view costs ~2 us per tensor and the
// device Linear calls this ~40 times per decode step. Neither copies: every operand needs unit
// inner stride; rows may be strided (a column slice of a wider weight or activation). The operand
// checks (DenseOperand, dense_from_numpy / dense_from_torch) are in binding_args.h.

void dense_check_k(const DenseOperand& w, const DenseOperand& x) {
  if (x.cols != w.cols)
    throw py::value_error("x has " + std::to_string(x.cols) + " inputs per row but " + w.name + " has " +
                          std::to_string(w.cols) + " (x " + x.shape() + ", " + w.name + " " + w.shape() +
                          ": x [T, K] and " + w.name + " [N, K])");
}

// A new bf16 [rows, cols] torch tensor (the outputs allocated when out is None).
py::object new_bf16_tensor(int64_t rows, int64_t cols) {
  const TorchRefs& tr = torch_refs();
  static PyObject* kwargs = nullptr;  // {"dtype": torch.bfloat16}, built once, leaked
  if (kwargs == nullptr) kwargs = py::dict(py::arg("dtype") = py::handle(tr.bf16)).release().ptr();
  py::tuple size = py::make_tuple(rows, cols);
  return checked(PyObject_Call(tr.empty, size.ptr(), kwargs));
}

void check_no_overlap(const DenseOperand& out, const DenseOperand& in) {
  auto [a0, a1] = out.span();
  auto [b0, b1] = in.span();
  if (a0 < b1 && b0 < a1) throw py::value_error(std::string("out must not overlap ") + in.name);
}

// An output for x [T, K] . w [N, K]^T: `oo`, or a new bf16 [T, N] tensor when it is None.
py::object dense_out_or_new(const py::object& oo, const DenseOperand& w, const DenseOperand& x) {
  if (!oo.is_none()) return oo;
  dense_check_k(w, x);
  return new_bf16_tensor(x.rows, w.rows);
}

// Shapes agree, out does not overlap the inputs; then the call, GIL released. scale: an int8
// weight's per-row fp32 scale [N] (w.i8), else nullptr.
void dense_run(const DenseOperand& w, const DenseOperand& x, const DenseOperand& out, const std::string& isa,
               bool threads, const float* scale = nullptr) {
  dense_check_k(w, x);
  if (out.rows != x.rows || out.cols != w.rows)
    throw py::value_error("out must have shape [T, N] = [" + std::to_string(x.rows) + ", " + std::to_string(w.rows) +
                          "] for x " + x.shape() + " and " + w.name + " " + w.shape() + ", got " + out.shape());
  check_no_overlap(out, w);
  check_no_overlap(out, x);
  const KernelTable& kt = dense_table(isa);
  const bool big = threads && w.rows * w.cols * w.esize() >= kDenseParallelMinBytes;
  py::gil_scoped_release release;
  std::shared_ptr<ThreadPool> pool = big ? global_pool() : nullptr;  // small: no pool at all
  if (w.i8)
    dense_gemv_i8(kt, pool.get(), reinterpret_cast<const int8_t*>(w.data), w.ld, scale, w.rows, w.cols,
                  reinterpret_cast<const uint16_t*>(x.data), x.rows, x.ld, out.data, out.ld, out.bf16);
  else
    dense_gemv(kt, pool.get(), reinterpret_cast<const uint16_t*>(w.data), w.ld, w.rows, w.cols,
               reinterpret_cast<const uint16_t*>(x.data), x.rows, x.ld, out.data, out.ld, out.bf16);
}

void py_dense_gemv(const py::object& wo, const py::object& xo, const py::object& oo, const std::string& isa,
                   bool threads) {
  DenseOperand w = dense_from_numpy(wo, "w", false), x = dense_from_numpy(xo, "x", false),
               out = dense_from_numpy(oo, "out", true);
  dense_run(w, x, out, isa, threads);
}

py::object py_dense_gemv_torch(const py::object& wo, const py::object& xo, const py::object& oo,
                               const std::string& isa, bool threads) {
  DenseOperand w = dense_from_torch(wo, "weight", false), x = dense_from_torch(xo, "x", false);
  py::object res = dense_out_or_new(oo, w, x);
  DenseOperand out = dense_from_torch(res, "out", true);
  dense_run(w, x, out, isa, threads);
  return res;
}

// The int8 weight form: weight int8 [N, K] (unit inner stride), scale float32 [N] (contiguous).
py::object py_dense_gemv_i8_torch(const py::object& wo, const py::object& so, const py::object& xo,
                                  const py::object& oo, const std::string& isa, bool threads) {
  DenseOperand w = dense_from_torch(wo, "weight", false, /*int8_weight=*/true), x = dense_from_torch(xo, "x", false);
  const TorchRefs& tr = torch_refs();
  TensorView s = tensor_view(so, "scale", tr.f32, "torch.float32", 1);
  expect_shape(s, "scale", {w.rows});
  py::object res = dense_out_or_new(oo, w, x);
  DenseOperand out = dense_from_torch(res, "out", true);
  dense_run(w, x, out, isa, threads, reinterpret_cast<const float*>(s.data));
  return res;
}

// A packed weight (pack_gguf / pack's output held as torch tensors: qweight uint8 [bytes], scales
// int16 [count] of bf16/fp16 bits or None where the format has none) times x bf16 [T, K] (unit
// inner stride): out [T, N] (dense.h's dense_packed: int8 activations per 32 inputs).
py::object py_packed_linear_torch(const py::object& qo, const py::object& so, const std::string& fmt, int64_t n,
                                  int64_t k, const py::object& xo, const py::object& oo, const std::string& isa,
                                  bool threads) {
  const WeightFormat f = parse_format(fmt);
  if (f == WeightFormat::BF16) throw py::value_error("packed_linear takes int4, int8 or GGUF-typed weights, not bf16");
  check_matrix_dims(n, k, "packed weight", f);
  const TorchRefs& tr = torch_refs();
  TensorView q = tensor_view(qo, "qweight", tr.u8, "torch.uint8", 1);
  expect_shape(q, "qweight", {int64_t(packed_qweight_bytes(f, n, k))});
  PackedMatrix m{f, n, k, reinterpret_cast<const uint8_t*>(q.data), nullptr};
  const int64_t sbytes = int64_t(packed_scale_bytes(f, n, k));
  if (sbytes > 0) {
    if (so.is_none()) throw py::value_error("scales are required for format " + format_name(f));
    TensorView s = tensor_view(so, "scales", tr.i16, "torch.int16", 1);
    expect_shape(s, "scales", {sbytes / 2});
    m.scales = reinterpret_cast<const uint16_t*>(s.data);
  }
  DenseOperand x = dense_from_torch(xo, "x", false);
  if (x.cols != k)
    throw py::value_error("x has " + std::to_string(x.cols) + " inputs per row but the packed weight has " +
                          std::to_string(k) + " (x " + x.shape() + ", weight [" + std::to_string(n) + ", " +
                          std::to_string(k) + "])");
  py::object res = oo.is_none() ? new_bf16_tensor(x.rows, n) : oo;
  DenseOperand out = dense_from_torch(res, "out", true);
  if (out.rows != x.rows || out.cols != n)
    throw py::value_error("out must have shape [T, N] = [" + std::to_string(x.rows) + ", " + std::to_string(n) +
                          "], got " + out.shape());
  check_no_overlap(out, x);
  const KernelTable& kt = dense_table(isa);
  const int64_t bytes = int64_t(packed_qweight_bytes(f, n, k)) + sbytes;
  py::gil_scoped_release release;
  std::shared_ptr<ThreadPool> pool = threads ? global_pool() : nullptr;
  dense_packed(kt, pool.get(), m, bytes, reinterpret_cast<const uint16_t*>(x.data), x.rows, x.ld, out.data,
               out.ld, out.bf16);
  return res;
}

}  // namespace

void bind_dense(py::module_& m) {
  m.def("dense_gemv", &py_dense_gemv, py::arg("w"), py::arg("x"), py::arg("out"), py::arg("isa") = "",
        py::arg("threads") = true,
        "out [T, N] (float32, or uint16 bf16 bits rounded to nearest even) = x [T, K] . w [N, K]^T; w, x uint16 "
        "bf16 bits with unit inner stride (rows may be strided); isa '' = the active one; threads=False: inline");
  m.def("dense_gemv_torch", &py_dense_gemv_torch, py::arg("weight"), py::arg("x"), py::arg("out") = py::none(),
        py::arg("isa") = "", py::arg("threads") = true,
        "dense_gemv on torch CPU tensors (weight, x bf16; out bf16 or float32, allocated bf16 when None); returns out");
  m.def("packed_linear_torch", &py_packed_linear_torch, py::arg("qweight"), py::arg("scales"), py::arg("format"),
        py::arg("n"), py::arg("k"), py::arg("x"), py::arg("out") = py::none(), py::arg("isa") = "",
        py::arg("threads") = true,
        "out [T, N] = x [T, K] . W^T for a packed weight held as torch CPU tensors (qweight uint8, scales int16 "
        "bits or None, as pack / pack_gguf make them; format int4, int8 or a GGUF type): x bf16, quantised to "
        "int8 per 32 inputs; out bf16 or float32, allocated bf16 when None (core/dense.h); returns out");
  m.def("dense_gemv_i8_torch", &py_dense_gemv_i8_torch, py::arg("weight"), py::arg("scale"), py::arg("x"),
        py::arg("out") = py::none(), py::arg("isa") = "", py::arg("threads") = true,
        "out [T, N] = (x [T, K] . weight [N, K]^T) * scale [N] on torch CPU tensors (weight int8, scale float32, "
        "x bf16; out bf16 or float32, allocated bf16 when None; core/dense.h); returns out");
}

}  // namespace hybrid
