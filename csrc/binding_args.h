// binding_args.h: checked views of the Python arguments of the native calls, for the two binding
// files (binding.cpp, binding_testing.cpp; the bindings themselves stay in those). numpy arrays: dtype,
// layout and writability checks; torch tensors: dtype / device / shape / strides / data pointer
// read through the raw Python C API with interned attribute names, ~0.5 us per tensor where
// pybind11's o.attr() reads cost ~1.5 us and a torch -> numpy view ~2 us (the decode path passes
// ~40 tensors per layer). Every check raises a Python TypeError / ValueError naming the argument.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/dispatch.h"
#include "core/kernels.h"
#include "core/moe.h"
#include "core/pack.h"

namespace hybrid {
namespace py = pybind11;

// ---- argument checks -------------------------------------------------------------------------

inline std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

inline std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + (d[i] < 0 ? std::string("*") : std::to_string(d[i]));
  return s + "]";
}

// Equality, not identity: numpy dtypes equal to a builtin one need not be that object (gguf's
// reader hands out uint8 views whose dtype went through newbyteorder('<'), equal to uint8 but not
// the same object); a byte-swapped multi-byte dtype is not equal, so it is still refused.
template <class T>
inline bool is_dtype(const py::array& a) { return a.dtype().equal(py::dtype::of<T>()); }

inline std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// The object must be a numpy array (no silent conversion: outputs must be the caller's buffer
// and inputs must not be copied behind the caller's back).
inline py::array as_array(const py::object& o, const char* name) {
  if (!py::isinstance<py::array>(o))
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         py::str(py::type::of(o)).cast<std::string>());
  return py::reinterpret_borrow<py::array>(o);
}

// ndim + shape (-1 = any) + C-contiguity (+ writability).
inline void check_layout(const py::array& a, const char* name, const std::vector<int64_t>& dims, bool writable = false) {
  if (a.ndim() != py::ssize_t(dims.size()))
    throw py::value_error(std::string(name) + " must have " + std::to_string(dims.size()) +
                          " dimensions " + dims_str(dims) + ", got shape " + shape_str(a));
  for (size_t i = 0; i < dims.size(); ++i)
    if (dims[i] >= 0 && a.shape(py::ssize_t(i)) != dims[i])
      throw py::value_error(std::string(name) + " must have shape " + dims_str(dims) + ", got " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) {
    std::string st = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) st += (i ? ", " : "") + std::to_string(a.strides(i));
    throw py::value_error(std::string(name) + " must be C-contiguous, got strides " + st +
                          ") bytes for shape " + shape_str(a));
  }
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

[[noreturn]] inline void bad_dtype(const py::array& a, const char* name, const char* want) {
  throw py::type_error(std::string(name) + " must have dtype " + want + ", got " + dtype_name(a));
}

// float32, or uint16 holding bf16 bits.
inline SrcDtype float_kind(const py::array& a, const char* name) {
  if (is_dtype<float>(a)) return SrcDtype::F32;
  if (is_dtype<uint16_t>(a)) return SrcDtype::BF16;
  bad_dtype(a, name, "float32 or bf16 (passed as uint16 bit patterns)");
}

// The formats' names in Python (hybrid.experts.cpu_moe.FORMATS); the GGUF ones are ggml's type
// names in lower case.
inline std::string format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::INT4_G32: return "int4";
    case WeightFormat::INT8_G32: return "int8";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::Q4_0: return "q4_0";
    case WeightFormat::Q8_0: return "q8_0";
    case WeightFormat::Q4_K: return "q4_k";
    case WeightFormat::Q5_K: return "q5_k";
    case WeightFormat::Q6_K: return "q6_k";
    case WeightFormat::Q3_K: return "q3_k";
    case WeightFormat::Q2_K: return "q2_k";
    case WeightFormat::IQ4_XS: return "iq4_xs";
    case WeightFormat::IQ2_XXS: return "iq2_xxs";
    case WeightFormat::IQ2_XS: return "iq2_xs";
    case WeightFormat::IQ3_XXS: return "iq3_xxs";
    case WeightFormat::IQ1_S: return "iq1_s";
    case WeightFormat::IQ1_M: return "iq1_m";
  }
  return "?";
}
inline WeightFormat parse_format(const std::string& s, const char* what = "format") {
  std::string all;
  for (int i = 0; i < kNumWeightFormats; ++i) {
    if (format_name(WeightFormat(i)) == s) return WeightFormat(i);
    all += (i ? ", '" : "'") + format_name(WeightFormat(i)) + "'";
  }
  throw py::value_error(std::string(what) + " must be one of " + all + ", got '" + s + "'");
}

