#!/usr/bin/env bash
# The CUDA check for the lent GPU machine (/work/shared/DEVICE.md): no npm or network there,
# so it runs a carried Node binary, builds the addon with nvcc + g++ directly (the same
# sources, defines and flags as binding.gyp, for sm_90 only), points RETNET_CUBLAS at the pip
# nvidia-cublas package's libcublas (loaded at run time; none is linked), runs the CUDA-vs-CPU
# parity checks (scripts/cuda-parity.ts, what `npm run test:cuda` asserts) once per GEMM (cuBLAS
# when found, then the own kernel) and the CUDA bench (both GEMMs), and prints a short summary
# table last. The timeouts below are caps: on the H200 (fifth session) the build took 6-11 s and
# the whole check 37 s; with --profile --and-check, 130-200 s.
#
#   bash scripts/cuda-check.sh --prepare     on the dev machine: .devtools/ (node.xz, N-API
#                                            headers) and dist/ (compiled scripts)
#   bash scripts/cuda-check.sh --profile [--and-check]
#                                            on the GPU machine: wall time and Nsight Compute kernel
#                                            times of each scripts/cuda-profile.ts operation (then
#                                            the checks below with --and-check)
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

# ---- Profile (--profile): each cuda-profile.js operation's wall time, then its kernels under
# Nsight Compute (one warm-up and two timed calls, so per-kernel counts cover three calls).
profile_summary() {
  python3 - "$@" << 'PY'
import csv, re, sys, collections
scale = {'ns': 1e-3, 'nsecond': 1e-3, 'us': 1.0, 'usecond': 1.0, 'ms': 1e3, 'msecond': 1e3, 's': 1e6, 'second': 1e6}
for path in sys.argv[1:]:
    rows = list(csv.reader(l for l in open(path) if l.startswith('"')))
    if not rows:
        print(f'{path}: no kernels'); continue
    head = rows[0]
    name_at, unit_at, value_at = head.index('Kernel Name'), head.index('Metric Unit'), head.index('Metric Value')
    total = collections.defaultdict(float); count = collections.Counter()
    for r in rows[1:]:
        name = r[name_at].replace('(anonymous namespace)::', '').replace('<unnamed>::', '').removeprefix('void ')
        name = re.sub(r'<.*', '', re.sub(r'\(.*', '', name)).split('::')[-1]
        total[name] += float(r[value_at].replace(',', '')) * scale.get(r[unit_at], float('nan'))
        count[name] += 1
    print(f'-- {path.split("/")[-1]}: {sum(count.values())} launches, {sum(total.values()) / 1e3:.2f} ms of kernels in all')
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:8]:
        print(f'   {name[:44]:44s} {count[name]:6d}x {us / count[name]:10.1f} us  {us / 1e3:9.2f} ms')
PY
}
if [[ "${1:-}" == "--profile" ]]; then
  ops=(forward-parallel forward-chunkwise prefill step-1 step-16 step-64 train)
  for op in "${ops[@]}"; do
    timeout 60 node dist/scripts/cuda-profile.js "$op" --reps 5 2>&1 | tee -a "$out/profile-wall.txt" || true
  done
  for op in "${ops[@]}"; do
    timeout 90 ncu --csv --metrics gpu__time_duration.sum --clock-control none \
      node dist/scripts/cuda-profile.js "$op" --reps 2 > "$out/ncu-$op.csv" 2> "$out/ncu-$op.err" || true
  done
  echo "==== cuda-check --profile summary"
  cat "$out/profile-wall.txt"
  csvs=()
  for op in "${ops[@]}"; do csvs+=("$out/ncu-$op.csv"); done
  profile_summary "${csvs[@]}"
  # One archive: the device tool brings back at most 8 files.
  tar -czf "$out/ncu.tar.gz" -C "$out" $(cd "$out" && ls ncu-*) && rm -f "$out"/ncu-*
  [[ "${2:-}" == "--and-check" ]] || exit 0
fi

# ---- Checks: parity with the default GEMM (cuBLAS when it loaded), then with the own kernel
# when that was not the default; the bench runs both GEMMs itself.
parity_rc=0
timeout 100 node dist/scripts/cuda-parity.js > "$out/parity.txt" 2>&1 || parity_rc=$?
parity_own_rc=0
bench_rc=0
if (( parity_rc > 1 )); then
  # A crash or a hang, not failed checks: run it again under the memory checker and stop there.
  timeout 100 compute-sanitizer --tool memcheck --print-limit 20 node dist/scripts/cuda-parity.js \
    > "$out/sanitizer.txt" 2>&1 || true
else
  if [[ "$gemm" == cublas* ]]; then
    RETNET_CUDA_GEMM=own timeout 60 node dist/scripts/cuda-parity.js > "$out/parity-own.txt" 2>&1 || parity_own_rc=$?
  fi
  timeout 120 node dist/scripts/bench-cuda.js > "$out/bench.txt" 2>&1 || bench_rc=$?
fi
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
if [[ -f "$out/sanitizer.txt" ]]; then
  echo "-- parity crashed (exit ${parity_rc}); memcheck's first reports:"
  grep -E 'Invalid|Error|=========   at|Program hit' "$out/sanitizer.txt" | head -30 || true
  tail -n 5 "$out/parity.txt"
  exit 1
fi
echo "-- bench (exit ${bench_rc}), one table per GEMM:"
grep -vE '^\s*$' "$out/bench.txt" | tail -n 24
exit $(( parity_rc != 0 || parity_own_rc != 0 || bench_rc != 0 ))
