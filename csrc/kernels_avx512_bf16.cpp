// kernels_avx512_bf16.cpp: the avx512_bf16 kernels (see kernels.h). Being written; until then the getter
// returns nullptr and dispatch.cpp treats this ISA as not compiled in.
#include "kernels.h"

namespace hybrid {
const KernelTable* kernels_avx512_bf16() { return nullptr; }
}  // namespace hybrid
