"""ctypes declarations of the part of ggml's C API that bench/peers/ggml_moe.py uses, loaded from
the libggml that llama-cpp-python ships (llama_cpp/lib/libggml-base.so, libggml-cpu.so).

Only opaque pointers cross this boundary: tensors are filled and read with ggml_backend_tensor_set
/ _get, their strides are computed from their shapes, so no struct layout of ggml's is declared
here but ggml_init_params (three fields, unchanged since ggml's first release). The signatures are
those of ggml/include/ggml.h, ggml-alloc.h, ggml-backend.h and ggml-cpu.h in the llama.cpp that
llama-cpp-python 0.3.x vendors.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

# enum ggml_type (ggml.h): the values are the GGUF file format's tensor types
TYPE = {"f32": 0, "q4_0": 2, "q8_0": 8, "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14,
        "iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq4_xs": 23, "i32": 26, "iq1_m": 29}

P = ctypes.c_void_p
I64 = ctypes.c_int64


class InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", P), ("no_alloc", ctypes.c_bool)]


# name -> (restype, argtypes); each is looked up in the libraries in order
_FUNCS = {
    # ggml.h: contexts, tensors, ops, graphs, quantisation
    "ggml_init": (P, [InitParams]),
    "ggml_free": (None, [P]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead_custom": (ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_bool]),
    "ggml_new_tensor_2d": (P, [P, ctypes.c_int, I64, I64]),
    "ggml_new_tensor_3d": (P, [P, ctypes.c_int, I64, I64, I64]),
    "ggml_set_input": (None, [P]),
    "ggml_set_output": (None, [P]),
    "ggml_nbytes": (ctypes.c_size_t, [P]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, I64]),
    "ggml_mul_mat_id": (P, [P, P, P, P]),          # (ctx, as [K, N, E], b [K, 1|n_used, T], ids [n_used, T])
    "ggml_swiglu_split": (P, [P, P, P]),           # silu(a) * b
    "ggml_mul": (P, [P, P, P]),
    "ggml_add": (P, [P, P, P]),
    "ggml_cont": (P, [P, P]),
    "ggml_reshape_3d": (P, [P, P, I64, I64, I64]),
    "ggml_view_2d": (P, [P, P, I64, I64, ctypes.c_size_t, ctypes.c_size_t]),  # (ctx, a, ne0, ne1, nb1, offset)
    "ggml_new_graph_custom": (P, [P, ctypes.c_size_t, ctypes.c_bool]),
    "ggml_build_forward_expand": (None, [P, P]),
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, P, P, I64, I64, I64, P]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    # ggml-alloc.h
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, [P, P]),
    "ggml_gallocr_new": (P, [P]),
    "ggml_gallocr_alloc_graph": (ctypes.c_bool, [P, P]),
    "ggml_gallocr_free": (None, [P]),
    # ggml-backend.h
    "ggml_backend_cpu_buffer_type": (P, []),
    "ggml_backend_buft_name": (ctypes.c_char_p, [P]),
    "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_tensor_set": (None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_tensor_get": (None, [P, P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_get_device": (P, [P]),
    "ggml_backend_dev_backend_reg": (P, [P]),
    "ggml_backend_reg_get_proc_address": (P, [P, ctypes.c_char_p]),
    "ggml_backend_dev_supports_op": (ctypes.c_bool, [P, P]),
    "ggml_backend_graph_compute": (ctypes.c_int, [P, P]),  # enum ggml_status, 0 = GGML_STATUS_SUCCESS
    "ggml_backend_free": (None, [P]),
    # ggml-cpu.h
    "ggml_backend_cpu_init": (P, []),
    "ggml_backend_cpu_set_n_threads": (None, [P, ctypes.c_int]),
}

# typedef ggml_backend_buffer_type_t * (*ggml_backend_dev_get_extra_bufts_t)(ggml_backend_dev_t)
EXTRA_BUFTS_FN = ctypes.CFUNCTYPE(ctypes.POINTER(P), P)


class GgmlMissing(RuntimeError):
    """No usable libggml here; str(exc) says why."""


def lib_dir() -> Path:
    """llama_cpp/lib of the installed llama-cpp-python, found without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlMissing("llama-cpp-python is not installed (pip install llama-cpp-python, or the "
                          "package's bench extra)")
    d = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not (d / "libggml-cpu.so").exists():
        raise GgmlMissing(f"llama-cpp-python at {d.parent} ships no libggml-cpu.so in lib/ (a build "
                          "without the CPU backend, or one linked statically)")
    return d


class Ggml:
    """The declared functions as attributes: Ggml().ggml_init(...)."""

    def __init__(self):
        d = lib_dir()
        libs = []
        for name in ("libggml-base.so", "libggml-cpu.so"):
            try:
                libs.append(ctypes.CDLL(str(d / name), mode=ctypes.RTLD_GLOBAL))
            except OSError as exc:
                raise GgmlMissing(f"cannot load {d / name}: {exc}") from None
        for fn, (res, args) in _FUNCS.items():
            f = next((getattr(lib, fn) for lib in libs if hasattr(lib, fn)), None)
            if f is None:
                raise GgmlMissing(f"{d} has no {fn} (a libggml older or newer than this bench knows)")
            f.restype, f.argtypes = res, args
            setattr(self, fn, f)
        self.dir = d

    def extra_bufts(self, backend) -> list:
        """The CPU device's extra buffer types (CPU_REPACK, ...), in ggml's order of preference."""
        dev = self.ggml_backend_get_device(backend)
        reg = self.ggml_backend_dev_backend_reg(dev)
        addr = self.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not addr:
            return []
        arr = EXTRA_BUFTS_FN(addr)(dev)
        out = []
        while arr and arr[len(out)]:
            out.append(arr[len(out)])
        return out
