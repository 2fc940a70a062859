// binding.cpp: the only file that knows Python. It turns numpy arrays into raw pointers +
// shapes, checks everything at the boundary (dtype, ndim, shape, C-contiguity, writability,
// expert id range, buffer sizes) and raises TypeError / ValueError naming the argument. bf16 data
// travels as uint16 arrays of bit patterns (numpy has no bf16); hybrid/native.py converts torch
// tensors without copies. The bound functions are listed at the end of the file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <string>
#include <vector>

#include "bandwidth.h"
#include "dense.h"
#include "mla_decode.h"
#include "router.h"
#include "dispatch.h"
#include "kernels.h"
#include "kernels_scalar.h"
#include "moe.h"
#include "pack.h"
#include "packed_layer.h"
#include "thread_pool.h"
#include "binding_args.h"
#include "kernel_probes.h"

namespace py = pybind11;
using namespace hybrid;

namespace {

// ---- packing ---------------------------------------------------------------------------------

// Run fn(b0, b1) over `blocks` row blocks on the pool, GIL released.
template <class Fn>
void parallel_blocks(int64_t blocks, Fn fn) {
  py::gil_scoped_release release;
  auto pool = global_pool();
  pool->run({[&](int tid, int team) {
    auto [b0, b1] = pool->split(blocks, tid, team);
    if (b0 < b1) fn(b0, b1);
  }});
}

void check_ct_pair(const py::array& packed, const py::array& scale, int64_t n, int64_t k,
                   const std::string& pname, const std::string& sname) {
  if (!is_dtype<int32_t>(packed) && !is_dtype<uint32_t>(packed)) bad_dtype(packed, pname.c_str(), "int32");
  check_layout(packed, pname.c_str(), {n, k / 8});
  float_kind(scale, sname.c_str());
  check_layout(scale, sname.c_str(), {n, k / kGroup});
}

py::tuple py_pack_int4_from_ct(const py::object& po, const py::object& so) {
  py::array packed = as_array(po, "weight_packed"), scale = as_array(so, "weight_scale");
  if (packed.ndim() != 2) check_layout(packed, "weight_packed", {-1, -1});
  int64_t n = packed.shape(0), k = packed.shape(1) * 8;
  check_matrix_dims(n, k, "weight_packed");
  check_ct_pair(packed, scale, n, k, "weight_packed", "weight_scale");
  py::array_t<uint8_t> q(py::ssize_t(packed_qweight_bytes(WeightFormat::INT4_G32, n, k)));
  py::array_t<uint16_t> s(py::ssize_t(packed_scale_bytes(WeightFormat::INT4_G32, n, k) / 2));
  PackDest d{q.mutable_data(), s.mutable_data()};
  const int32_t* pp = static_cast<const int32_t*>(packed.data());
  const void* sp = scale.data();
  SrcDtype sd = float_kind(scale, "weight_scale");
  parallel_blocks(n / kRowBlock, [&](int64_t b0, int64_t b1) { pack_int4_from_ct(pp, sp, sd, n, k, b0, b1, d); });
  return py::make_tuple(q, s);
}

py::tuple py_quantize_pack(const py::object& wo, const std::string& fmt) {
  WeightFormat f = parse_format(fmt);
  py::array w = as_array(wo, "w");
  SrcDtype dt = float_kind(w, "w");
  check_layout(w, "w", {-1, -1});
  int64_t n = w.shape(0), k = w.shape(1);
  check_matrix_dims(n, k, "w");
  py::array_t<uint8_t> q(py::ssize_t(packed_qweight_bytes(f, n, k)));
  py::object scales = py::none();
  uint16_t* sp = nullptr;
  if (f != WeightFormat::BF16) {
    py::array_t<uint16_t> s(py::ssize_t(packed_scale_bytes(f, n, k) / 2));
    sp = s.mutable_data();
    scales = s;
  }
  PackDest d{q.mutable_data(), sp};
  const void* wp = w.data();
  parallel_blocks(n / kRowBlock, [&](int64_t b0, int64_t b1) { quantize_pack(f, wp, dt, n, k, b0, b1, d); });
  return py::make_tuple(q, scales);
}

py::array_t<float> py_unpack(const std::string& fmt, const py::object& q, const py::object& s, int64_t n, int64_t k) {
  PackedMatrix m = packed_from_arrays(parse_format(fmt), q, s, n, k);
  py::array_t<float> out({n, k});
  float* op = out.mutable_data();
  parallel_blocks(n / kRowBlock, [&](int64_t b0, int64_t b1) { unpack(m, b0, b1, op + b0 * kRowBlock * k); });
  return out;
}

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

// Shapes agree, out does not overlap the inputs; then the call, GIL released.
void dense_run(const DenseOperand& w, const DenseOperand& x, const DenseOperand& out, const std::string& isa,
               bool threads) {
  dense_check_k(w, x);
  if (out.rows != x.rows || out.cols != w.rows)
    throw py::value_error("out must have shape [T, N] = [" + std::to_string(x.rows) + ", " + std::to_string(w.rows) +
                          "] for x " + x.shape() + " and " + w.name + " " + w.shape() + ", got " + out.shape());
  for (const DenseOperand* in : {&w, &x}) {
    auto [a0, a1] = out.span();
    auto [b0, b1] = in->span();
    if (a0 < b1 && b0 < a1) throw py::value_error(std::string("out must not overlap ") + in->name);
  }
  const KernelTable& kt = dense_table(isa);
  const bool big = threads && w.rows * w.cols * 2 >= kDenseParallelMinBytes;
  py::gil_scoped_release release;
  std::shared_ptr<ThreadPool> pool = big ? global_pool() : nullptr;  // small: no pool at all
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
  py::object res = oo;
  if (oo.is_none()) {
    dense_check_k(w, x);
    const TorchRefs& tr = torch_refs();
    static PyObject* kwargs = nullptr;  // {"dtype": torch.bfloat16}, built once, leaked
    if (kwargs == nullptr) kwargs = py::dict(py::arg("dtype") = py::handle(tr.bf16)).release().ptr();
    py::tuple size = py::make_tuple(x.rows, w.rows);
    res = checked(PyObject_Call(tr.empty, size.ptr(), kwargs));
  }
  DenseOperand out = dense_from_torch(res, "out", true);
  dense_run(w, x, out, isa, threads);
  return res;
}

// ---- MLA decode attention (mla_decode.h) ---------------------------------------------------
void py_mla_decode(const py::object& qo, const py::object& kvo, const py::object& normo, const py::object& coso,
                   const py::object& sino, const py::object& cacheo, const py::object& sloto, const py::object& poso,
                   const py::object& wkvbo, const py::object& outo, int64_t nh, int64_t d, int64_t v, double eps,
                   double scale, bool interleave, bool threads, const std::string& isa) {
  const TorchRefs& tr = torch_refs();
  TensorView q = tensor_view(qo, "q", tr.bf16, "torch.bfloat16", 2), kv = tensor_view(kvo, "kv", tr.bf16, "torch.bfloat16", 2);
  TensorView cache = tensor_view(cacheo, "cache", tr.bf16, "torch.bfloat16", 3);
  TensorView norm = tensor_view(normo, "kv_norm", tr.bf16, "torch.bfloat16", 1);
  TensorView cs = tensor_view(coso, "cos", tr.f32, "torch.float32", 2), sn = tensor_view(sino, "sin", tr.f32, "torch.float32", 2);
  TensorView slot = tensor_view(sloto, "slots", tr.i64, "torch.int64", 1), pos = tensor_view(poso, "positions", tr.i64, "torch.int64", 1);
  TensorView w = tensor_view(wkvbo, "kv_b_weight", tr.bf16, "torch.bfloat16", 2);
  TensorView out = tensor_view(outo, "out", tr.bf16, "torch.bfloat16", 2);
  if (nh < 1 || d < 1 || v < 1) throw py::value_error("num_heads, qk_nope_head_dim and v_head_dim must be >= 1");
  if (d > 512) throw py::value_error("qk_nope_head_dim " + std::to_string(d) + " is over the 512 mla_decode supports");
  const int64_t T = q.shape[0], S = cache.shape[0], Lmax = cache.shape[1], W = cache.shape[2];
  const int64_t C = norm.shape[0], R = W - C;
  if (T < 1) throw py::value_error("q must hold at least one token");
  if (R < 2 || R % 2 || R > 256)
    throw py::value_error("cache rows of " + std::to_string(W) + " minus kv_norm's " + std::to_string(C) +
                          " latent values leave a rope width of " + std::to_string(R) + " (need even, 2..256)");
  expect_shape(q, "q", {T, nh * (d + R)});
  expect_shape(kv, "kv", {T, W});
  expect_shape(cs, "cos", {T, R / 2});
  expect_shape(sn, "sin", {T, R / 2});
  expect_shape(slot, "slots", {T});
  expect_shape(pos, "positions", {T});
  expect_shape(w, "kv_b_weight", {nh * (d + v), C});
  expect_shape(out, "out", {T, nh * v});
  const int64_t* sp = reinterpret_cast<const int64_t*>(slot.data);
  const int64_t* pp = reinterpret_cast<const int64_t*>(pos.data);
  for (int64_t t = 0; t < T; ++t) {
    if (sp[t] < 0 || sp[t] >= S)
      throw py::value_error("slots[" + std::to_string(t) + "] = " + std::to_string(sp[t]) + " is out of range [0, " +
                            std::to_string(S) + ")");
    if (pp[t] < 0 || pp[t] >= Lmax)
      throw py::value_error("positions[" + std::to_string(t) + "] = " + std::to_string(pp[t]) +
                            " is out of range [0, " + std::to_string(Lmax) + ")");
    for (int64_t u = 0; u < t; ++u)
      if (sp[u] == sp[t] && pp[u] == pp[t])
        throw py::value_error("tokens " + std::to_string(u) + " and " + std::to_string(t) + " both write slot " +
                              std::to_string(sp[t]) + " position " + std::to_string(pp[t]));
  }
  MlaDecodeArgs a;
  a.t = T; a.nh = nh; a.d = d; a.r = R; a.v = v; a.c = C;
  a.q = reinterpret_cast<const uint16_t*>(q.data); a.ldq = nh * (d + R);
  a.kv = reinterpret_cast<const uint16_t*>(kv.data); a.ldkv = W;
  a.kv_norm = reinterpret_cast<const uint16_t*>(norm.data);
  a.eps = float(eps);
  a.cos = reinterpret_cast<const float*>(cs.data); a.sin = reinterpret_cast<const float*>(sn.data);
  a.interleave = interleave;
  a.cache = reinterpret_cast<uint16_t*>(cache.data); a.slots = S; a.max_len = Lmax;
  a.slot = sp; a.pos = pp;
  a.wkvb = reinterpret_cast<const uint16_t*>(w.data);
  a.scale = float(scale);
  a.out = reinterpret_cast<uint16_t*>(out.data);
  const KernelTable& kt = dense_table(isa);
  py::gil_scoped_release release;
  std::shared_ptr<ThreadPool> pool = threads ? global_pool() : nullptr;
  mla_decode(kt, pool.get(), pool ? sync_team(*pool) : 1, a);
}

// ---- decode-step norms and router (router.h) -----------------------------------------------
py::object py_rms_norm(const py::object& xo, const py::object& wo, double eps, const py::object& oo,
                       const py::object& ro) {
  const TorchRefs& tr = torch_refs();
  TensorView x = tensor_view(xo, "x", tr.bf16, "torch.bfloat16", 2);
  TensorView w = tensor_view(wo, "weight", tr.bf16, "torch.bfloat16", 1);
  const int64_t T = x.shape[0], H = x.shape[1];
  if (T < 1 || H < 1) throw py::value_error("x must not be empty");
  expect_shape(w, "weight", {H});
  const uint16_t* res = nullptr;
  if (!ro.is_none()) {
    TensorView r = tensor_view(ro, "residual", tr.bf16, "torch.bfloat16", 2);
    expect_shape(r, "residual", {T, H});
    res = reinterpret_cast<const uint16_t*>(r.data);
  }
  // out comes from the caller: torch.empty called from here through pybind costs ~6 us, from
  // Python ~1.5 us.
  TensorView o = tensor_view(oo, "out", tr.bf16, "torch.bfloat16", 2);
  expect_shape(o, "out", {T, H});
  if (o.data == x.data) throw py::value_error("out must not be x");
  {
    py::gil_scoped_release release;
    rms_norm_bf16(reinterpret_cast<uint16_t*>(x.data), res, reinterpret_cast<const uint16_t*>(w.data), T, H,
                  float(eps), reinterpret_cast<uint16_t*>(o.data));
  }
  return oo;
}

void py_route(const py::object& xo, const py::object& go, const py::object& bo, int64_t groups,
              int64_t topk_groups, int64_t top_k, bool norm_topk_prob, double scaling, const py::object& ido,
              const py::object& wo) {
  const TorchRefs& tr = torch_refs();
  TensorView x = tensor_view(xo, "x", tr.bf16, "torch.bfloat16", 2);
  TensorView g = tensor_view(go, "gate", tr.f32, "torch.float32", 2);
  const int64_t T = x.shape[0], H = x.shape[1], E = g.shape[0];
  if (T < 1 || H < 1) throw py::value_error("x must not be empty");
  expect_shape(g, "gate", {E, H});
  const float* bias = nullptr;
  if (!bo.is_none()) {
    TensorView b = tensor_view(bo, "bias", tr.f32, "torch.float32", 1);
    expect_shape(b, "bias", {E});
    bias = reinterpret_cast<const float*>(b.data);
  }
  if (groups < 1 || E % groups)
    throw py::value_error("n_group " + std::to_string(groups) + " must divide the " + std::to_string(E) + " experts");
  if (topk_groups < 1 || topk_groups > groups)
    throw py::value_error("topk_group " + std::to_string(topk_groups) + " must be in 1.." + std::to_string(groups));
  if (top_k < 1 || top_k > topk_groups * (E / groups))
    throw py::value_error("num_experts_per_tok " + std::to_string(top_k) + " must be in 1.." +
                          std::to_string(topk_groups * (E / groups)) + " (the experts of the eligible groups)");
  RouterConfig cfg;
  cfg.experts = E; cfg.groups = groups; cfg.topk_groups = topk_groups; cfg.top_k = top_k;
  cfg.norm_topk_prob = norm_topk_prob; cfg.scaling = float(scaling);
  TensorView iv = tensor_view(ido, "ids", tr.i32, "torch.int32", 2), wv = tensor_view(wo, "weights", tr.f32, "torch.float32", 2);
  expect_shape(iv, "ids", {T, top_k});
  expect_shape(wv, "weights", {T, top_k});
  int32_t* ip = reinterpret_cast<int32_t*>(iv.data);
  float* wp = reinterpret_cast<float*>(wv.data);
  {
    py::gil_scoped_release release;
    route_bf16(reinterpret_cast<const uint16_t*>(x.data), reinterpret_cast<const float*>(g.data), bias, T, H, cfg,
               ip, wp);
  }
}

// ---- packed layer ----------------------------------------------------------------------------

struct PyLayer {
  std::shared_ptr<PackedLayer> layer;

