// tile_width.h: the token-tile width as a compile-time constant, for the SIMD kernel drivers
// (kernels_avx2.cpp, simd_avx512.h). with_tile_width<kMax>(tt, fn) calls
// fn(std::integral_constant<int, n>{}) with n = tt for 1 <= tt <= kMax (a larger tt is treated
// as kMax), so the always-inline tile bodies fn calls unroll fully for each width.
//
// In an anonymous namespace on purpose: every TU that includes this (each compiled with its own
// ISA flags) gets its own internal copies, never a COMDAT one shared across ISAs (see kernels.h).
#pragma once
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

}  // namespace
}  // namespace hybrid
