// binding_dense.h: bind_dense registers binding_dense.cpp's functions (the dense GEMVs and the
// packed-weight linear) on hybrid._native's module.
#pragma once
#include <pybind11/pybind11.h>

namespace hybrid {

void bind_dense(pybind11::module_& m);

}  // namespace hybrid
