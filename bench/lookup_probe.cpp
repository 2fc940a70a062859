// lookup_probe.cpp: codebook lookups by gather instructions against scalar loads and inserts, the
// choice behind the lattice types' operands (csrc/core/simd_iq.h). Each loop looks up entries of
// a small table (in L1) at random indices read from an L1/L2-sized array and sums the words, so
// only the lookups are timed. Standalone, not part of the extension:
//
//   g++ -O2 -mavx2 -mavx512f -mavx512bw -mavx512vl bench/lookup_probe.cpp -o /tmp/lookup_probe
//   /tmp/lookup_probe          # ns per 8 (ymm) or 16 (zmm) lookups, best of 20
//
// On the 2-vCPU Zen 4 guest of 2026-12-07, gathered / scalar: 8 dwords 2.85 / 2.02 ns (1.41 with
// the indices taken from one 64-bit load), 8 qwords 3.24 / 1.69, 16 dwords (zmm) 5.75 / 3.50.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

alignas(64) static int grid32[2048];
alignas(64) static long long grid64[512];

static __m128i four(const uint16_t* p) {
  __m128i v = _mm_cvtsi32_si128(grid32[p[0] & 2047]);
  v = _mm_insert_epi32(v, grid32[p[1] & 2047], 1);
  v = _mm_insert_epi32(v, grid32[p[2] & 2047], 2);
  return _mm_insert_epi32(v, grid32[p[3] & 2047], 3);
}

__attribute__((noinline)) static int ymm_gather32(const uint16_t* idx, size_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (size_t i = 0; i < n; i += 8) {
    const __m256i id = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + i))),
                                        _mm256_set1_epi32(2047));
    acc = _mm256_add_epi32(acc, _mm256_i32gather_epi32(grid32, id, 4));
  }
  return _mm256_extract_epi32(acc, 0);
}

__attribute__((noinline)) static int ymm_scalar32(const uint16_t* idx, size_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (size_t i = 0; i < n; i += 8)
    acc = _mm256_add_epi32(acc, _mm256_set_m128i(four(idx + i + 4), four(idx + i)));
  return _mm256_extract_epi32(acc, 0);
}

__attribute__((noinline)) static int ymm_gather64(const uint16_t* idx, size_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (size_t i = 0; i < n; i += 8) {
    const __m256i id = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(idx + i))),
                                        _mm256_set1_epi32(511));
    const __m256i g0 = _mm256_i32gather_epi64(grid64, _mm256_castsi256_si128(id), 8);
    const __m256i g1 = _mm256_i32gather_epi64(grid64, _mm256_extracti128_si256(id, 1), 8);
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(g0, g1));
  }
  return _mm256_extract_epi32(acc, 0);
}

__attribute__((noinline)) static int ymm_scalar64(const uint16_t* idx, size_t n) {
  __m256i acc = _mm256_setzero_si256();
  for (size_t i = 0; i < n; i += 8) {
    const uint16_t* p = idx + i;
    const __m256i g0 = _mm256_set_epi64x(grid64[p[3] & 511], grid64[p[2] & 511], grid64[p[1] & 511], grid64[p[0] & 511]);
    const __m256i g1 = _mm256_set_epi64x(grid64[p[7] & 511], grid64[p[6] & 511], grid64[p[5] & 511], grid64[p[4] & 511]);
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(g0, g1));
  }
  return _mm256_extract_epi32(acc, 0);
}

__attribute__((noinline)) static int zmm_gather32(const uint16_t* idx, size_t n) {
  __m512i acc = _mm512_setzero_si512();
  for (size_t i = 0; i < n; i += 16) {
    const __m512i id = _mm512_and_si512(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(idx + i))),
                                        _mm512_set1_epi32(2047));
    acc = _mm512_add_epi32(acc, _mm512_i32gather_epi32(id, grid32, 4));
  }
  return _mm512_reduce_add_epi32(acc);
}

__attribute__((noinline)) static int zmm_scalar32(const uint16_t* idx, size_t n) {
  __m512i acc = _mm512_setzero_si512();
  for (size_t i = 0; i < n; i += 16) {
    __m512i v = _mm512_castsi128_si512(four(idx + i));
    v = _mm512_inserti32x4(v, four(idx + i + 4), 1);
    v = _mm512_inserti32x4(v, four(idx + i + 8), 2);
    v = _mm512_inserti32x4(v, four(idx + i + 12), 3);
    acc = _mm512_add_epi32(acc, v);
  }
  return _mm512_reduce_add_epi32(acc);
}

int main() {
  const size_t n = 1 << 14;
  std::vector<uint16_t> idx(n);
  std::mt19937 rng(1);
  for (auto& x : idx) x = uint16_t(rng());
  for (auto& g : grid32) g = int(rng());
  for (auto& g : grid64) g = (long long)rng() << 32 | rng();
  auto time = [&](int (*f)(const uint16_t*, size_t), int per, const char* name) {
    double best = 1e9;
    volatile int sink = 0;
    for (int rep = 0; rep < 20; ++rep) {
      const auto a = std::chrono::steady_clock::now();
      for (int k = 0; k < 100; ++k) sink = sink + f(idx.data(), n);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
    }
    std::printf("%-34s %.2f ns per %d lookups\n", name, best / 100 / double(n / per) * 1e9, per);
  };
  time(ymm_gather32, 8, "ymm: vpgatherdd of 8 dwords");
  time(ymm_scalar32, 8, "ymm: 8 scalar dword lookups");
  time(ymm_gather64, 8, "ymm: 2 vpgatherqq of 4 qwords");
  time(ymm_scalar64, 8, "ymm: 8 scalar qword lookups");
  time(zmm_gather32, 16, "zmm: vpgatherdd of 16 dwords");
  time(zmm_scalar32, 16, "zmm: 16 scalar dword lookups");
  return 0;
}