inline void check_matrix_dims(int64_t n, int64_t k, const char* what, WeightFormat f = WeightFormat::INT4_G32) {
  if (n <= 0 || n % kRowBlock != 0)
    throw py::value_error(std::string(what) + ": rows (N) must be a positive multiple of 16, got " + std::to_string(n));
  const int64_t km = k_multiple(f);
  if (k <= 0 || k % km != 0)
    throw py::value_error(std::string(what) + ": inputs (K) must be a positive multiple of " + std::to_string(km) +
                          (km == kGroup ? "" : " for " + format_name(f)) + ", got " + std::to_string(k));
}

// A packed matrix from (qweight, scales) arrays with the exact byte sizes of kernels.h.
inline PackedMatrix packed_from_arrays(WeightFormat f, const py::object& qo, const py::object& so, int64_t n, int64_t k) {
  check_matrix_dims(n, k, "packed matrix", f);
  py::array q = as_array(qo, "qweight");
  if (!is_dtype<uint8_t>(q)) bad_dtype(q, "qweight", "uint8");
  check_layout(q, "qweight", {int64_t(packed_qweight_bytes(f, n, k))});
  PackedMatrix m{f, n, k, static_cast<const uint8_t*>(q.data()), nullptr};
  if (packed_scale_bytes(f, n, k) > 0) {
    if (so.is_none()) throw py::value_error("scales are required for format " + format_name(f));
    py::array s = as_array(so, "scales");
    if (!is_dtype<uint16_t>(s)) bad_dtype(s, "scales", "uint16 (bf16 bits)");
    check_layout(s, "scales", {int64_t(packed_scale_bytes(f, n, k) / 2)});
    m.scales = static_cast<const uint16_t*>(s.data());
  }
  return m;
}

inline std::pair<int64_t, int64_t> block_range(int64_t n, int64_t b0, int64_t b1) {
  int64_t nb = n / kRowBlock;
  if (b1 < 0) b1 = nb;
  if (b0 < 0 || b0 >= b1 || b1 > nb)
    throw py::value_error("block range [b0, b1) = [" + std::to_string(b0) + ", " + std::to_string(b1) +
                          ") must satisfy 0 <= b0 < b1 <= N/16 = " + std::to_string(nb));
  return {b0, b1};
}

// ---- torch tensors ------------------------------------------------------------------------

// torch objects, looked up once under the GIL (not a function-local static: its init guard
// would be held across an import that may release the GIL). Leaked on purpose (exit order).
struct TorchRefs {
  PyObject* tensor = nullptr;  // torch.Tensor
  PyObject* bf16 = nullptr;    // torch.bfloat16
  PyObject* f32 = nullptr;     // torch.float32
  PyObject* empty = nullptr;   // torch.empty
  PyObject* i64 = nullptr;     // torch.int64
  PyObject* i32 = nullptr;     // torch.int32
  PyObject* i8 = nullptr;      // torch.int8
  PyObject* u8 = nullptr;      // torch.uint8
  PyObject* i16 = nullptr;     // torch.int16
};
inline const TorchRefs& torch_refs() {
  static TorchRefs refs;
  if (refs.empty == nullptr) {
    py::object torch = py::module_::import("torch");
    auto leak = [&](const char* attr) { return py::object(torch.attr(attr)).release().ptr(); };
    TorchRefs r{leak("Tensor"), leak("bfloat16"), leak("float32"), leak("empty"), leak("int64"), leak("int32"),
                leak("int8"), leak("uint8"), leak("int16")};
    refs = r;
  }
  return refs;
}

// Attribute names interned once; the raw C API below costs ~0.5 us per tensor where the same
// reads through pybind11's o.attr("...") (a fresh string per lookup, casters) cost ~1.5 us.
struct TensorAttrNames {
  PyObject *dtype, *is_cpu, *device, *shape, *stride, *data_ptr, *is_contiguous;
};
inline const TensorAttrNames& tensor_attr_names() {
  static const TensorAttrNames n{PyUnicode_InternFromString("dtype"), PyUnicode_InternFromString("is_cpu"),
                                 PyUnicode_InternFromString("device"), PyUnicode_InternFromString("shape"),
                                 PyUnicode_InternFromString("stride"), PyUnicode_InternFromString("data_ptr"),
                                 PyUnicode_InternFromString("is_contiguous")};
  return n;
}

