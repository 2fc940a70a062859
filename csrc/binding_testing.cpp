// binding_testing.cpp: hybrid._native_testing, the test-only module. Built by the same CMake from
// the same core library as hybrid._native and installed beside it, but never imported by hybrid/:
// the entry points here exist so tests can reach inside the engine, and users' module stays free
// of them.
//   kernel probes   run one ISA's KernelTable entry on numpy arrays, checked, so tests compare every
//                   ISA with the scalar reference (kernel_entries, kernel_quantize_row_a8,
//                   kernel_matmul_a8 / _f32 / _a16, reference_matmul_a16, kernel_gemv_t_bf16);
//   pool_test_job   a thread-pool job that checks its own barriers and can fail on purpose;
//   inject_fault    make the next job of a hybrid._native.MoE fail in a worker.
// The bound functions are listed at the end of the file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "binding_args.h"
#include "binding_moe.h"
#include "core/dispatch.h"
#include "core/kernels.h"
#include "core/kernels_scalar.h"
#include "core/thread_pool.h"

namespace py = pybind11;
using namespace hybrid;

namespace {

// ---- per-ISA kernel entries (tests) ----------------------------------------------------------

py::tuple py_kernel_quantize_row_a8(const std::string& isa, const py::object& xo) {
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

py::array_t<float> py_kernel_matmul_a8(const std::string& isa, const std::string& fmt, const py::object& qw,
                                       const py::object& sw, int64_t n, int64_t k, const py::object& qo,
                                       const py::object& so, const py::object& go, int64_t b0, int64_t b1) {
  const KernelTable& t = resolved_table(isa);
  WeightFormat f = parse_format(fmt);
  if (f == WeightFormat::BF16) throw py::value_error("matmul_a8 takes int4 or int8 (or GGUF-typed) weights, not bf16");
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
  std::vector<int32_t> hs(size_t(T * (k / kGroup)));  // the K types' half sums (kernels.h), as the operator makes them
  for (int64_t i = 0; i < T; ++i) half_sums(static_cast<const int8_t*>(q.data()) + i * k, k, hs.data() + i * (k / kGroup));
  QuantizedActs a{static_cast<const int8_t*>(q.data()), static_cast<const float*>(s.data()),
                  static_cast<const int32_t*>(g.data()), T, k, k, hs.data()};
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

py::array_t<float> float_matmul(FloatEntry which, const std::string& isa, const std::string& fmt, const py::object& qw,
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
DenseOperand f32_from_numpy(const py::object& o, const char* name, bool writable) {
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

py::object py_kernel_gemv_t_bf16(const std::string& isa, const py::object& wo, const py::object& xo, int64_t n0,
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

// ---- thread pool -----------------------------------------------------------------------------

// A pool job for tests of the pool itself: every phase checks that all team threads finished the
// previous phase (the barrier), counts itself, optionally sleeps, and one (phase, thread) may throw.
struct PyPoolJob {
  ThreadPool::Handle handle;
  std::shared_ptr<std::vector<std::atomic<int>>> counts;
  void wait() {
    py::gil_scoped_release r;
    ThreadPool::wait(handle);
  }
  bool done() const { return ThreadPool::finished(handle); }
  int team() const { return handle->team; }
  std::vector<int> phase_counts() const {
    std::vector<int> out;
    for (auto& c : *counts) out.push_back(c.load());
    return out;
  }
};

PyPoolJob pool_test_job(int phases, int fail_phase, int fail_tid, int sleep_us, int team, bool caller) {
  if (phases < 1) throw py::value_error("phases must be >= 1");
  auto pool = global_pool();
  auto counts = std::make_shared<std::vector<std::atomic<int>>>(size_t(phases));
  std::vector<ThreadPool::Phase> ph;
  for (int p = 0; p < phases; ++p) {
    ph.push_back([=](int tid, int team_size) {
      if (p > 0 && (*counts)[size_t(p - 1)].load() != team_size)
        throw std::logic_error("barrier violated: phase " + std::to_string(p) + " started early");
      (*counts)[size_t(p)].fetch_add(1);
      if (sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      if (p == fail_phase && tid == fail_tid)
        throw std::runtime_error("injected failure in phase " + std::to_string(p) + ", thread " + std::to_string(tid));
    });
  }
  PyPoolJob j;
  j.counts = counts;
  j.handle = pool->submit(std::move(ph), team, caller);
  return j;
}

}  // namespace

PYBIND11_MODULE(_native_testing, m) {
  m.doc() = "hybrid's test-only native entry points (csrc/binding_testing.cpp); never imported by hybrid/.";

  m.def("kernel_entries", [](const std::string& isa) {
    const KernelTable& t = resolved_table(isa);
    py::dict d;
    d["quantize_row_a8"] = t.quantize_row_a8 != nullptr;
    d["matmul_a8"] = t.matmul_a8 != nullptr;
    d["matmul_f32"] = t.matmul_f32 != nullptr;
    d["matmul_a16"] = t.matmul_a16 != nullptr;
    d["gemv_bf16"] = t.gemv_bf16 != nullptr;
    d["gemv_t_bf16"] = t.gemv_t_bf16 != nullptr;
    d["gemv_i8"] = t.gemv_i8 != nullptr;
    return d;
  }, py::arg("isa"), "which entries the resolved table of `isa` has (after filling)");
  m.def("kernel_quantize_row_a8", &py_kernel_quantize_row_a8, py::arg("isa"), py::arg("x"));
  m.def("kernel_matmul_a8", &py_kernel_matmul_a8, py::arg("isa"), py::arg("format"), py::arg("qweight"),
        py::arg("scales"), py::arg("n"), py::arg("k"), py::arg("q"), py::arg("scale"), py::arg("gsum"),
        py::arg("b0") = 0, py::arg("b1") = -1);
  m.def("kernel_matmul_f32", [](const std::string& isa, const std::string& fmt, const py::object& q, const py::object& s,
                                int64_t n, int64_t k, const py::object& x, int64_t b0, int64_t b1) {
    return float_matmul(FloatEntry::F32, isa, fmt, q, s, n, k, x, b0, b1);
  }, py::arg("isa"), py::arg("format"), py::arg("qweight"), py::arg("scales"), py::arg("n"), py::arg("k"),
        py::arg("x"), py::arg("b0") = 0, py::arg("b1") = -1);
  m.def("kernel_matmul_a16", [](const std::string& isa, const py::object& q, int64_t n, int64_t k,
                                const py::object& x, int64_t b0, int64_t b1) {
    return float_matmul(FloatEntry::A16, isa, "bf16", q, py::none(), n, k, x, b0, b1);
  }, py::arg("isa"), py::arg("qweight"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("b0") = 0,
        py::arg("b1") = -1);
  m.def("reference_matmul_a16", [](const py::object& q, int64_t n, int64_t k, const py::object& x, int64_t b0,
                                   int64_t b1) {
    return float_matmul(FloatEntry::A16Reference, "scalar", "bf16", q, py::none(), n, k, x, b0, b1);
  }, py::arg("qweight"), py::arg("n"), py::arg("k"), py::arg("x"), py::arg("b0") = 0, py::arg("b1") = -1);

  m.def("kernel_gemv_t_bf16", &py_kernel_gemv_t_bf16, py::arg("isa"), py::arg("w"), py::arg("x"), py::arg("n0") = 0,
        py::arg("n1") = -1, py::arg("accumulate") = false, py::arg("out") = py::none(),
        "out [T, n1 - n0] float32 (+)= x [T, K] float32 . w [K, N][:, n0:n1] (uint16 bf16 bits), one ISA's "
        "gemv_t_bf16 inline; unit inner strides, rows may be strided; out allocated when None; returns out");


  py::class_<PyPoolJob>(m, "PoolTestJob")
      .def("wait", &PyPoolJob::wait)
      .def_property_readonly("done", &PyPoolJob::done)
      .def_property_readonly("team", &PyPoolJob::team)
      .def_property_readonly("phase_counts", &PyPoolJob::phase_counts);
  m.def("pool_test_job", &pool_test_job, py::arg("phases"), py::arg("fail_phase") = -1, py::arg("fail_tid") = -1,
        py::arg("sleep_us") = 0, py::arg("team") = 0, py::arg("caller") = false,
        "tests: a pool job that checks its barriers (caller=True: wait() runs the caller's share)");

  m.def("inject_fault", [](PyMoE& moe, const std::string& msg) { moe.op->inject_fault(msg); }, py::arg("moe"),
        py::arg("message"), "the next job of `moe` (a hybrid._native.MoE) fails in a worker with RuntimeError(message) at sync()");
}

// Bound functions and classes (module hybrid._native_testing):
//   kernel_entries, kernel_quantize_row_a8, kernel_matmul_a8, kernel_matmul_f32, kernel_matmul_a16,
//   reference_matmul_a16, kernel_gemv_t_bf16
//   pool_test_job -> PoolTestJob: wait, done, team, phase_counts
//   inject_fault(moe, message)