  void check_expert(int64_t e) const {
    if (e < 0 || e >= layer->num_experts())
      throw py::value_error("expert index " + std::to_string(e) + " is out of range [0, " +
                            std::to_string(layer->num_experts()) + ")");
  }
  void check_writable() const {
    if (!layer->writable())
      throw py::value_error("this packed layer is a read-only mapping of '" + layer->path() + "'");
  }

  // gate_up unit range of each thread covers gate/up blocks [2u0, 2u1); down blocks are units.
  void pack_float(int64_t e, const py::object& go, const py::object& uo, const py::object& dobj) {
    check_expert(e);
    check_writable();
    const int64_t H = layer->hidden(), I = layer->intermediate();
    py::array g = as_array(go, "gate"), u = as_array(uo, "up"), d = as_array(dobj, "down");
    SrcDtype gt = float_kind(g, "gate"), ut = float_kind(u, "up"), dt = float_kind(d, "down");
    check_layout(g, "gate", {I, H});
    check_layout(u, "up", {I, H});
    check_layout(d, "down", {H, I});
    const WeightFormat f = layer->format();
    PackedMatrix gu = layer->gate_up(e), dn = layer->down(e);
    PackDest dg{const_cast<uint8_t*>(gu.qweight), const_cast<uint16_t*>(gu.scales), 2, 0};
    PackDest du{const_cast<uint8_t*>(gu.qweight), const_cast<uint16_t*>(gu.scales), 2, 1};
    PackDest dd{const_cast<uint8_t*>(dn.qweight), const_cast<uint16_t*>(dn.scales), 1, 0};
    const void *gp = g.data(), *up = u.data(), *dp = d.data();
    py::gil_scoped_release release;
    auto pool = global_pool();
    pool->run({[&](int tid, int team) {
      auto [u0, u1] = pool->split(gate_up_units(I), tid, team);
      auto named = [](const char* name, auto&& fn) {
        try {
          fn();
        } catch (const std::invalid_argument& e) {
          throw std::invalid_argument(std::string(name) + ": " + e.what());
        }
      };
      if (u0 < u1) {
        named("gate", [&] { quantize_pack(f, gp, gt, I, H, 2 * u0, 2 * u1, dg); });
        named("up", [&] { quantize_pack(f, up, ut, I, H, 2 * u0, 2 * u1, du); });
      }
      auto [d0, d1] = pool->split(down_units(H), tid, team);
      if (d0 < d1) named("down", [&] { quantize_pack(f, dp, dt, H, I, d0, d1, dd); });
    }});
  }

