"""csrc/tests/check_kernels.cpp, the standalone C++ check of every kernel table against its own
scalar reference (written from the layouts in core/kernels.h, independent of kernels_scalar.cpp),
built by CMake from the same kernel objects as the extension and run here.

It is built in its own CMake tree, build/check_kernels (HYBRID_PYTHON=OFF: only the kernel objects
and the check compile, at -O1, in well under a minute on 2 cores; reruns are incremental). Tables
the CPU cannot run are reported as not checked by the binary itself (dispatch.h's reason), so
every ISA this machine has is checked. Skips only when no CMake or C++ compiler is available.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "check_kernels"


def _cmake() -> str | None:
    """The CMake setup.py builds with (its find_cmake; setup.py builds nothing when imported)."""
    spec = importlib.util.spec_from_file_location("hybrid_setup_py", ROOT / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    return setup_py.find_cmake()


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


@pytest.fixture(scope="module")
def check_kernels() -> Path:
    cmake, cxx = _cmake(), _compiler()
    if cmake is None or cxx is None:
        pytest.skip(f"building check_kernels needs CMake and a C++ compiler (cmake: {cmake}, c++: {cxx})")
    configure = [cmake, "-S", str(ROOT), "-B", str(BUILD), "-DHYBRID_PYTHON=OFF", "-DCMAKE_BUILD_TYPE=Debug",
                 "-DCMAKE_CXX_FLAGS_DEBUG=-O1", f"-DCMAKE_CXX_COMPILER={cxx}"]
    if shutil.which("ninja") and not (BUILD / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    for cmd in (configure, [cmake, "--build", str(BUILD), "--target", "check_kernels", "-j", str(os.cpu_count() or 2)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    exe = BUILD / "check_kernels"
    assert exe.is_file(), f"the build made no {exe}"
    return exe


def test_check_kernels_passes(check_kernels):
    r = subprocess.run([str(check_kernels)], capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "PASSED" in out, out[-8000:]
    # Every table the CPU runs was checked (the binary skips the others with their reason): the
    # same set the extension offers, less scalar, which the binary is the reference for.
    from hybrid import native  # noqa: PLC0415

    if native.available():
        checked = {line.split(":")[0] for line in out.splitlines() if line.endswith(": checked")}
        assert checked == set(native.available_isas()) - {"scalar"}, out[-2000:]
