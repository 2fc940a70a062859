#!/bin/sh
# Build each kernel TU with only its ISA's flags (as the extension does) and run check_kernels.
# Usage: csrc/tests/run_check.sh [isa-name]   (run from anywhere; builds in a temp dir)
set -e
here=$(cd "$(dirname "$0")/.." && pwd)
out=${TMPDIR:-/tmp}/hybrid_check_kernels
mkdir -p "$out"
CXX=${CXX:-g++}
base="-O3 -std=c++17 -Wall -Wextra -Wno-unused-parameter -fno-math-errno"
avx512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
$CXX $base -mavx2 -mfma -mf16c -c "$here/kernels_avx2.cpp" -o "$out/avx2.o"
$CXX $base $avx512 -c "$here/kernels_avx512.cpp" -o "$out/avx512.o"
$CXX $base $avx512 -mavx512vnni -c "$here/kernels_avx512_vnni.cpp" -o "$out/vnni.o"
$CXX $base $avx512 -mavx512vnni -mavx512bf16 -c "$here/kernels_avx512_bf16.cpp" -o "$out/bf16.o"
$CXX $base $avx512 -mavx512vnni -mavx512bf16 -mamx-tile -mamx-int8 -mamx-bf16 \
  -c "$here/kernels_amx.cpp" -o "$out/amx.o"
$CXX $base -c "$here/tests/check_kernels.cpp" -o "$out/check.o"
$CXX "$out"/check.o "$out"/avx2.o "$out"/avx512.o "$out"/vnni.o "$out"/bf16.o "$out"/amx.o \
  -o "$out/check_kernels"
exec "$out/check_kernels" "$@"
