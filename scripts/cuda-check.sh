#!/usr/bin/env bash
# The CUDA check for the lent GPU machine (/work/shared/DEVICE.md): no npm or network there,
# so it runs a carried Node binary, builds the addon with nvcc + g++ directly (the same
# sources, defines and flags as binding.gyp, for sm_90 only), points RETNET_CUBLAS at the pip
# nvidia-cublas package's libcublas (loaded at run time; none is linked), runs the CUDA-vs-CPU
# parity checks (scripts/cuda-parity.ts, what `npm run test:cuda` asserts) once per GEMM (cuBLAS
# when found, then the own kernel) and the CUDA bench (both GEMMs), and prints a short summary
# table last. The timeouts below are caps, not estimates: nothing here has been timed on a GPU.
#
#   bash scripts/cuda-check.sh --prepare     on the dev machine: .devtools/ (node.xz, N-API
#                                            headers) and dist/ (compiled scripts)
#   bash scripts/cuda-check.sh               on the GPU machine, e.g. with the device tool:
#     run(command="bash scripts/cuda-check.sh", carry=[".devtools", "dist", "node_modules/node-addon-api"],
#         timeout_s=600)
# Outputs (logs, ptxas register/spill report) go to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .devtools/node-include
  [[ -f .devtools/node.xz ]] || xz -T2 -6 -c "$(command -v node)" > .devtools/node.xz
  node_include="$(dirname "$(dirname "$(command -v node)")")/include/node"
  cp "$node_include"/{node_api.h,node_api_types.h,js_native_api.h,js_native_api_types.h} .devtools/node-include/
  npx tsc -p tsconfig.json
  du -sh .devtools dist node_modules/node-addon-api test/data
  exit 0
fi

out="${OUT:-/tmp/cuda-check}"
mkdir -p "$out"

if [[ -f .devtools/node.xz ]] && ! command -v node > /dev/null; then
  python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.devtools/node.xz'),open('/tmp/node','wb'))"
  chmod +x /tmp/node
  export PATH="/tmp:$PATH"
fi
node --version
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# ---- Build (binding.gyp's sources and flags; nvcc and g++ in parallel).
nvcc="$(node cuda/detect-cuda.js nvcc)"
cuda_lib="$(node cuda/detect-cuda.js libdir)"
[[ -n "$nvcc" ]] || { echo "cuda-check: no CUDA toolkit found"; exit 1; }
obj=build/cuda-check
mkdir -p "$obj" build/Release
build_start=$(date +%s)
"$nvcc" -c cuda/ops_cuda.cu -o "$obj/ops_cuda.o" -O3 -std=c++17 -Xcompiler -fPIC -Icsrc -Icuda \
  -arch="${CUDA_ARCH:-sm_90}" -Xptxas -v 2> "$out/ptxas.txt" &
pids=($!)
for src in csrc/*.cc; do
  g++ -c "$src" -o "$obj/$(basename "$src" .cc).o" -O3 -std=c++17 -fPIC -fexceptions -Wall -Wno-unused-parameter \
    -DNAPI_VERSION=8 -DNAPI_CPP_EXCEPTIONS -DNODE_ADDON_API_DISABLE_DEPRECATED -DRETNET_WITH_CUDA \
    -I.devtools/node-include -Inode_modules/node-addon-api -Icsrc -Icuda &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
if [[ $failed != 0 ]]; then
  cat "$out/ptxas.txt"
  echo "cuda-check: build failed"
  exit 1
fi
g++ -shared -o build/Release/retnet.node "$obj"/*.o -L"$cuda_lib" -lcudart_static -ldl -lrt -lpthread
build_s=$(( $(date +%s) - build_start ))

# ---- cuBLAS from the pip nvidia-cublas package (the highest-versioned libcublas.so* under it),
# unless RETNET_CUBLAS is already set. Its directory goes on LD_LIBRARY_PATH for libcublasLt.
if [[ -z "${RETNET_CUBLAS:-}" ]]; then
  site="$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2> /dev/null || true)"
  cublas_lib="$( [[ -n "$site" ]] && find "$site/nvidia" -name 'libcublas.so*' -printf '%f\t%p\n' 2> /dev/null |
    sort -V | tail -n 1 | cut -f 2 || true)"
  if [[ -n "$cublas_lib" ]]; then
    export RETNET_CUBLAS="$cublas_lib"
    export LD_LIBRARY_PATH="$(dirname "$cublas_lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
node -e "console.log(require('./build/Release/retnet.node').buildInfo())"
gemm="$(node -e "console.log(require('./build/Release/retnet.node').buildInfo().cudaGemm)")"

# ---- Checks: parity with the default GEMM (cuBLAS when it loaded), then with the own kernel
# when that was not the default; the bench runs both GEMMs itself.
parity_rc=0
timeout 240 node dist/scripts/cuda-parity.js > "$out/parity.txt" 2>&1 || parity_rc=$?
parity_own_rc=0
if [[ "$gemm" == cublas* ]]; then
  RETNET_CUDA_GEMM=own timeout 240 node dist/scripts/cuda-parity.js > "$out/parity-own.txt" 2>&1 || parity_own_rc=$?
fi
bench_rc=0
timeout 300 node dist/scripts/bench-cuda.js > "$out/bench.txt" 2>&1 || bench_rc=$?

echo
echo "==== cuda-check summary"
echo "build: ${build_s}s (nvcc + g++); spills: $(grep -c 'bytes spill stores' "$out/ptxas.txt" || true) kernels reported," \
  "$(grep -E '[1-9][0-9]* bytes spill stores' "$out/ptxas.txt" | wc -l) with spills"
echo "gemm (full-sequence products by default): ${gemm}"
echo "-- parity, ${gemm%% *} GEMM (exit ${parity_rc}); failures first:"
grep -E 'FAIL' "$out/parity.txt" | head -20 || true
tail -n 3 "$out/parity.txt"
if [[ -f "$out/parity-own.txt" ]]; then
  echo "-- parity, own GEMM (exit ${parity_own_rc}); failures first:"
  grep -E 'FAIL' "$out/parity-own.txt" | head -20 || true
  tail -n 3 "$out/parity-own.txt"
fi
echo "-- bench (exit ${bench_rc}), one table per GEMM:"
grep -vE '^\s*$' "$out/bench.txt" | tail -n 24
exit $(( parity_rc != 0 || parity_own_rc != 0 || bench_rc != 0 ))