// New reference or the pending Python error as an exception.
inline py::object checked(PyObject* p) {
  if (p == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(p);
}

// Two ints of a tuple (torch.Size, stride()).
inline std::pair<int64_t, int64_t> int_pair(const py::object& t) {
  const int64_t a = PyLong_AsLongLong(PyTuple_GET_ITEM(t.ptr(), 0)), b = PyLong_AsLongLong(PyTuple_GET_ITEM(t.ptr(), 1));
  if (PyErr_Occurred()) throw py::error_already_set();
  return {a, b};
}

// The dtype of `o` after checking that it is a torch.Tensor on the CPU.
inline py::object cpu_tensor_dtype(const py::object& o, const char* name) {
  const TorchRefs& tr = torch_refs();
  const TensorAttrNames& an = tensor_attr_names();
  PyObject* ob = o.ptr();
  if (!PyObject_TypeCheck(ob, reinterpret_cast<PyTypeObject*>(tr.tensor)))
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " + py::str(py::type::of(o)).cast<std::string>());
  py::object dt = checked(PyObject_GetAttr(ob, an.dtype));
  if (checked(PyObject_GetAttr(ob, an.is_cpu)).ptr() != Py_True)
    throw py::type_error(std::string(name) + " must be a CPU tensor, got one on " +
                         py::str(checked(PyObject_GetAttr(ob, an.device))).cast<std::string>());
  return dt;
}

// A torch CPU tensor as raw memory, checked: its type, dtype, device, dimensions and that it is
// contiguous (every operand here is).
struct TensorView {
  char* data = nullptr;
  std::vector<int64_t> shape;
};

inline TensorView tensor_view(const py::object& o, const char* name, PyObject* dtype, const char* dtype_name, size_t ndim) {
  // The raw C API with interned names (as dense_from_torch): ~0.5 us per tensor, where pybind11's
  // o.attr() reads cost ~1.5 us; mla_decode takes ten tensors per layer per decode step.
  const TensorAttrNames& an = tensor_attr_names();
  PyObject* ob = o.ptr();
  py::object dt = cpu_tensor_dtype(o, name);
  if (dt.ptr() != dtype)
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " + py::str(dt).cast<std::string>());
  py::object shape = checked(PyObject_GetAttr(ob, an.shape));
  if (!PyTuple_Check(shape.ptr()) || size_t(PyTuple_GET_SIZE(shape.ptr())) != ndim)
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                          py::str(shape).cast<std::string>());
  if (checked(PyObject_CallMethodNoArgs(ob, an.is_contiguous)).ptr() != Py_True)
    throw py::value_error(std::string(name) + " must be contiguous");
  TensorView v;
  for (size_t i = 0; i < ndim; ++i) v.shape.push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), Py_ssize_t(i))));
  v.data = reinterpret_cast<char*>(
      uintptr_t(PyLong_AsUnsignedLongLong(checked(PyObject_CallMethodNoArgs(ob, an.data_ptr)).ptr())));
  if (PyErr_Occurred()) throw py::error_already_set();
  return v;
}

inline void expect_shape(const TensorView& v, const char* name, const std::vector<int64_t>& want) {
  if (v.shape == want) return;
  auto str = [](const std::vector<int64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
  };
  throw py::value_error(std::string(name) + " must have shape " + str(want) + ", got " + str(v.shape));
}

// ---- 2-D operands of the dense GEMV (numpy or torch) ----------------------------------------
// One 2-D operand as raw memory: element (r, c) at data + (r * ld + c) * element size.
struct DenseOperand {
  char* data;
  int64_t rows, cols, ld;
  bool bf16;  // uint16 bf16 bits; else float32 (out only), or int8 (i8: an int8 weight)
  const char* name;
  bool i8 = false;
  std::string shape() const { return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]"; }
  int64_t esize() const { return i8 ? 1 : bf16 ? 2 : 4; }
  // [first byte, last byte + 1)
  std::pair<uintptr_t, uintptr_t> span() const {
    uintptr_t b = reinterpret_cast<uintptr_t>(data);
    return {b, b + uintptr_t(((rows - 1) * ld + cols) * esize())};
  }
};

