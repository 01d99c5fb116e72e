#!/usr/bin/env bash
# Side-by-side GEMM comparison with OpenBLAS (issue: GEMM >= 85% of OpenBLAS sgemm).
# Needs libopenblas-dev (apt-get install libopenblas-dev); the package itself never links it.
# Usage: bash scripts/gemm-vs-openblas.sh [reps]   (threads: RETNET_NUM_THREADS, default 2 here)
#
# OpenBLAS's idle threads spin for a long while after each call, taking a core from ours as
# the two alternate (ours then halved at times); OPENBLAS_THREAD_TIMEOUT=4 makes them sleep
# as ours do. OpenBLAS 0.3.21 does not know Zen 5 and picks an AVX2 kernel there, so on an
# AVX-512 CPU its AVX-512 kernel (SkylakeX) is asked for. Either can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(dirname "$(find /usr/include -name cblas.h -path '*openblas*' | head -n1)")
[ -n "$inc" ] || { echo "gemm-vs-openblas: cblas.h from libopenblas-dev not found" >&2; exit 1; }
threads=${RETNET_NUM_THREADS:-2}
export OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
if [[ -z "${OPENBLAS_CORETYPE:-}" ]] && grep -qw avx512f /proc/cpuinfo; then export OPENBLAS_CORETYPE=SKYLAKEX; fi
echo "OpenBLAS kernel: ${OPENBLAS_CORETYPE:-its own choice}, thread timeout 2^$OPENBLAS_THREAD_TIMEOUT cycles"
out=$(mktemp -d)
g++ -O3 -std=c++17 -Icsrc -I"$inc" scripts/gemm_vs_openblas.cc csrc/gemm.cc csrc/ops_cpu.cc csrc/quant.cc csrc/threadpool.cc \
  -o "$out/gemm_vs_openblas" -lopenblas -lpthread
RETNET_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads "$out/gemm_vs_openblas" "${1:-7}"
rm -rf "$out"
