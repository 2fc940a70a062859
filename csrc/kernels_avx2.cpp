// kernels_avx2.cpp: the avx2 kernels (see kernels.h). Being written; until then the getter
// returns nullptr and dispatch.cpp treats this ISA as not compiled in.
#include "kernels.h"

namespace hybrid {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace hybrid
