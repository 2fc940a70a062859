// check_kernels.cpp: standalone check of every per-ISA kernel table against a plain scalar
// reference written here from the layouts in kernels.h (independent of kernels_scalar.cpp).
// Not part of the extension: CMake builds it as the executable check_kernels from the same kernel
// objects (hybrid_kernels); tests/test_native_check_kernels.py builds and runs it. By hand:
//   cmake -S . -B build/check -G Ninja -DHYBRID_PYTHON=OFF && ninja -C build/check check_kernels
//   build/check/check_kernels [isa-name]
// Tables this CPU / OS cannot run are skipped with the reason dispatch.h gives.
//
// Tolerances: matmul_f32 / matmul_a8 differ from the reference only in fp32 summation order, so
// |out - ref| <= 1e-5 * sum_k |w_k * x_k| (+ tiny absolute); matmul_a16 rounds x to bf16, so
// |out - ref_f32| <= 2^-8 * sum_k |w_k * x_k|. quantize_row_a8 must match bit for bit.
// gemv_bf16 (unpacked bf16, exact products): |out - ref| <= K * 2^-24 * sum_k |w_k * x_k|.
// gemv_t_bf16 (fp32 x, bf16 W [K][N]): |out - ref| <= 1e-6 * (|s| + sum_i |x_i w_i|), see check_gemv_t.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "core/dispatch.h"
#include "core/kernels.h"

using namespace hybrid;

namespace {

std::mt19937_64 rng(1234);

float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

struct Mat {
  WeightFormat f;
  int n, k;
  std::vector<uint8_t> qw;
  std::vector<uint16_t> sc;
  std::vector<float> dense;  // [n][k] dequantised
  PackedMatrix view() const { return {f, n, k, qw.data(), sc.empty() ? nullptr : sc.data()}; }
};

Mat make_mat(WeightFormat f, int n, int k) {
  Mat m{f, n, k, std::vector<uint8_t>(packed_qweight_bytes(f, n, k)),
        std::vector<uint16_t>(packed_scale_bytes(f, n, k) / 2), std::vector<float>(size_t(n) * k)};
  std::uniform_int_distribution<int> i4(-8, 7), i8(-127, 127);
  std::uniform_real_distribution<float> us(0.001f, 0.02f), un(-1.f, 1.f);
  const int ng = k / 32;
  for (int r = 0; r < n; ++r) {
    const int b = r / 16, l = r % 16;
    for (int g = 0; g < ng && f != WeightFormat::BF16; ++g) {
      uint16_t s = f32_to_bf16(us(rng));
      m.sc[(size_t(b) * ng + g) * 16 + l] = s;
      for (int kk = 0; kk < 32; ++kk) {
        int q = f == WeightFormat::INT4_G32 ? i4(rng) : i8(rng);
        int k0 = g * 32 + kk;
        m.dense[size_t(r) * k + k0] = q * bf16_to_f32(s);
        if (f == WeightFormat::INT4_G32) {
          int c = kk / 8, j = kk % 8;
          uint8_t& byte = m.qw[((size_t(b) * ng + g) * 4 + c) * 64 + l * 4 + (j % 4)];
          byte |= uint8_t((q + 8) << (j < 4 ? 0 : 4));
        } else {
          int c = kk / 4, j = kk % 4;
          m.qw[((size_t(b) * ng + g) * 8 + c) * 64 + l * 4 + j] = uint8_t(q + 128);
        }
      }
    }
    if (f == WeightFormat::BF16) {
      uint16_t* p = reinterpret_cast<uint16_t*>(m.qw.data());
      for (int kk = 0; kk < k; ++kk) {
        uint16_t h = f32_to_bf16(un(rng) * 0.05f);
        m.dense[size_t(r) * k + kk] = bf16_to_f32(h);
        p[((size_t(b) * (k / 2) + kk / 2) * 16 + l) * 2 + kk % 2] = h;
      }
    }
  }
  return m;
}

// Reference quantisation (the contract's formula).
void ref_quantize(const float* x, int k, int8_t* q, float* s, int32_t* gs) {
  for (int g = 0; g < k / 32; ++g) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(x[g * 32 + i]));
    float sc = amax / 127.0f;
    s[g] = sc > 0 ? sc : 0;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      int v = sc > 0 ? int(std::nearbyintf(x[g * 32 + i] * (127.0f / amax))) : 0;
      v = v > 127 ? 127 : (v < -127 ? -127 : v);
      q[g * 32 + i] = int8_t(v);
      sum += v;
    }
    gs[g] = sum;
  }
}

