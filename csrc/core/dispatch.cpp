// dispatch.cpp: CPU feature detection (cpuid + xgetbv + the AMX arch_prctl permission) and the
// choice of KernelTable. Everything is computed lazily on first use and then cached.
#include "core/dispatch.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

namespace hybrid {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM (asm/prctl.h, Linux 5.16+)
constexpr long kXfeatureXtiledata = 18;     // XFEATURE_XTILEDATA

struct Regs { unsigned a = 0, b = 0, c = 0, d = 0; };

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

uint64_t xgetbv0() {  // inline asm: the _xgetbv intrinsic would need -mxsave on this baseline TU
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }

CpuInfo detect() {
  CpuInfo info;
  unsigned max_leaf = cpuid(0, 0).a;
  Regs l1 = max_leaf >= 1 ? cpuid(1, 0) : Regs{};
  Regs l7 = max_leaf >= 7 ? cpuid(7, 0) : Regs{};
  Regs l71 = (max_leaf >= 7 && l7.a >= 1) ? cpuid(7, 1) : Regs{};

  std::map<std::string, bool> f = {
      {"sse2", bit(l1.d, 26)},         {"fma", bit(l1.c, 12)},
      {"avx", bit(l1.c, 28)},          {"f16c", bit(l1.c, 29)},
      {"avx2", bit(l7.b, 5)},          {"avx512f", bit(l7.b, 16)},
      {"avx512dq", bit(l7.b, 17)},     {"avx512bw", bit(l7.b, 30)},
      {"avx512vl", bit(l7.b, 31)},     {"avx512_vnni", bit(l7.c, 11)},
      {"avx512_bf16", bit(l71.a, 5)},  {"avx512_fp16", bit(l7.d, 23)},
      {"avx512_vbmi", bit(l7.c, 1)},
      {"avx_vnni", bit(l71.a, 4)},     {"amx_bf16", bit(l7.d, 22)},
      {"amx_tile", bit(l7.d, 24)},     {"amx_int8", bit(l7.d, 25)},
  };
  for (auto& [name, has] : f)
    if (has) info.flags.push_back(name);

  if (bit(l1.c, 27)) {  // OSXSAVE: xgetbv is usable
    uint64_t xcr0 = xgetbv0();
    info.os_avx = (xcr0 & 0x6) == 0x6;                    // SSE + AVX state
    info.os_avx512 = info.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
    info.os_amx = ((xcr0 >> 17) & 3) == 3;                 // XTILECFG + XTILEDATA
  }

  if (!(f["amx_tile"] && f["amx_int8"] && f["amx_bf16"])) {
    info.amx_refusal = "CPU lacks AMX (amx_tile/amx_int8/amx_bf16)";
  } else if (!info.os_amx) {
    info.amx_refusal = "OS does not enable AMX tile state (XCR0 bits 17/18)";
  } else if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    info.amx_refusal = std::string("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused: ") +
                       std::strerror(errno);
  } else {
    info.amx_permitted = true;
  }

  char brand[49] = {0};
  if (cpuid(0x80000000u, 0).a >= 0x80000004u) {
    for (unsigned i = 0; i < 3; ++i) {
      Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i, &r, 16);
    }
  }
  std::string b(brand);
  size_t s = b.find_first_not_of(' ');
  info.brand = s == std::string::npos ? "unknown x86-64 CPU" : b.substr(s);
  return info;
}

bool has(const CpuInfo& c, const char* flag) {
  for (auto& f : c.flags)
    if (f == flag) return true;
  return false;
}

const KernelTable* compiled_table(size_t index) {
  switch (index) {
    case 0: return kernels_scalar();
    case 1: return kernels_avx2();
    case 2: return kernels_avx512();
    case 3: return kernels_avx512_vnni();
    case 4: return kernels_avx512_bf16();
    case 5: return kernels_amx();
  }
  return nullptr;
}

