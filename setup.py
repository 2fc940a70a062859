"""Build hook: setuptools' build_ext runs CMake, which builds csrc/ into hybrid._native (what users
load), hybrid._native_testing (test-only entry points) and the core library both link,
hybrid/libhybrid_core.so, all three into the package folder.

Everything about compiling lives in CMakeLists.txt; this file only hands CMake the Python
interpreter, pybind11's CMake directory and the output folder setuptools expects. Release build
by default; set HYBRID_BUILD_TYPE=Debug (or RelWithDebInfo) to change it, HYBRID_BUILD_JOBS to
change the parallelism (default: all CPUs).

Install: `pip install -e .` (or `pip install .`); both work with and without build isolation.
Incremental rebuilds while editing csrc/ (only changed files recompile):
    cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
          -Dpybind11_DIR=$(python -c "import pybind11; print(pybind11.get_cmake_dir())") \
          -DHYBRID_OUTPUT_DIR=$PWD/hybrid \
          -DHYBRID_EXT_SUFFIX=$(python -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    ninja -C build/dev
The kernel check alone (no Python needed): see csrc/tests/check_kernels.cpp.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])  # CMake owns the sources
        self.source_dir = str(source_dir)


def find_cmake() -> str | None:
    """The CMake to build with (also what tests/test_native_check_kernels.py builds with): build
    isolation installs the `cmake` PyPI package (pyproject's build requirements); without
    isolation, the PyPI package if installed, else a cmake on PATH; None when there is none."""
    try:
        import cmake  # type: ignore

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    return shutil.which("cmake")


def _cmake_executable() -> str:
    exe = find_cmake()
    if exe is None:
        raise RuntimeError("building hybrid._native needs CMake >= 3.20: pip install cmake")
    return exe


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("HYBRID_BUILD_TYPE", "Release")
        build_dir = Path(self.build_temp).resolve() / f"cmake-{build_type.lower()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_executable()
        configure = [
            cmake,
            "-S", ext.source_dir,
            "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DHYBRID_OUTPUT_DIR={out_dir}",
            f"-DHYBRID_EXT_SUFFIX={Path(self.get_ext_filename(ext.name)).name[len('_native'):]}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("HYBRID_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)

    def copy_extensions_to_source(self) -> None:
        """Editable installs copy each declared extension into the source tree; CMake also built
        the shared core library and the test-only module beside hybrid._native, which its RPATH
        ($ORIGIN) and the tests need there too."""
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            built = Path(self.build_lib) / self.get_ext_filename(self.get_ext_fullname(ext.name))
            dest = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            for extra in [*built.parent.glob("libhybrid_core*.so"), *built.parent.glob("_native_testing*.so")]:
                shutil.copyfile(extra, dest / extra.name)


if __name__ == "__main__":  # pip (setuptools.build_meta runs this file as __main__), setup.py CLI;
    # importing it (the kernel check test asks find_cmake) builds nothing
    setup(
        ext_modules=[CMakeExtension("hybrid._native", ROOT)],
        cmdclass={"build_ext": CMakeBuild},
    )
