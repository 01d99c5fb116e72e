#!/usr/bin/env bash
# Training throughput, ours vs PyTorch (Debian's python3-torch) running the same RetNet
# the way torchscale does (scripts/pytorch_baseline.py), alternated in fresh processes on
# this machine so both see the same neighbours.
#
#   scripts/train-vs-pytorch.sh PRESET SHAPE MODE [REPEATS]
#     PRESET   base | medium
#     SHAPE    BxT, e.g. 4x512
#     MODE     parallel | chunkwise
#     REPEATS  default 3
#   environment: THREADS (default 2), CHUNK_SIZE (default 128), STEPS (default: as
#   scripts/bench.ts, 1 when B*T >= 8192 else 2), PYTHON (default /usr/bin/python3),
#   PRECISION (ours: fp32 | bf16, default fp32; PyTorch always runs fp32)
#
# Both sides time forward + next-token cross-entropy + backward + clip-grad-norm(1.0) +
# AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.1), fp32, after one warm-up step.
# Ours runs through bench.js's per-configuration child entry point, which runs exactly
# one (preset, mode, shape) and prints one JSON line (bench.js train itself would run
# both modes and the bandwidth/FMA probes). Needs the built dist/ and build/Release.
set -euo pipefail

if [[ $# -lt 3 || $# -gt 4 ]]; then
  sed -n '6,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
PRESET=$1
SHAPE=$2
MODE=$3
REPEATS=${4:-3}
THREADS=${THREADS:-2}
CHUNK=${CHUNK_SIZE:-128}
PYTHON=${PYTHON:-/usr/bin/python3}
PRECISION=${PRECISION:-fp32}
case "$PRECISION" in fp32 | bf16) ;; *) echo "PRECISION must be fp32 or bf16" >&2; exit 2 ;; esac

case "$PRESET" in base | medium) ;; *) echo "PRESET must be base or medium" >&2; exit 2 ;; esac
case "$MODE" in parallel | chunkwise) ;; *) echo "MODE must be parallel or chunkwise" >&2; exit 2 ;; esac
if [[ ! "$SHAPE" =~ ^([0-9]+)x([0-9]+)$ ]]; then echo "SHAPE must be BxT, e.g. 4x512" >&2; exit 2; fi
B=${BASH_REMATCH[1]}
T=${BASH_REMATCH[2]}
if [[ ! "$REPEATS" =~ ^[1-9][0-9]*$ ]]; then echo "REPEATS must be a positive integer" >&2; exit 2; fi
if (( B * T >= 8192 )); then STEPS=${STEPS:-1}; else STEPS=${STEPS:-2}; fi

cd "$(dirname "$0")/.."
[[ -f dist/scripts/bench.js ]] || { echo "dist/scripts/bench.js missing: build first (npm run build)" >&2; exit 1; }
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "$PYTHON cannot import torch: apt-get install python3-torch" >&2; exit 1; }

# field NAME JSON -> value
field() { node -e 'const o = JSON.parse(process.argv[2]); process.stdout.write(String(o[process.argv[1]]))' "$1" "$2"; }

echo "train $PRESET $MODE ${B}x${T}, ours $PRECISION, chunk $CHUNK, $THREADS threads, $REPEATS repeats (timed steps after 1 warm-up: ours as bench.ts, $(( B * T >= 8192 ? 1 : 2 )); pytorch $STEPS)"
printf '%-7s %14s %14s %8s %12s %12s\n' repeat 'ours tok/s' 'pytorch tok/s' ratio 'ours RSS' 'pytorch RSS'
ratios=()
raw=()
for ((r = 1; r <= REPEATS; r++)); do
  ours_json=$(RETNET_NUM_THREADS=$THREADS node dist/scripts/bench.js --child train "$PRESET" "$MODE" "$PRECISION" "$B" "$T" "$CHUNK" | tail -n 1)
  # The parallel form materialises [B, H, T, T] score matrices per layer, as torchscale does:
  # long T runs out of memory there. Report that instead of stopping.
  if ! py_json=$("$PYTHON" scripts/pytorch_baseline.py train --preset "$PRESET" --mode "$MODE" --batch "$B" --seq "$T" \
    --chunk-size "$CHUNK" --optimizer --steps "$STEPS" --threads "$THREADS" | tail -n 1) || [[ -z "$py_json" ]]; then
    ours=$(field tokensPerSecond "$ours_json")
    printf '%-7s %14.1f %14s\n' "$r" "$ours" 'FAILED'
    raw+=("ours    $r: $ours_json" "pytorch $r: failed (killed for memory? see stderr above)")
    continue
  fi
  ours=$(field tokensPerSecond "$ours_json")
  py=$(field tokensPerSecond "$py_json")
  ours_rss=$(field peakRssBytes "$ours_json")
  py_rss=$(field peakRssBytes "$py_json")
  ratio=$(node -e 'process.stdout.write((Number(process.argv[1]) / Number(process.argv[2])).toFixed(3))' "$ours" "$py")
  ratios+=("$ratio")
  printf '%-7s %14.1f %14.1f %8s %9d MiB %9d MiB\n' "$r" "$ours" "$py" "$ratio" $((ours_rss >> 20)) $((py_rss >> 20))
  raw+=("ours    $r: $ours_json" "pytorch $r: $py_json")
done
if (( ${#ratios[@]} == 0 )); then
  echo "median ratio ours/pytorch: n/a (pytorch failed every time)"
  printf '%s\n' "${raw[@]}"
  exit 1
fi
median=$(node -e 'const a = process.argv.slice(1).map(Number).sort((x, y) => x - y); const n = a.length;
  process.stdout.write((n % 2 ? a[(n - 1) / 2] : (a[n / 2 - 1] + a[n / 2]) / 2).toFixed(3))' "${ratios[@]}")
echo "median ratio ours/pytorch: $median"
printf '%s\n' "${raw[@]}"
