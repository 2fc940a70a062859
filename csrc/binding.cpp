// binding.cpp: the module users load, hybrid._native. With binding_dense.cpp (its device-Linear
// front doors, registered here by bind_dense), binding_testing.cpp (the test-only module
// hybrid._native_testing) and their headers (binding_args.h, binding_moe.h, binding_dense.h) the
// only code that knows Python; core/ and models/ know nothing of it. It turns numpy arrays and torch
// tensors into raw pointers + shapes, checks everything at the boundary (dtype, ndim, shape, C-contiguity, writability,
// expert id range, buffer sizes) and raises TypeError / ValueError naming the argument. bf16 data
// travels as uint16 arrays of bit patterns (numpy has no bf16); hybrid/native.py converts torch
// tensors without copies. The bound functions are listed at the end of the file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "binding_args.h"
#include "binding_dense.h"
#include "binding_moe.h"
#include "core/bandwidth.h"
#include "core/dispatch.h"
#include "core/kernels.h"
#include "core/moe.h"
#include "core/norm.h"
#include "core/pack.h"
#include "core/packed_layer.h"
#include "core/thread_pool.h"
#include "models/mla_decode.h"
#include "models/router.h"

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

// GGUF blocks of one [N, K] matrix, uint8 [N, row bytes] as a GGUF file stores them (pack.h).
void check_gguf_rows(const py::array& a, WeightFormat f, int64_t n, int64_t k, const std::string& name) {
  const size_t bb = gguf_block_bytes(f);
  if (bb == 0) throw py::value_error(name + ": format '" + format_name(f) + "' is not a GGUF block type");
  if (!is_dtype<uint8_t>(a)) bad_dtype(a, name.c_str(), "uint8 (raw GGUF blocks)");
  const int64_t rb = int64_t(gguf_row_bytes(f, k));
  if (a.ndim() == 2 && a.shape(0) == n && a.shape(1) != rb)
    throw py::value_error(name + ": a row of " + std::to_string(k) + " inputs in " + format_name(f) + " is " +
                          std::to_string(k / gguf_block_inputs(f)) + " blocks of " + std::to_string(bb) + " bytes = " +
                          std::to_string(rb) + " bytes, got rows of " + std::to_string(a.shape(1)) + " bytes");
  check_layout(a, name.c_str(), {n, rb});
}

py::tuple py_pack_gguf(const py::object& ro, const std::string& fmt, int64_t n, int64_t k) {
  WeightFormat f = parse_format(fmt);
  check_matrix_dims(n, k, "rows", f);
  py::array rows = as_array(ro, "rows");
  check_gguf_rows(rows, f, n, k, "rows");
  py::array_t<uint8_t> q(py::ssize_t(packed_qweight_bytes(f, n, k)));
  py::array_t<uint16_t> s(py::ssize_t(packed_scale_bytes(f, n, k) / 2));
  PackDest d{q.mutable_data(), s.mutable_data()};
  const uint8_t* src = static_cast<const uint8_t*>(rows.data());
  parallel_blocks(n / kRowBlock, [&](int64_t b0, int64_t b1) { pack_gguf(f, src, n, k, b0, b1, d); });
  return py::make_tuple(q, s);
}