int failures = 0;

void compare(const char* what, const char* isa, const Mat& m, int t, const std::vector<float>& out,
             const std::vector<double>& ref, const std::vector<double>& mag, double rel) {
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    double err = std::fabs(out[i] - ref[i]) / (mag[i] + 1e-30);
    if (!(err <= worst)) worst = err;  // NaN sticks
  }
  bool ok = worst <= rel;
  if (!ok) ++failures;
  std::printf("%-12s %-10s fmt=%d N=%-5d K=%-5d T=%-3d worst=%.3g (tol %.3g) %s\n", isa, what,
              int(m.f), m.n, m.k, t, worst, rel, ok ? "ok" : "FAIL");
}

void check_table(const KernelTable* kt) {
  if (!kt) return;
  const int shapes[][2] = {{48, 96}, {32, 7168}, {64, 2048}};
  const int ts[] = {1, 2, 3, 4, 5, 11, 16, 17, 64};
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& sh : shapes)
    for (WeightFormat f : {WeightFormat::INT4_G32, WeightFormat::INT8_G32, WeightFormat::BF16}) {
      Mat m = make_mat(f, sh[0], sh[1]);
      const int n = m.n, k = m.k, ng = k / 32, nb = n / 16;
      for (int t : ts) {
        if (k == 7168 && t > 17) continue;  // keep the big shape quick
        const int ldx = k + 7, ldo = n + 5;
        std::vector<float> x(size_t(t) * ldx);
        for (auto& v : x) v = nd(rng);
        // blocks [1, nb) when there are several, so b0 != 0 is exercised
        const int b0 = nb > 1 ? 1 : 0, b1 = nb;
        const int cols = (b1 - b0) * 16;
        std::vector<double> ref(size_t(t) * cols), mag(size_t(t) * cols), ref16(size_t(t) * cols),
            mag16(size_t(t) * cols);
        for (int tt = 0; tt < t; ++tt)
          for (int c = 0; c < cols; ++c) {
            const float* wr = &m.dense[size_t(b0 * 16 + c) * k];
            double s = 0, a = 0, s16 = 0;
            for (int kk = 0; kk < k; ++kk) {
              s += double(wr[kk]) * x[size_t(tt) * ldx + kk];
              a += std::fabs(double(wr[kk]) * x[size_t(tt) * ldx + kk]);
              s16 += double(wr[kk]) * bf16_round(x[size_t(tt) * ldx + kk]);
            }
            ref[size_t(tt) * cols + c] = s;
            mag[size_t(tt) * cols + c] = a + 1e-6;
            ref16[size_t(tt) * cols + c] = s16;
          }
        auto run_out = [&](std::vector<float>& o) { o.assign(size_t(t) * ldo, NAN); };
        auto pick = [&](const std::vector<float>& o) {
          std::vector<float> r(size_t(t) * cols);
          for (int tt = 0; tt < t; ++tt)
            for (int c = 0; c < cols; ++c) r[size_t(tt) * cols + c] = o[size_t(tt) * ldo + c];
          return r;
        };
        PackedMatrix pm = m.view();
        std::vector<float> o;
        if (kt->matmul_f32) {
          run_out(o);
          kt->matmul_f32(pm, b0, b1, x.data(), t, ldx, o.data(), ldo);
          compare("f32", kt->name, m, t, pick(o), ref, mag, 1e-5);
        }
        if (kt->matmul_a16 && f == WeightFormat::BF16) {
          run_out(o);
          kt->matmul_a16(pm, b0, b1, x.data(), t, ldx, o.data(), ldo);
          compare("a16", kt->name, m, t, pick(o), ref16, mag, 1e-5);
          compare("a16~f32", kt->name, m, t, pick(o), ref, mag, 1.0 / 256);
        }
        if (f == WeightFormat::BF16) continue;
        // int8 activations: reference quantisation, exact integer dot per group.
        const int ldq = k + 3;
        std::vector<int8_t> q(size_t(t) * ldq);
        std::vector<float> xs(size_t(t) * ng);
        std::vector<int32_t> gs(size_t(t) * ng);
        for (int tt = 0; tt < t; ++tt) {
          ref_quantize(&x[size_t(tt) * ldx], k, &q[size_t(tt) * ldq], &xs[size_t(tt) * ng],
                       &gs[size_t(tt) * ng]);
          if (kt->quantize_row_a8) {
            std::vector<int8_t> q2(k);
            std::vector<float> s2(ng);
            std::vector<int32_t> g2(ng);
            kt->quantize_row_a8(&x[size_t(tt) * ldx], k, q2.data(), s2.data(), g2.data());
            bool same = std::memcmp(q2.data(), &q[size_t(tt) * ldq], k) == 0 &&
                        std::memcmp(s2.data(), &xs[size_t(tt) * ng], ng * 4) == 0 &&
                        std::memcmp(g2.data(), &gs[size_t(tt) * ng], ng * 4) == 0;
            if (!same) {
              ++failures;
              std::printf("%-12s quantize_row_a8 K=%d token %d: MISMATCH\n", kt->name, k, tt);
            }
          }
        }
        if (!kt->matmul_a8) continue;
        for (int tt = 0; tt < t; ++tt)
          for (int c = 0; c < cols; ++c) {
            const int row = b0 * 16 + c;
            double s = 0, a = 0;
            for (int g = 0; g < ng; ++g) {
              long dot = 0, adot = 0;
              for (int kk = g * 32; kk < g * 32 + 32; ++kk) {
                float wsc = bf16_to_f32(m.sc[(size_t(row / 16) * ng + g) * 16 + row % 16]);
                long wq = std::lround(m.dense[size_t(row) * k + kk] / wsc);
                dot += wq * q[size_t(tt) * ldq + kk];
                adot += std::labs(wq * q[size_t(tt) * ldq + kk]);
              }
              double f = double(bf16_to_f32(m.sc[(size_t(row / 16) * ng + g) * 16 + row % 16])) *
                         xs[size_t(tt) * ng + g];
              s += f * dot;
              a += std::fabs(f) * adot;
            }
            ref[size_t(tt) * cols + c] = s;
            mag[size_t(tt) * cols + c] = a + 1e-6;
          }
        QuantizedActs qa{q.data(), xs.data(), gs.data(), t, k, ldq};
        run_out(o);
        kt->matmul_a8(pm, b0, b1, qa, o.data(), ldo);
        compare("a8", kt->name, m, t, pick(o), ref, mag, 1e-5);
      }
    }
}

