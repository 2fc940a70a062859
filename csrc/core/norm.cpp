// norm.cpp: see norm.h.
#include "core/norm.h"

#include <cmath>

#include "core/kernels.h"  // bf16 helpers

namespace hybrid {

void rms_norm_bf16(uint16_t* x, const uint16_t* residual, const uint16_t* w, int64_t t, int64_t h,
                   float eps, uint16_t* out) {
  for (int64_t i = 0; i < t; ++i) {
    uint16_t* xr = x + i * h;
    if (residual != nullptr)
      for (int64_t j = 0; j < h; ++j)
        xr[j] = f32_to_bf16(bf16_to_f32(xr[j]) + bf16_to_f32(residual[i * h + j]));
    float ss = 0.f;
    for (int64_t j = 0; j < h; ++j) {
      const float v = bf16_to_f32(xr[j]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(h) + eps);
    for (int64_t j = 0; j < h; ++j)
      out[i * h + j] = f32_to_bf16(bf16_to_f32(w[j]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * inv)));
  }
}

}  // namespace hybrid