py::array_t<float> py_unpack(const std::string& fmt, const py::object& q, const py::object& s, int64_t n, int64_t k) {
  PackedMatrix m = packed_from_arrays(parse_format(fmt), q, s, n, k);
  py::array_t<float> out({n, k});
  float* op = out.mutable_data();
  parallel_blocks(n / kRowBlock, [&](int64_t b0, int64_t b1) { unpack(m, b0, b1, op + b0 * kRowBlock * k); });
  return out;
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

// ---- decode-step norm (core/norm.h) and routers (models/router.h) -----------------------------------------------
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

// The operands every router takes: x bf16 [T, H] (T, H >= 1), gate fp32 [E, H], and the outputs
// ids int32 [T, K], weights fp32 [T, K] under the names the binding gives them.
struct RouterOperands {
  const uint16_t* x;
  const float* gate;
  int64_t t, h, e;
  int32_t* ids = nullptr;
  float* weights = nullptr;
};

RouterOperands router_inputs(const py::object& xo, const py::object& go) {
  const TorchRefs& tr = torch_refs();
  TensorView x = tensor_view(xo, "x", tr.bf16, "torch.bfloat16", 2);
  TensorView g = tensor_view(go, "gate", tr.f32, "torch.float32", 2);
  const int64_t T = x.shape[0], H = x.shape[1], E = g.shape[0];
  if (T < 1 || H < 1) throw py::value_error("x must not be empty");
  expect_shape(g, "gate", {E, H});
  return {reinterpret_cast<const uint16_t*>(x.data), reinterpret_cast<const float*>(g.data), T, H, E};
}

void router_outputs(RouterOperands& r, int64_t top_k, const py::object& ido, const char* ids_name,
                    const py::object& wo, const char* weights_name) {
  const TorchRefs& tr = torch_refs();
  TensorView iv = tensor_view(ido, ids_name, tr.i32, "torch.int32", 2);
  TensorView wv = tensor_view(wo, weights_name, tr.f32, "torch.float32", 2);
  expect_shape(iv, ids_name, {r.t, top_k});
  expect_shape(wv, weights_name, {r.t, top_k});
  r.ids = reinterpret_cast<int32_t*>(iv.data);
  r.weights = reinterpret_cast<float*>(wv.data);
}

void py_route(const py::object& xo, const py::object& go, const py::object& bo, int64_t groups,
              int64_t topk_groups, int64_t top_k, bool norm_topk_prob, double scaling, const py::object& ido,
              const py::object& wo) {
  RouterOperands r = router_inputs(xo, go);
  const int64_t E = r.e;
  const float* bias = nullptr;
  if (!bo.is_none()) {
    TensorView b = tensor_view(bo, "bias", torch_refs().f32, "torch.float32", 1);
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
  router_outputs(r, top_k, ido, "ids", wo, "weights");
  py::gil_scoped_release release;
  route_bf16(r.x, r.gate, bias, r.t, r.h, cfg, r.ids, r.weights);
}

void py_route_softmax(const py::object& xo, const py::object& go, int64_t top_k, bool norm_topk_prob,
                      const py::object& ido, const py::object& wo) {
  RouterOperands r = router_inputs(xo, go);
  if (top_k < 1 || top_k > r.e)
    throw py::value_error("top_k " + std::to_string(top_k) + " must be in 1.." + std::to_string(r.e) +
                          " (the experts of gate)");
  router_outputs(r, top_k, ido, "ids_out", wo, "w_out");
  py::gil_scoped_release release;
  route_softmax_bf16(r.x, r.gate, r.t, r.h, r.e, top_k, norm_topk_prob, r.ids, r.weights);
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
    check_not_split();
    const WeightFormat f = layer->format(), fd = layer->down_format();
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
      if (d0 < d1) named("down", [&] { quantize_pack(fd, dp, dt, H, I, d0, d1, dd); });
    }});
  }

  void pack_ct(int64_t e, const py::object& gpo, const py::object& gso, const py::object& upo, const py::object& uso,
               const py::object& dpo, const py::object& dso) {
    check_expert(e);
    check_writable();
    check_not_split();
    if (layer->format() != WeightFormat::INT4_G32 || layer->down_format() != WeightFormat::INT4_G32)
      throw py::value_error("compressed-tensors INT4 experts need an int4 layer, this one is " +
                            format_name(layer->format()) + " (down " + format_name(layer->down_format()) + ")");
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

  // Where gate and up blocks go: interleaved into gate_up (blocks 2j, 2j + 1), or each into its
  // own matrix when the layer splits them (packed_layer.h).
  std::pair<PackDest, PackDest> gate_up_dests(int64_t e) const {
    auto dest = [](const PackedMatrix& m, int64_t mult, int64_t off) {
      return PackDest{const_cast<uint8_t*>(m.qweight), const_cast<uint16_t*>(m.scales), mult, off};
    };
    if (layer->split_gate_up()) return {dest(layer->gate(e), 1, 0), dest(layer->up(e), 1, 0)};
    const PackedMatrix gu = layer->gate_up(e);
    return {dest(gu, 2, 0), dest(gu, 2, 1)};
  }
  void check_not_split() const {
    if (layer->split_gate_up())
      throw py::value_error("this layer's gate and up have different formats (" + format_name(layer->format()) +
                            ", " + format_name(layer->up_format()) + "): only pack_expert_gguf fills it");
  }

  // Raw GGUF blocks of one expert (pack.h): gate uint8 [I, row bytes of H inputs] in the layer's
  // format, up the same in its up_format, down uint8 [H, row bytes of I inputs] in its down_format.
  void pack_gguf_expert(int64_t e, const py::object& go, const py::object& uo, const py::object& dobj) {
    check_expert(e);
    check_writable();
    const int64_t H = layer->hidden(), I = layer->intermediate();
    const WeightFormat f = layer->format(), fu = layer->up_format(), fd = layer->down_format();
    py::array g = as_array(go, "gate"), u = as_array(uo, "up"), d = as_array(dobj, "down");
    check_gguf_rows(g, f, I, H, "gate");
    check_gguf_rows(u, fu, I, H, "up");
    check_gguf_rows(d, fd, H, I, "down");
    PackedMatrix dn = layer->down(e);
    auto [dg, du] = gate_up_dests(e);
    PackDest dd{const_cast<uint8_t*>(dn.qweight), const_cast<uint16_t*>(dn.scales), 1, 0};
    const uint8_t *gp = static_cast<const uint8_t*>(g.data()), *up = static_cast<const uint8_t*>(u.data()),
                  *dp = static_cast<const uint8_t*>(d.data());
    py::gil_scoped_release release;
    auto pool = global_pool();
    pool->run({[&](int tid, int team) {
      auto [u0, u1] = pool->split(gate_up_units(I), tid, team);
      if (u0 < u1) {
        pack_gguf(f, gp, I, H, 2 * u0, 2 * u1, dg);
        pack_gguf(fu, up, I, H, 2 * u0, 2 * u1, du);
      }
      auto [d0, d1] = pool->split(down_units(H), tid, team);
      if (d0 < d1) pack_gguf(fd, dp, H, I, d0, d1, dd);
    }});
  }

  py::tuple unpack_expert(int64_t e) const {
    check_expert(e);
    const int64_t H = layer->hidden(), I = layer->intermediate();
    py::array_t<float> gate({I, H}), up({I, H}), down({H, I});
    float *gp = gate.mutable_data(), *upp = up.mutable_data(), *dp = down.mutable_data();
    const bool split = layer->split_gate_up();
    PackedMatrix gu = split ? layer->gate(e) : layer->gate_up(e), um = split ? layer->up(e) : gu, dn = layer->down(e);
    {
    py::gil_scoped_release release;
    auto pool = global_pool();
    pool->run({[&](int tid, int team) {
      std::vector<float> rows(size_t(2 * kRowBlock * H));
      auto [b0, b1] = pool->split(I / kRowBlock, tid, team);  // gate/up block j = packed 2j, 2j+1
      if (split && b0 < b1) {
        unpack(gu, b0, b1, gp + b0 * kRowBlock * H);
        unpack(um, b0, b1, upp + b0 * kRowBlock * H);
      }
      for (int64_t j = b0; j < b1 && !split; ++j) {
        unpack(gu, 2 * j, 2 * j + 2, rows.data());
        std::memcpy(gp + j * kRowBlock * H, rows.data(), size_t(kRowBlock * H) * 4);
        std::memcpy(upp + j * kRowBlock * H, rows.data() + kRowBlock * H, size_t(kRowBlock * H) * 4);
      }
      auto [d0, d1] = pool->split(H / kRowBlock, tid, team);
      if (d0 < d1) unpack(dn, d0, d1, dp + d0 * kRowBlock * I);
    }});
    layer->check_intact();
    }  // GIL back before building the tuple
    return py::make_tuple(gate, up, down);
  }

  // Expert e's packed arrays as they are, without a copy: (gate_up qweight uint8, gate_up scales
  // uint16 or None, down qweight uint8, down scales uint16 or None), 1-D read-only views into the
  // layer's buffer (kernels.h layout), each keeping the layer alive. For a device copy of the
  // expert in its own bits (hybrid/experts/device_layout.py).
  py::tuple expert_arrays(int64_t e) const {
    check_expert(e);
    const int64_t H = layer->hidden(), I = layer->intermediate();
    const WeightFormat f = layer->format();
    auto owner = py::capsule(new std::shared_ptr<PackedLayer>(layer),
                             [](void* p) { delete static_cast<std::shared_ptr<PackedLayer>*>(p); });
    auto view = [&](const void* ptr, size_t bytes, bool u16) -> py::object {
      if (bytes == 0) return py::none();
      py::array a = u16 ? py::array(py::dtype::of<uint16_t>(), {py::ssize_t(bytes / 2)},
                                    static_cast<const uint16_t*>(ptr), owner)
                        : py::array(py::dtype::of<uint8_t>(), {py::ssize_t(bytes)},
                                    static_cast<const uint8_t*>(ptr), owner);
      py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
      return std::move(a);
    };
    PackedMatrix gu = layer->gate_up(e), dn = layer->down(e);
    return py::make_tuple(view(gu.qweight, packed_qweight_bytes(f, 2 * I, H), false),
                          view(gu.scales, packed_scale_bytes(f, 2 * I, H), true),
                          view(dn.qweight, packed_qweight_bytes(f, H, I), false),
                          view(dn.scales, packed_scale_bytes(f, H, I), true));
  }
};

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

  m.attr("max_threads") = kMaxThreads;  // the most workers a pool may have
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
  m.def("pack_gguf", &py_pack_gguf, py::arg("rows"), py::arg("format"), py::arg("n"), py::arg("k"),
        "raw GGUF blocks uint8 [N, row bytes] of a GGUF-typed [N, K] matrix (q4_0, q8_0, q4_k, q5_k, q6_k, q3_k, "
        "q2_k, iq4_xs) -> packed (qweight uint8, scales uint16 fp16 bits: empty for the K types), lossless");
  m.def("unpack", &py_unpack, py::arg("format"), py::arg("qweight"), py::arg("scales"), py::arg("n"),
        py::arg("k"), "packed -> float32 [N, K]");

  bind_dense(m);  // dense_gemv, dense_gemv_torch, dense_gemv_i8_torch, packed_linear_torch (binding_dense.cpp)
  m.def("rms_norm", &py_rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("residual") = py::none(),
        "RMSNorm of bf16 x [T, H] into out (core/norm.h); with residual, x += residual first, in place; returns out");
  m.def("route", &py_route, py::arg("x"), py::arg("gate"), py::arg("bias"), py::arg("n_group"), py::arg("topk_group"),
        py::arg("top_k"), py::arg("norm_topk_prob"), py::arg("scaling"), py::arg("ids"), py::arg("weights"),
        "DeepSeek-V3 noaux_tc router (router.h) into ids int32 [T, K] and weights float32 [T, K]");
  m.def("route_softmax", &py_route_softmax, py::arg("x"), py::arg("gate"), py::arg("top_k"), py::arg("norm_topk_prob"),
        py::arg("ids_out"), py::arg("w_out"),
        "softmax top-k router (Qwen3-MoE, Mixtral; router.h): x bf16 [T, H] . gate float32 [E, H]^T -> softmax -> the "
        "top_k experts into ids_out int32 [T, K] and their probabilities into w_out float32 [T, K] (renormalised to "
        "sum 1 when norm_topk_prob); equal probabilities go to the lower expert index");
  m.def("mla_decode", &py_mla_decode, py::arg("q"), py::arg("kv"), py::arg("kv_norm"), py::arg("cos"), py::arg("sin"),
        py::arg("cache"), py::arg("slots"), py::arg("positions"), py::arg("kv_b_weight"), py::arg("out"),
        py::arg("num_heads"), py::arg("qk_nope_head_dim"), py::arg("v_head_dim"), py::arg("eps"), py::arg("scale"),
        py::arg("interleave"), py::arg("threads") = true, py::arg("isa") = "",
        "MLA attention of decode tokens (mla_decode.h): writes their cache rows, out [T, nh*V] bf16");

  py::class_<PyLayer>(m, "Layer")
      .def_static("create", [](const std::string& fmt, int64_t e, int64_t h, int64_t i, const std::string& down,
                               const std::string& up) {
        const WeightFormat f = parse_format(fmt);
        return PyLayer{PackedLayer::create(f, up.empty() ? f : parse_format(up, "up_format"),
                                           down.empty() ? f : parse_format(down, "down_format"), e, h, i)};
      }, py::arg("format"), py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"),
         py::arg("down_format") = "", py::arg("up_format") = "",
         "format: gate's (and up's, down's unless given); '' = format")
      .def_static("layout_bytes", [](const std::string& fmt, int64_t e, int64_t h, int64_t i, const std::string& down,
                                     const std::string& up) {
        const WeightFormat f = parse_format(fmt);
        const LayerHeader hd = layer_layout(f, up.empty() ? f : parse_format(up, "up_format"),
                                            down.empty() ? f : parse_format(down, "down_format"), e, h, i);
        return py::make_tuple(hd.total_bytes, hd.expert_stride);
      }, py::arg("format"), py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"),
         py::arg("down_format") = "", py::arg("up_format") = "",
         "(total bytes, bytes per expert) of the packed layer these formats and shape make, allocating nothing")
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
      .def("pack_expert_gguf", &PyLayer::pack_gguf_expert, py::arg("e"), py::arg("gate"), py::arg("up"), py::arg("down"))
      .def("unpack_expert", &PyLayer::unpack_expert, py::arg("e"))
      .def("expert_arrays", &PyLayer::expert_arrays, py::arg("e"))
      .def("read_bandwidth", [](const PyLayer& l, const std::vector<int64_t>& experts, int repeats) {
        // The memory rate of these experts' own pages (bandwidth.h): a decode over them, timed
        // beside it, shows the kernel's share of the loss apart from where its pages landed.
        std::vector<ReadRegion> regions;
        for (int64_t e : experts) {
          l.check_expert(e);
          regions.push_back({l.layer->expert_base(e), size_t(l.layer->expert_nbytes())});
        }
        BandwidthResult r;
        {
          py::gil_scoped_release rel;
          r = measure_region_read_bandwidth(*global_pool(), regions, repeats);
          l.layer->check_intact();
        }
        py::dict d;
        d["gbps"] = r.gbps;
        d["runs"] = r.runs;
        d["bytes"] = r.bytes;
        d["threads"] = r.threads;
        return d;
      }, py::arg("experts"), py::arg("repeats") = 1,
         "read these experts' packed bytes with the pool (no compute): {gbps (median), runs, bytes, threads}")
      .def_property_readonly("format", [](const PyLayer& l) { return format_name(l.layer->format()); })
      .def_property_readonly("down_format", [](const PyLayer& l) { return format_name(l.layer->down_format()); })
      .def_property_readonly("up_format", [](const PyLayer& l) { return format_name(l.layer->up_format()); })
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
        if (threads < 0 || threads > kMaxThreads + 1)  // + 1: a caller job's own thread
          throw py::value_error("threads must be in 0.." + std::to_string(kMaxThreads + 1) +
                                " (0: the whole pool), got " + std::to_string(threads));
        auto p = std::make_unique<PyMoE>();
        p->layer = l.layer;
        p->op = std::make_unique<MoeOperator>(l.layer, am, threads, isa, caller);
        return p;
      }), py::arg("layer"), py::arg("mode") = "fast", py::arg("threads") = 0, py::arg("isa") = "",
           py::arg("caller") = false)
      .def("submit", &PyMoE::submit, py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("skip_mask"),
           py::arg("y"), py::arg("accumulate") = false)
      .def("sync", &PyMoE::sync)
      .def_property_readonly("pending", [](const PyMoE& p) { return p.op->pending(); })
      .def_property_readonly("isa", [](const PyMoE& p) { return p.op->isa(); })
      .def_property_readonly("mode", [](const PyMoE& p) { return mode_name(p.op->mode()); });
}

// Bound functions and classes (module hybrid._native):
//   cpu_info, isa_names, available_isas, isa_unavailable_reason, active_isa
//   max_threads, default_threads, num_threads, set_num_threads, set_sync_threads, sync_threads, split_units, topology, pool_info, read_bandwidth
//   pack_int4_from_ct, quantize_pack, pack_gguf, unpack
//   dense_gemv, dense_gemv_torch, dense_gemv_i8_torch, packed_linear_torch (binding_dense.cpp)
//   mla_decode, rms_norm, route, route_softmax
//   Layer: create, open, save, place, pack_expert_float, pack_expert_ct, pack_expert_gguf, unpack_expert,
//          expert_arrays, format, up_format, down_format, num_experts, hidden, intermediate, nbytes,
//          expert_nbytes, writable, path
//   MoE(layer, mode, threads, isa, caller): submit, sync, pending, isa, mode
// The test-only entry points (kernel probes, pool test jobs, fault injection) are in
// hybrid._native_testing (binding_testing.cpp).