// gemv_bf16 on unpacked row-major bf16 with strided rows, a row range that starts past row 0
// and K tails of every width; out is filled with NaN first so unwritten entries show.
void check_gemv(const KernelTable* kt) {
  if (!kt || !kt->gemv_bf16) return;
  std::normal_distribution<float> nd(0.f, 1.f);
  const int shapes[][2] = {{21, 1}, {9, 31}, {37, 33}, {64, 100}, {19, 2048}, {8, 7168}};
  const int ts[] = {1, 2, 3, 4, 5, 9};
  for (auto& sh : shapes)
    for (int t : ts) {
      const int n = sh[0], k = sh[1], ldw = k + 3, ldx = k + 5, n0 = 2, n1 = n, cols = n1 - n0, ldo = cols + 1;
      std::vector<uint16_t> w(size_t(n) * ldw), x(size_t(t) * ldx);
      for (auto& v : w) v = f32_to_bf16(nd(rng));
      for (auto& v : x) v = f32_to_bf16(nd(rng));
      std::vector<float> out(size_t(t) * ldo, NAN), got(size_t(t) * cols);
      std::vector<double> ref(size_t(t) * cols), mag(size_t(t) * cols);
      kt->gemv_bf16(w.data(), ldw, n0, n1, k, x.data(), t, ldx, out.data(), ldo);
      for (int tt = 0; tt < t; ++tt)
        for (int c = 0; c < cols; ++c) {
          double s = 0, a = 0;
          for (int i = 0; i < k; ++i) {
            double p = double(bf16_to_f32(w[size_t(n0 + c) * ldw + i])) * bf16_to_f32(x[size_t(tt) * ldx + i]);
            s += p;
            a += std::fabs(p);
          }
          ref[size_t(tt) * cols + c] = s;
          mag[size_t(tt) * cols + c] = a + 1e-30;
          got[size_t(tt) * cols + c] = out[size_t(tt) * ldo + c];
        }
      Mat shape{WeightFormat::BF16, cols, k, {}, {}, {}};
      compare("gemv_bf16", kt->name, shape, t, got, ref, mag, k * std::ldexp(1.0, -24));
    }
}

