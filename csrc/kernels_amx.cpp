// kernels_amx.cpp: the amx kernels (see kernels.h). Being written; until then the getter
// returns nullptr and dispatch.cpp treats this ISA as not compiled in.
#include "kernels.h"

namespace hybrid {
const KernelTable* kernels_amx() { return nullptr; }
}  // namespace hybrid
