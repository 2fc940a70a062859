// tile_width.h: the token-tile width as a compile-time constant, for the SIMD kernel drivers
// (kernels_avx2.cpp, simd_avx512.h), and the dense GEMVs' tile walk built on it. with_tile_width<kMax>(tt, fn) calls
// fn(std::integral_constant<int, n>{}) with n = tt for 1 <= tt <= kMax (a larger tt is treated
// as kMax), so the always-inline tile bodies fn calls unroll fully for each width.
//
// In an anonymous namespace on purpose: every TU that includes this (each compiled with its own
// ISA flags) gets its own internal copies, never a COMDAT one shared across ISAs (see kernels.h).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifndef HY_ALWAYS_INLINE
#define HY_ALWAYS_INLINE inline __attribute__((always_inline))
#endif
// The same for a lambda a walker calls per step: `[&](...) HY_INLINE_LAMBDA { ... }`.
#define HY_INLINE_LAMBDA __attribute__((always_inline))

namespace hybrid {
namespace {

template <int kMax, class Fn>
HY_ALWAYS_INLINE void with_tile_width(int tt, Fn&& fn) {
  if constexpr (kMax > 1) {
    if (tt < kMax) return with_tile_width<kMax - 1>(tt, fn);
  }
  fn(std::integral_constant<int, kMax>{});
}

// The walk of the dense GEMVs (kernels_avx2.cpp, simd_avx512_gemv.h): rows [n0, n1) in tiles of
// kRows (1 row for each of the last n % kRows), each over token tiles of up to kTokens, calling
// tile(w row, x token, R, TT, out) with R and TT as std::integral_constant, so every tile body
// is compiled for its constant shape. Rows are the outer loop, so a row tile is read from memory
// once per call and from cache for the next token tiles.
template <int kRows, int kTokens, class W, class Tile>
HY_ALWAYS_INLINE void gemv_walk(const W* w, int64_t ldw, int64_t n0, int64_t n1, const uint16_t* x, int64_t t,
                                int64_t ldx, float* out, int64_t ldo, const Tile& tile) {
  for (int64_t n = n0; n < n1;) {
    const bool full = n1 - n >= kRows;
    const W* wr = w + n * ldw;
    for (int64_t t0 = 0; t0 < t; t0 += kTokens) {
      const uint16_t* xt = x + t0 * ldx;
      float* ot = out + t0 * ldo + (n - n0);
      with_tile_width<kTokens>(int(std::min<int64_t>(t - t0, kTokens)), [&](auto TT) HY_INLINE_LAMBDA {
        if (full) tile(wr, xt, std::integral_constant<int, kRows>{}, TT, ot);
        else tile(wr, xt, std::integral_constant<int, 1>{}, TT, ot);
      });
    }
    n += full ? kRows : 1;
  }
}

}  // namespace
}  // namespace hybrid