// gemv_t_bf16 ([K][N] bf16 used transposed, fp32 x) with strided rows, a column range off every
// multiple of 8 and 16, 1..9 tokens, overwrite (out pre-filled with NaN: never read) and
// accumulate (sums start from the old out). Tolerance 1e-6 of |s| + sum |x w|: the same FMA
// steps in the same order as the sequential sum, only rounding differs (tests/test_native_gemv_t.py).
void check_gemv_t(const KernelTable* kt) {
  if (!kt || !kt->gemv_t_bf16) return;
  std::normal_distribution<float> nd(0.f, 1.f);
  const int shapes[][2] = {{1, 17}, {31, 100}, {100, 64}, {1000, 512}, {40, 15}};  // {K, N}
  for (auto& sh : shapes)
    for (int t : {1, 3, 4, 6, 9})
      for (bool acc : {false, true}) {
        const int k = sh[0], n = sh[1], ldw = n + 11, ldx = k + 3, n0 = n > 4 ? 3 : 0, n1 = n > 4 ? n - 1 : n;
        const int cols = n1 - n0, ldo = cols + 2;
        std::vector<uint16_t> w(size_t(k) * ldw);
        std::vector<float> x(size_t(t) * ldx), out(size_t(t) * ldo), got(size_t(t) * cols);
        for (auto& v : w) v = f32_to_bf16(nd(rng));
        for (auto& v : x) v = nd(rng);
        for (auto& v : out) v = acc ? nd(rng) : NAN;
        std::vector<double> ref(size_t(t) * cols), mag(size_t(t) * cols);
        for (int tt = 0; tt < t; ++tt)
          for (int c = 0; c < cols; ++c) {
            double s0 = acc ? out[size_t(tt) * ldo + c] : 0, s = s0, a = std::fabs(s0);
            for (int i = 0; i < k; ++i) {
              double p = double(x[size_t(tt) * ldx + i]) * bf16_to_f32(w[size_t(i) * ldw + n0 + c]);
              s += p;
              a += std::fabs(p);
            }
            ref[size_t(tt) * cols + c] = s;
            mag[size_t(tt) * cols + c] = a;
          }
        kt->gemv_t_bf16(w.data(), ldw, k, n0, n1, x.data(), t, ldx, out.data(), ldo, acc);
        for (int tt = 0; tt < t; ++tt)
          for (int c = 0; c < cols; ++c) got[size_t(tt) * cols + c] = out[size_t(tt) * ldo + c];
        Mat shape{WeightFormat::BF16, cols, k, {}, {}, {}};
        compare(acc ? "gemv_t+=" : "gemv_t", kt->name, shape, t, got, ref, mag, 1e-6);
      }
}

}  // namespace

int main(int argc, char** argv) {
  const KernelTable* tables[] = {kernels_avx2(), kernels_avx512(), kernels_avx512_vnni(), kernels_avx512_bf16(),
                                 kernels_amx()};
  int checked = 0;
  for (const KernelTable* kt : tables) {
    if (kt == nullptr || (argc > 1 && std::strcmp(argv[1], kt->name) != 0)) continue;
    const std::string why = isa_unavailable_reason(kt->name);
    if (!why.empty()) {
      std::printf("%s: not checked (%s)\n", kt->name, why.c_str());
      continue;
    }
    check_table(kt);
    check_gemv(kt);
    check_gemv_t(kt);
    std::printf("%s: checked\n", kt->name);
    ++checked;
  }
  std::printf("%s: %d table(s) checked, %d failure(s)\n", failures ? "FAILED" : "PASSED", checked, failures);
  return failures ? 1 : 0;
}
