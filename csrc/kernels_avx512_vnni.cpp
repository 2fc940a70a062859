// kernels_avx512_vnni.cpp: the avx512_vnni kernels (see kernels.h). Being written; until then the getter
// returns nullptr and dispatch.cpp treats this ISA as not compiled in.
#include "kernels.h"

namespace hybrid {
const KernelTable* kernels_avx512_vnni() { return nullptr; }
}  // namespace hybrid
