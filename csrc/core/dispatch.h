// dispatch.h: which CPU this is, which ISA paths it (and its OS) can run, and which KernelTable
// the operator uses. Detection runs once, on first use (never at library load).
#pragma once
#include <string>
#include <vector>

#include "core/kernels.h"

namespace hybrid {

struct CpuInfo {
  std::string brand;                // cpuid brand string, e.g. "Intel(R) Xeon(R) Platinum ..."
  std::vector<std::string> flags;   // CPU features that matter to us, e.g. "avx2", "amx_int8"
  bool os_avx = false;              // XCR0 has SSE + AVX state (xgetbv)
  bool os_avx512 = false;           // XCR0 has opmask + ZMM state
  bool os_amx = false;              // XCR0 has XTILECFG + XTILEDATA state
  bool amx_permitted = false;       // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) succeeded
  std::string amx_refusal;          // why AMX is unusable, "" when it is usable
};

// The ISA paths, lowest first. Index order is the fill order of kernels.h.
const std::vector<std::string>& isa_names();

const CpuInfo& cpu_info();

// Why `isa` cannot run here ("" when it can): unknown name, CPU lacks a feature, OS lacks the
// register state, AMX permission refused, or the table is not compiled into this build.
std::string isa_unavailable_reason(const std::string& isa);

// ISAs this CPU + OS + build can run, lowest first ("scalar" always).
std::vector<std::string> available_isas();

// The table for `isa` with null entries filled from lower runnable tables (kernels.h rule).
// Throws std::invalid_argument with the reason when the ISA cannot run here.
const KernelTable& resolved_table(const std::string& isa);

// The ISA the operator uses: HYBRID_ISA when set (throws with the reason if it cannot run),
// otherwise the best available one. Decided once per process.
const std::string& active_isa();
const KernelTable& active_table();

}  // namespace hybrid