// What the CPU/OS must have for ISA `index` (ignoring whether the table is compiled in).
std::string cpu_reason(size_t index) {
  const CpuInfo& c = cpu_info();
  auto need = [&](std::initializer_list<const char*> flags) -> std::string {
    for (const char* fl : flags)
      if (!has(c, fl)) return std::string("CPU lacks ") + fl;
    return "";
  };
  std::string r;
  if (index >= 1) {
    if (!(r = need({"avx2", "fma", "f16c"})).empty()) return r;
    if (!c.os_avx) return "OS does not enable AVX register state (XCR0)";
  }
  if (index >= 2) {
    if (!(r = need({"avx512f", "avx512bw", "avx512vl", "avx512dq"})).empty()) return r;
    if (!c.os_avx512) return "OS does not enable AVX-512 register state (XCR0)";
  }
  if (index >= 3 && !(r = need({"avx512_vnni"})).empty()) return r;
  // avx512_bf16 also needs VBMI (its lattice-type permutes, simd_iq.h): Zen 4 and Sapphire Rapids
  // have both; Cooper Lake (BF16 without VBMI) runs the avx512_vnni table.
  if (index >= 4 && !(r = need({"avx512_bf16", "avx512_vbmi"})).empty()) return r;
  if (index >= 5 && !c.amx_permitted) return c.amx_refusal;
  return "";
}

long isa_index(const std::string& isa) {
  const auto& names = isa_names();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == isa) return long(i);
  return -1;
}

}  // namespace

const std::vector<std::string>& isa_names() {
  static const std::vector<std::string> names = {"scalar",      "avx2",        "avx512",
                                                 "avx512_vnni", "avx512_bf16", "amx"};
  return names;
}

const CpuInfo& cpu_info() {
  static const CpuInfo info = detect();
  return info;
}

std::string isa_unavailable_reason(const std::string& isa) {
  long i = isa_index(isa);
  if (i < 0) {
    std::string all;
    for (auto& n : isa_names()) all += (all.empty() ? "" : "|") + n;
    return "unknown ISA '" + isa + "' (expected " + all + ")";
  }
  std::string r = cpu_reason(size_t(i));
  if (!r.empty()) return r;
  if (compiled_table(size_t(i)) == nullptr) return "its kernels are not compiled into this build";
  return "";
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (auto& n : isa_names())
    if (isa_unavailable_reason(n).empty()) out.push_back(n);
  return out;
}

const KernelTable& resolved_table(const std::string& isa) {
  static std::mutex mu;
  static std::map<std::string, KernelTable> cache;
  std::string why = isa_unavailable_reason(isa);
  if (!why.empty()) throw std::invalid_argument("ISA '" + isa + "' cannot run here: " + why);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(isa);
  if (it != cache.end()) return it->second;
  long top = isa_index(isa);
  KernelTable t = *compiled_table(size_t(top));
  // Fill null entries from the next lower table this machine can run (kernels.h). matmul_a16
  // has no scalar entry, so it stays null unless some table at or below `isa` provides it.
  for (long i = top - 1; i >= 0; --i) {
    const KernelTable* lower = compiled_table(size_t(i));
    if (lower == nullptr || !cpu_reason(size_t(i)).empty()) continue;
    if (!t.quantize_row_a8) t.quantize_row_a8 = lower->quantize_row_a8;
    if (!t.matmul_a8) t.matmul_a8 = lower->matmul_a8;
    if (!t.matmul_f32) t.matmul_f32 = lower->matmul_f32;
    if (!t.matmul_a16) t.matmul_a16 = lower->matmul_a16;
    if (!t.gemv_bf16) t.gemv_bf16 = lower->gemv_bf16;
    if (!t.gemv_t_bf16) t.gemv_t_bf16 = lower->gemv_t_bf16;
    if (!t.gemv_i8) t.gemv_i8 = lower->gemv_i8;
  }
  if (!t.quantize_row_a8 || !t.matmul_a8 || !t.matmul_f32 || !t.gemv_bf16 || !t.gemv_t_bf16 || !t.gemv_i8)
    throw std::logic_error("kernel table '" + isa + "' is incomplete after filling");
  return cache.emplace(isa, t).first->second;
}

const std::string& active_isa() {
  static std::mutex mu;
  static std::string chosen;
  std::lock_guard<std::mutex> lock(mu);
  if (!chosen.empty()) return chosen;
  const char* env = std::getenv("HYBRID_ISA");
  if (env != nullptr && *env != '\0') {
    std::string why = isa_unavailable_reason(env);
    if (!why.empty())
      throw std::invalid_argument(std::string("HYBRID_ISA=") + env + " cannot run here: " + why);
    chosen = env;
  } else {
    chosen = available_isas().back();
  }
  return chosen;
}

const KernelTable& active_table() { return resolved_table(active_isa()); }

}  // namespace hybrid
