// peak_probe.cpp: the two ceilings bench/moe_layer.py compares the kernels with, measured with
// the widest instructions the kernels use: peak int8 throughput of the instruction each GEMM path
// is built on, and RAM read bandwidth with 64-byte (zmm) or 32-byte (ymm) loads. Built by that
// script with the system C++ compiler into a temporary shared library (ctypes); not part of the
// extension.
//
// Each probe runs `iters` iterations of a loop of independent accumulations (enough chains to
// cover the instruction's latency) on the calling thread and returns the int8 operations done
// (2 per multiply-add); the caller times it. Data stays in registers / tiles: this is the compute
// ceiling, not a memory figure.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

extern "C" {

// vpdpbusd zmm: 16 lanes x 4 u8*s8 products. 12 independent chains (latency 5, up to 2 per cycle).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) double peak_vpdpbusd(int64_t iters) {
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
          c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_dpbusd_epi32(c0, a, b); c1 = _mm512_dpbusd_epi32(c1, a, b);
    c2 = _mm512_dpbusd_epi32(c2, a, b); c3 = _mm512_dpbusd_epi32(c3, a, b);
    c4 = _mm512_dpbusd_epi32(c4, a, b); c5 = _mm512_dpbusd_epi32(c5, a, b);
    c6 = _mm512_dpbusd_epi32(c6, a, b); c7 = _mm512_dpbusd_epi32(c7, a, b);
    c8 = _mm512_dpbusd_epi32(c8, a, b); c9 = _mm512_dpbusd_epi32(c9, a, b);
    c10 = _mm512_dpbusd_epi32(c10, a, b); c11 = _mm512_dpbusd_epi32(c11, a, b);
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5));
    __asm__ volatile("" : "+v"(c6), "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
  }
  volatile int32_t sink = _mm512_reduce_add_epi32(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                       _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7))));
  (void)sink;
  return double(iters) * 12 * 64 * 2;
}

// vpmaddubsw + vpmaddwd + vpaddd (zmm): the int8 step of the avx512 path without VNNI.
__attribute__((target("avx512f,avx512bw"))) double peak_vpmaddubsw512(int64_t iters) {
  // Six different u8 operands (opaque to the compiler) so the six products are not merged.
  __m512i a0 = _mm512_set1_epi8(3), a1 = _mm512_set1_epi8(4), a2 = _mm512_set1_epi8(5), a3 = _mm512_set1_epi8(6),
          a4 = _mm512_set1_epi8(7), a5 = _mm512_set1_epi8(8), b = _mm512_set1_epi8(-2), one = _mm512_set1_epi16(1);
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_add_epi32(c0, _mm512_madd_epi16(_mm512_maddubs_epi16(a0, b), one));
    c1 = _mm512_add_epi32(c1, _mm512_madd_epi16(_mm512_maddubs_epi16(a1, b), one));
    c2 = _mm512_add_epi32(c2, _mm512_madd_epi16(_mm512_maddubs_epi16(a2, b), one));
    c3 = _mm512_add_epi32(c3, _mm512_madd_epi16(_mm512_maddubs_epi16(a3, b), one));
    c4 = _mm512_add_epi32(c4, _mm512_madd_epi16(_mm512_maddubs_epi16(a4, b), one));
    c5 = _mm512_add_epi32(c5, _mm512_madd_epi16(_mm512_maddubs_epi16(a5, b), one));
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5));
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5));
  }
  volatile int32_t sink = _mm512_reduce_add_epi32(
      _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(_mm512_add_epi32(c2, c3), _mm512_add_epi32(c4, c5))));
  (void)sink;
  return double(iters) * 6 * 64 * 2;
}

// The same with ymm (the avx2 path).
__attribute__((target("avx2"))) double peak_vpmaddubsw256(int64_t iters) {
  // Six different u8 operands (opaque to the compiler) so the six products are not merged.
  __m256i a0 = _mm256_set1_epi8(3), a1 = _mm256_set1_epi8(4), a2 = _mm256_set1_epi8(5), a3 = _mm256_set1_epi8(6),
          a4 = _mm256_set1_epi8(7), a5 = _mm256_set1_epi8(8), b = _mm256_set1_epi8(-2), one = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a0, b), one));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a1, b), one));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(a2, b), one));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(a3, b), one));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_maddubs_epi16(a4, b), one));
    c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(_mm256_maddubs_epi16(a5, b), one));
    __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
    __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5));
  }
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(_mm256_add_epi32(c2, c3), _mm256_add_epi32(c4, c5)));
  volatile int32_t sink = _mm256_extract_epi32(s, 0);
  (void)sink;
  return double(iters) * 6 * 32 * 2;
}

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tdpbssd on full 16 x 64 tiles, 4 independent accumulators (tmm4-7). Returns -1 when the OS
// refuses the tile-data permission.
__attribute__((target("amx-tile,amx-int8"))) double peak_tdpbssd(int64_t iters) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return -1;
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) int8_t buf[16 * 64];
  std::memset(buf, 1, sizeof(buf));
  _tile_loadd(0, buf, 64);
  _tile_loadd(1, buf, 64);
  _tile_loadd(2, buf, 64);
  _tile_loadd(3, buf, 64);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 0, 3);
    _tile_dpbssd(6, 1, 2);
    _tile_dpbssd(7, 1, 3);
  }
  alignas(64) int32_t out[16 * 16];
  _tile_stored(4, out, 64);
  _tile_release();
  volatile int32_t sink = out[0];
  (void)sink;
  return double(iters) * 4 * 16 * 16 * 64 * 2;
}

// ---- read bandwidth ---------------------------------------------------------------------------
// Same page policy as the extension's packed layers: 2 MiB aligned, MADV_HUGEPAGE, first touch by
// the thread that reads the slice. Four independent 64-byte loads per iteration.

__attribute__((target("avx512f"))) static uint64_t read_zmm(const uint8_t* p, size_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
  }
  return uint64_t(_mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3))));
}

__attribute__((target("avx2"))) static uint64_t read_ymm(const uint8_t* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_xor_si256(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_xor_si256(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_xor_si256(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  __m256i x = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  return uint64_t(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 3));
}

// Median GB/s (1e9 bytes/s) of `repeats` reads of `bytes` split over `threads` threads; -1 when
// the buffer cannot be allocated.
double read_bandwidth_simd(int64_t bytes, int threads, int repeats) {
  const size_t huge = size_t(2) << 20;
  const size_t slice = (size_t(bytes) / size_t(threads)) / huge * huge;
  const size_t total = slice * size_t(threads);
  void* raw = mmap(nullptr, total + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED || slice == 0) return -1;
  uint8_t* buf = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + huge - 1) / huge * huge);
  madvise(buf, total, MADV_HUGEPAGE);
  const bool zmm = __builtin_cpu_supports("avx512f");
  std::vector<double> runs;
  volatile uint64_t sink = 0;
  for (int r = -1; r < repeats; ++r) {  // r = -1: first touch (untimed)
    std::vector<std::thread> team;
    std::vector<uint64_t> sums(size_t(threads), 0);
    auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t)
      team.emplace_back([&, t] {
        uint8_t* p = buf + size_t(t) * slice;
        if (r < 0) std::memset(p, t + 1, slice);
        else sums[size_t(t)] = zmm ? read_zmm(p, slice) : read_ymm(p, slice);
      });
    for (auto& th : team) th.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r >= 0) runs.push_back(double(total) / s / 1e9);
    for (uint64_t v : sums) sink = sink + v;
  }
  munmap(raw, total + huge);
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

}  // extern "C"