// Strides (in elements) -> row stride ld; unit inner stride and ld >= cols unless the dimension
// has one element (its stride then means nothing).
inline int64_t dense_ld(const char* name, int64_t rows, int64_t cols, int64_t s0, int64_t s1, const char* unit) {
  auto strides = [&] {
    return "(" + std::to_string(s0) + ", " + std::to_string(s1) + ") " + unit + " for shape [" +
           std::to_string(rows) + ", " + std::to_string(cols) + "]";
  };
  if (rows < 1 || cols < 1)
    throw py::value_error(std::string(name) + " must not be empty, got shape [" + std::to_string(rows) + ", " +
                          std::to_string(cols) + "]");
  if (cols > 1 && s1 != 1)
    throw py::value_error(std::string(name) + " must have contiguous rows (inner stride 1 element), got strides " +
                          strides());
  if (rows > 1 && s0 < cols)
    throw py::value_error(std::string(name) + " row stride must be >= its " + std::to_string(cols) +
                          " columns (rows may not overlap), got strides " + strides());
  return rows > 1 ? s0 : cols;
}

inline DenseOperand dense_from_numpy(const py::object& o, const char* name, bool is_out) {
  py::array a = as_array(o, name);
  const bool bf16 = is_dtype<uint16_t>(a);
  if (!bf16 && !(is_out && is_dtype<float>(a)))
    bad_dtype(a, name, is_out ? "float32 or uint16 (bf16 bits)" : "uint16 (bf16 bits)");
  if (a.ndim() != 2) check_layout(a, name, {-1, -1});  // raises with the shape
  if (is_out && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
  const int64_t es = bf16 ? 2 : 4, s0 = a.strides(0), s1 = a.strides(1);
  if (s0 % es || s1 % es)
    throw py::value_error(std::string(name) + " strides must be whole elements, got (" + std::to_string(s0) + ", " +
                          std::to_string(s1) + ") bytes");
  DenseOperand d{static_cast<char*>(const_cast<void*>(a.data())), a.shape(0), a.shape(1), 0, bf16, name};
  d.ld = dense_ld(name, d.rows, d.cols, s0 / es, s1 / es, "elements");
  return d;
}

// int8_weight: the operand is an int8 weight (dtype torch.int8 and nothing else).
inline DenseOperand dense_from_torch(const py::object& o, const char* name, bool is_out, bool int8_weight = false) {
  const TorchRefs& tr = torch_refs();
  const TensorAttrNames& an = tensor_attr_names();
  PyObject* ob = o.ptr();
  py::object dt = cpu_tensor_dtype(o, name);
  const bool bf16 = dt.ptr() == tr.bf16;
  if (int8_weight && dt.ptr() != tr.i8)
    throw py::type_error(std::string(name) + " must have dtype torch.int8, got " + py::str(dt).cast<std::string>());
  if (!int8_weight && !bf16 && !(is_out && dt.ptr() == tr.f32))
    throw py::type_error(std::string(name) + " must have dtype torch.bfloat16" + (is_out ? " or torch.float32" : "") +
                         ", got " + py::str(dt).cast<std::string>());
  py::object shape = checked(PyObject_GetAttr(ob, an.shape));
  if (!PyTuple_Check(shape.ptr()) || PyTuple_GET_SIZE(shape.ptr()) != 2)
    throw py::value_error(std::string(name) + " must have 2 dimensions [*, *], got shape " +
                          py::str(py::tuple(shape)).cast<std::string>());
  py::object st;
  uintptr_t ptr = 0;
  try {  // sparse / mkldnn layouts have no strides or data pointer
    st = checked(PyObject_CallMethodNoArgs(ob, an.stride));
    ptr = uintptr_t(PyLong_AsUnsignedLongLong(checked(PyObject_CallMethodNoArgs(ob, an.data_ptr)).ptr()));
    if (PyErr_Occurred()) throw py::error_already_set();
  } catch (py::error_already_set& e) {
    throw py::value_error(std::string(name) + " must be a dense strided tensor: " + e.what());
  }
  auto [rows, cols] = int_pair(shape);
  auto [s0, s1] = int_pair(st);
  DenseOperand d{reinterpret_cast<char*>(ptr), rows, cols, 0, bf16, name, int8_weight};
  d.ld = dense_ld(name, rows, cols, s0, s1, "elements");
  return d;
}

// The KernelTable an `isa` argument names ("" = the process's active one).
inline const KernelTable& dense_table(const std::string& isa) {
  static const KernelTable* active = nullptr;  // the process's ISA never changes (dispatch.h)
  if (!isa.empty()) return resolved_table(isa);
  if (active == nullptr) active = &active_table();
  return *active;
}

}  // namespace hybrid