  void pack_ct(int64_t e, const py::object& gpo, const py::object& gso, const py::object& upo, const py::object& uso,
               const py::object& dpo, const py::object& dso) {
    check_expert(e);
    check_writable();
    if (layer->format() != WeightFormat::INT4_G32)
      throw py::value_error("compressed-tensors INT4 experts need an int4 layer, this one is " +
                            format_name(layer->format()));
    const int64_t H = layer->hidden(), I = layer->intermediate();
    py::array gp = as_array(gpo, "gate weight_packed"), gs = as_array(gso, "gate weight_scale");
    py::array upk = as_array(upo, "up weight_packed"), us = as_array(uso, "up weight_scale");
    py::array dp = as_array(dpo, "down weight_packed"), ds = as_array(dso, "down weight_scale");
    check_ct_pair(gp, gs, I, H, "gate weight_packed", "gate weight_scale");
    check_ct_pair(upk, us, I, H, "up weight_packed", "up weight_scale");
    check_ct_pair(dp, ds, H, I, "down weight_packed", "down weight_scale");
    PackedMatrix gu = layer->gate_up(e), dn = layer->down(e);
    PackDest dg{const_cast<uint8_t*>(gu.qweight), const_cast<uint16_t*>(gu.scales), 2, 0};
    PackDest du{const_cast<uint8_t*>(gu.qweight), const_cast<uint16_t*>(gu.scales), 2, 1};
    PackDest dd{const_cast<uint8_t*>(dn.qweight), const_cast<uint16_t*>(dn.scales), 1, 0};
    struct Src { const int32_t* p; const void* s; SrcDtype t; };
    Src g{static_cast<const int32_t*>(gp.data()), gs.data(), float_kind(gs, "gate weight_scale")};
    Src uu{static_cast<const int32_t*>(upk.data()), us.data(), float_kind(us, "up weight_scale")};
    Src dd_{static_cast<const int32_t*>(dp.data()), ds.data(), float_kind(ds, "down weight_scale")};
    py::gil_scoped_release release;
    auto pool = global_pool();
    pool->run({[&](int tid, int team) {
      auto [u0, u1] = pool->split(gate_up_units(I), tid, team);
      if (u0 < u1) {
        pack_int4_from_ct(g.p, g.s, g.t, I, H, 2 * u0, 2 * u1, dg);
        pack_int4_from_ct(uu.p, uu.s, uu.t, I, H, 2 * u0, 2 * u1, du);
      }
      auto [d0, d1] = pool->split(down_units(H), tid, team);
      if (d0 < d1) pack_int4_from_ct(dd_.p, dd_.s, dd_.t, H, I, d0, d1, dd);
    }});
  }

  py::tuple unpack_expert(int64_t e) const {
    check_expert(e);
    const int64_t H = layer->hidden(), I = layer->intermediate();
    py::array_t<float> gate({I, H}), up({I, H}), down({H, I});
    float *gp = gate.mutable_data(), *upp = up.mutable_data(), *dp = down.mutable_data();
    PackedMatrix gu = layer->gate_up(e), dn = layer->down(e);
    {
    py::gil_scoped_release release;
    auto pool = global_pool();
    pool->run({[&](int tid, int team) {
      std::vector<float> rows(size_t(2 * kRowBlock * H));
      auto [b0, b1] = pool->split(I / kRowBlock, tid, team);  // gate/up block j = packed 2j, 2j+1
      for (int64_t j = b0; j < b1; ++j) {
        unpack(gu, 2 * j, 2 * j + 2, rows.data());
        std::memcpy(gp + j * kRowBlock * H, rows.data(), size_t(kRowBlock * H) * 4);
        std::memcpy(upp + j * kRowBlock * H, rows.data() + kRowBlock * H, size_t(kRowBlock * H) * 4);
      }
      auto [d0, d1] = pool->split(H / kRowBlock, tid, team);
      if (d0 < d1) unpack(dn, d0, d1, dp + d0 * kRowBlock * I);
    }});
    }  // GIL back before building the tuple
    return py::make_tuple(gate, up, down);
  }
};

// ---- MoE operator ----------------------------------------------------------------------------

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

std::string mode_name(ActMode m) { return m == ActMode::Fast ? "fast" : "precise"; }

py::dict cpu_info_dict() {
  const CpuInfo& c = cpu_info();
  py::dict d;
  d["brand"] = c.brand;
  d["flags"] = c.flags;
  d["os_avx"] = c.os_avx;
  d["os_avx512"] = c.os_avx512;
  d["os_amx"] = c.os_amx;
  d["amx_permitted"] = c.amx_permitted;
  d["amx_refusal"] = c.amx_refusal;
  return d;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "hybrid's CPU MoE engine (csrc/). Import it through hybrid.native, not directly.";

  m.def("cpu_info", &cpu_info_dict, "CPU brand, feature flags and OS register-state support");
  m.def("isa_names", &isa_names, "every ISA path name, lowest first");
  m.def("available_isas", &available_isas, "ISA paths this CPU + OS + build can run, lowest first");
  m.def("isa_unavailable_reason", &isa_unavailable_reason, py::arg("isa"), "why an ISA cannot run ('' if it can)");
  m.def("active_isa", []() { return active_isa(); }, "the ISA the operator uses (HYBRID_ISA or the best)");

  m.def("default_threads", &default_threads);
  m.def("num_threads", []() { return global_pool()->size(); }, "threads of the global pool");
  m.def("set_sync_threads", &set_sync_threads, py::arg("threads"),
        "cap the threads (caller + workers) of synchronous native calls: dense GEMV, MLA decode (<= 0: none)");
  m.def("sync_threads", []() { return sync_team(*global_pool()); }, "threads a synchronous native call uses now");
  m.def("set_num_threads", [](int n) { py::gil_scoped_release r; set_global_threads(n); }, py::arg("threads"),
        "replace the global pool (<= 0: default); queued jobs finish first");
  m.def("split_units", [](int64_t units, const std::vector<int>& team_nodes) {
    if (team_nodes.empty()) throw py::value_error("team_nodes must not be empty");
    std::vector<std::pair<int64_t, int64_t>> out;
    for (int t = 0; t < int(team_nodes.size()); ++t) out.push_back(split_units(units, t, team_nodes));
    return out;
  }, py::arg("units"), py::arg("team_nodes"), "the pool's NUMA-aware work split, for every thread");
  m.def("topology", []() {
    CpuTopology t = detect_topology();
    py::dict d;
    d["cpus"] = t.cpus;
    d["node_of"] = t.node_of;
    d["physical_cores"] = t.physical_cores;
    d["num_nodes"] = t.num_nodes;
    d["node_ids"] = t.node_ids;
    return d;
  });
  m.def("pool_info", []() {
    auto p = global_pool();
    std::vector<int> cpus, nodes;
    for (int i = 0; i < p->size(); ++i) {
      cpus.push_back(p->cpu_of(i));
      nodes.push_back(p->node_of(i));
    }
    py::dict d;
    d["threads"] = p->size();
    d["worker_cpus"] = cpus;
    d["worker_nodes"] = nodes;
    return d;
  });
  m.def("read_bandwidth", [](size_t nbytes, int repeats) {
    BandwidthResult r;
    {
      py::gil_scoped_release rel;
      r = measure_read_bandwidth(*global_pool(), nbytes, repeats);
    }
    py::dict d;
    d["gbps"] = r.gbps;
    d["runs"] = r.runs;
    d["bytes"] = r.bytes;
    d["threads"] = r.threads;
    d["hugepage_advised"] = r.hugepage_advised;
    return d;
  }, py::arg("nbytes") = size_t(1) << 30, py::arg("repeats") = 5);

  m.def("pack_int4_from_ct", &py_pack_int4_from_ct, py::arg("weight_packed"), py::arg("weight_scale"),
        "compressed-tensors INT4 -> INT4_G32 (qweight uint8, scales uint16), bit-exact");
  m.def("quantize_pack", &py_quantize_pack, py::arg("w"), py::arg("format"),
        "float32/bf16 [N, K] -> packed (qweight uint8, scales uint16 or None)");
  m.def("unpack", &py_unpack, py::arg("format"), py::arg("qweight"), py::arg("scales"), py::arg("n"),
        py::arg("k"), "packed -> float32 [N, K]");

  m.def("kernel_entries", [](const std::string& isa) {
    const KernelTable& t = resolved_table(isa);
    py::dict d;
    d["quantize_row_a8"] = t.quantize_row_a8 != nullptr;
    d["matmul_a8"] = t.matmul_a8 != nullptr;
    d["matmul_f32"] = t.matmul_f32 != nullptr;
    d["matmul_a16"] = t.matmul_a16 != nullptr;
    d["gemv_bf16"] = t.gemv_bf16 != nullptr;
    d["gemv_t_bf16"] = t.gemv_t_bf16 != nullptr;
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
  m.def("dense_gemv", &py_dense_gemv, py::arg("w"), py::arg("x"), py::arg("out"), py::arg("isa") = "",
        py::arg("threads") = true,
        "out [T, N] (float32, or uint16 bf16 bits rounded to nearest even) = x [T, K] . w [N, K]^T; w, x uint16 "
        "bf16 bits with unit inner stride (rows may be strided); isa '' = the active one; threads=False: inline");
  m.def("rms_norm", &py_rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("residual") = py::none(),
        "RMSNorm of bf16 x [T, H] into out (router.h); with residual, x += residual first, in place; returns out");
  m.def("route", &py_route, py::arg("x"), py::arg("gate"), py::arg("bias"), py::arg("n_group"), py::arg("topk_group"),
        py::arg("top_k"), py::arg("norm_topk_prob"), py::arg("scaling"), py::arg("ids"), py::arg("weights"),
        "DeepSeek-V3 noaux_tc router (router.h) into ids int32 [T, K] and weights float32 [T, K]");
  m.def("mla_decode", &py_mla_decode, py::arg("q"), py::arg("kv"), py::arg("kv_norm"), py::arg("cos"), py::arg("sin"),
        py::arg("cache"), py::arg("slots"), py::arg("positions"), py::arg("kv_b_weight"), py::arg("out"),
        py::arg("num_heads"), py::arg("qk_nope_head_dim"), py::arg("v_head_dim"), py::arg("eps"), py::arg("scale"),
        py::arg("interleave"), py::arg("threads") = true, py::arg("isa") = "",
        "MLA attention of decode tokens (mla_decode.h): writes their cache rows, out [T, nh*V] bf16");
  m.def("dense_gemv_torch", &py_dense_gemv_torch, py::arg("weight"), py::arg("x"), py::arg("out") = py::none(),
        py::arg("isa") = "", py::arg("threads") = true,
        "dense_gemv on torch CPU tensors (weight, x bf16; out bf16 or float32, allocated bf16 when None); returns out");

  py::class_<PyPoolJob>(m, "PoolTestJob")
      .def("wait", &PyPoolJob::wait)
      .def_property_readonly("done", &PyPoolJob::done)
      .def_property_readonly("team", &PyPoolJob::team)
      .def_property_readonly("phase_counts", &PyPoolJob::phase_counts);
  m.def("pool_test_job", &pool_test_job, py::arg("phases"), py::arg("fail_phase") = -1, py::arg("fail_tid") = -1,
        py::arg("sleep_us") = 0, py::arg("team") = 0, py::arg("caller") = false,
        "tests: a pool job that checks its barriers (caller=True: wait() runs the caller's share)");

  py::class_<PyLayer>(m, "Layer")
      .def_static("create", [](const std::string& fmt, int64_t e, int64_t h, int64_t i) {
        return PyLayer{PackedLayer::create(parse_format(fmt), e, h, i)};
      }, py::arg("format"), py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"))
      .def_static("open", [](const std::string& path) {
        py::gil_scoped_release r;
        return PyLayer{PackedLayer::open(path)};
      }, py::arg("path"))
      .def("save", [](const PyLayer& l, const std::string& path) {
        py::gil_scoped_release r;
        l.layer->save(path);
      }, py::arg("path"))
      .def("place", [](const PyLayer& l) {
        py::gil_scoped_release r;
        l.layer->place(*global_pool());
      })
      .def("pack_expert_float", &PyLayer::pack_float, py::arg("e"), py::arg("gate"), py::arg("up"), py::arg("down"))
      .def("pack_expert_ct", &PyLayer::pack_ct, py::arg("e"), py::arg("gate_packed"), py::arg("gate_scale"),
           py::arg("up_packed"), py::arg("up_scale"), py::arg("down_packed"), py::arg("down_scale"))
      .def("unpack_expert", &PyLayer::unpack_expert, py::arg("e"))
      .def_property_readonly("format", [](const PyLayer& l) { return format_name(l.layer->format()); })
      .def_property_readonly("num_experts", [](const PyLayer& l) { return l.layer->num_experts(); })
      .def_property_readonly("hidden", [](const PyLayer& l) { return l.layer->hidden(); })
      .def_property_readonly("intermediate", [](const PyLayer& l) { return l.layer->intermediate(); })
      .def_property_readonly("nbytes", [](const PyLayer& l) { return l.layer->nbytes(); })
      .def_property_readonly("expert_nbytes", [](const PyLayer& l) { return l.layer->expert_nbytes(); })
      .def_property_readonly("writable", [](const PyLayer& l) { return l.layer->writable(); })
      .def_property_readonly("path", [](const PyLayer& l) { return l.layer->path(); });

  py::class_<PyMoE>(m, "MoE")
      .def(py::init([](const PyLayer& l, const std::string& mode, int threads, const std::string& isa,
                       bool caller) {
        ActMode am;
        if (mode == "fast") am = ActMode::Fast;
        else if (mode == "precise") am = ActMode::Precise;
        else throw py::value_error("mode must be 'fast' or 'precise', got '" + mode + "'");
        if (threads < 0) throw py::value_error("threads must be >= 0 (0: the whole pool), got " + std::to_string(threads));
        auto p = std::make_unique<PyMoE>();
        p->layer = l.layer;
        p->op = std::make_unique<MoeOperator>(l.layer, am, threads, isa, caller);
        return p;
      }), py::arg("layer"), py::arg("mode") = "fast", py::arg("threads") = 0, py::arg("isa") = "",
           py::arg("caller") = false)
      .def("submit", &PyMoE::submit, py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("skip_mask"),
           py::arg("y"), py::arg("accumulate") = false)
      .def("sync", &PyMoE::sync)
      .def("inject_fault", [](PyMoE& p, const std::string& msg) { p.op->inject_fault(msg); }, py::arg("message"),
           "tests: the next job fails in a worker with RuntimeError(message) at sync()")
      .def_property_readonly("pending", [](const PyMoE& p) { return p.op->pending(); })
      .def_property_readonly("isa", [](const PyMoE& p) { return p.op->isa(); })
      .def_property_readonly("mode", [](const PyMoE& p) { return mode_name(p.op->mode()); });
}

// Bound functions and classes (module hybrid._native):
//   cpu_info, isa_names, available_isas, isa_unavailable_reason, active_isa
//   default_threads, num_threads, set_num_threads, set_sync_threads, sync_threads, split_units, topology, pool_info, read_bandwidth
//   pack_int4_from_ct, quantize_pack, unpack
//   kernel_entries, kernel_quantize_row_a8, kernel_matmul_a8, kernel_matmul_f32, kernel_matmul_a16,
//   reference_matmul_a16, kernel_gemv_t_bf16
//   dense_gemv, dense_gemv_torch, mla_decode, rms_norm, route
//   Layer: create, open, save, place, pack_expert_float, pack_expert_ct, unpack_expert,
//          format, num_experts, hidden, intermediate, nbytes, expert_nbytes, writable, path
//   MoE(layer, mode, threads, isa, caller): submit, sync, pending, isa, mode, inject_fault
//   pool_test_job -> PoolTestJob: wait, done, phase_counts
