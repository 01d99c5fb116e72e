#!/usr/bin/env bash
# Our RetNet decode next to llama.cpp (node-llama-cpp, CPU) decoding a llama-architecture
# Transformer of the same size, on this machine, alternating the two so a noisy shared machine
# hits both alike:
#
#   scripts/decode-vs-llamacpp.sh PRESET CONTEXTS [REPEATS]
#   e.g. scripts/decode-vs-llamacpp.sh base 512,2048,8192,16384 3
#
# For each repeat and each context C: one child process of ours (dist/scripts/bench.js's --child
# decode entry: prefill C tokens chunkwise, 4 warm-up steps, STEPS timed batch-1 steps, peak RSS of
# that process), then one of llama.cpp (scripts/llamacpp-bench.mjs: prefill C random tokens,
# 4 warm-up steps, STEPS timed single-token steps, context size 16384, f16 KV cache, flash
# attention "auto", peak RSS of that process). Prints a table per context (medians over the
# repeats; each ratio is the median of the per-repeat ratios of adjacent runs) and median ratios.
#
# Needs: `npm run build` (dist/scripts/bench.js and the addon). Installs node-llama-cpp into
# LLAMACPP_PREFIX (not into this project) and writes the GGUF into GGUF_DIR when missing.
#
# Environment (defaults): STEPS=64 THREADS=2 WEIGHTS=f32 (llama.cpp GGUF: f32 or f16)
#   OUR_WEIGHTS=f32 (ours: f32, bf16 or int8) CHUNK=128 (our prefill chunk)
#   LLAMACPP_PREFIX=/tmp/llamacpp LLAMACPP_VERSION=3.21.1 GGUF_DIR=/tmp
#   LLAMACPP_ARGS="" (extra arguments for scripts/llamacpp-bench.mjs, e.g. "--decode fixed")
#   OUT=/tmp/decode-vs-llamacpp-PRESET-DATE.jsonl (every raw JSON line)
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 PRESET CONTEXTS [REPEATS]   (PRESET base|medium, CONTEXTS e.g. 512,2048,8192,16384)" >&2
  exit 2
fi
PRESET=$1
CONTEXTS=$2
REPEATS=${3:-2}
case "$PRESET" in base|medium) ;; *) echo "PRESET must be base or medium" >&2; exit 2 ;; esac
[[ "$CONTEXTS" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "CONTEXTS must be a comma-separated list of integers" >&2; exit 2; }
[[ "$REPEATS" =~ ^[1-9][0-9]*$ ]] || { echo "REPEATS must be a positive integer" >&2; exit 2; }

STEPS=${STEPS:-64}
THREADS=${THREADS:-2}
WEIGHTS=${WEIGHTS:-f32}
OUR_WEIGHTS=${OUR_WEIGHTS:-f32}
CHUNK=${CHUNK:-128}
LLAMACPP_PREFIX=${LLAMACPP_PREFIX:-/tmp/llamacpp}
LLAMACPP_VERSION=${LLAMACPP_VERSION:-3.21.1}
GGUF_DIR=${GGUF_DIR:-/tmp}
LLAMACPP_ARGS=${LLAMACPP_ARGS:-}
OUT=${OUT:-/tmp/decode-vs-llamacpp-$PRESET-$(date +%Y%m%d-%H%M%S).jsonl}
export LLAMACPP_PREFIX

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ ! -f dist/scripts/bench.js ]]; then
  echo "dist/scripts/bench.js is missing: run npm run build first" >&2
  exit 1
fi

# node-llama-cpp, outside the project. Its prebuilt binaries come as npm packages
# (@node-llama-cpp/linux-x64 ...); NODE_LLAMA_CPP_SKIP_DOWNLOAD keeps its postinstall from
# trying to build llama.cpp from source.
installed=$(node -e "try{console.log(require('$LLAMACPP_PREFIX/node_modules/node-llama-cpp/package.json').version)}catch{}")
if [[ "$installed" != "$LLAMACPP_VERSION" ]]; then
  echo "installing node-llama-cpp@$LLAMACPP_VERSION into $LLAMACPP_PREFIX (found: ${installed:-none})" >&2
  mkdir -p "$LLAMACPP_PREFIX"
  NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix "$LLAMACPP_PREFIX" --no-audit --no-fund \
    "node-llama-cpp@$LLAMACPP_VERSION" >&2
fi

GGUF="$GGUF_DIR/llama-twin-$PRESET-$WEIGHTS.gguf"
if [[ ! -f "$GGUF" ]]; then
  node scripts/make-llama-gguf.mjs --preset "$PRESET" --type "$WEIGHTS" --out "$GGUF" >&2
fi

export RETNET_NUM_THREADS=$THREADS
: >"$OUT"
echo "preset $PRESET, contexts $CONTEXTS, $REPEATS repeats, $STEPS steps, $THREADS threads; llama.cpp model $GGUF; raw lines in $OUT" >&2

IFS=',' read -r -a CTX <<<"$CONTEXTS"
for ((r = 1; r <= REPEATS; r++)); do
  for c in "${CTX[@]}"; do
    # ours: the bench's per-configuration child (its peak RSS is read before its bandwidth probe)
    line=$(node dist/scripts/bench.js --child decode "$PRESET" "$OUR_WEIGHTS" 1 "$c" "$STEPS" "$CHUNK" | tail -n 1)
    node -e 'const f=JSON.parse(process.argv[1]);f.impl="retnet";f.repeat=+process.argv[2];console.log(JSON.stringify(f))' "$line" "$r" >>"$OUT"
    echo "repeat $r ctx $c  ours      prefill $(node -p "JSON.parse(process.argv[1]).prefillTokensPerSecond.toFixed(0)" "$line") tok/s  decode $(node -p "JSON.parse(process.argv[1]).tokensPerSecond.toFixed(1)" "$line") tok/s" >&2
    # llama.cpp
    # shellcheck disable=SC2086
    line=$(node scripts/llamacpp-bench.mjs --model "$GGUF" --name "$PRESET" --weights "$WEIGHTS" --context "$c" \
      --steps "$STEPS" --warmup 4 --threads "$THREADS" $LLAMACPP_ARGS | grep '^{"impl"' | tail -n 1)
    node -e 'const f=JSON.parse(process.argv[1]);f.repeat=+process.argv[2];console.log(JSON.stringify(f))' "$line" "$r" >>"$OUT"
    echo "repeat $r ctx $c  llama.cpp prefill $(node -p "JSON.parse(process.argv[1]).prefillTokensPerSecond.toFixed(0)" "$line") tok/s  decode $(node -p "JSON.parse(process.argv[1]).tokensPerSecond.toFixed(1)" "$line") tok/s" >&2
  done
done

node - "$OUT" "$PRESET" "$WEIGHTS" "$OUR_WEIGHTS" <<'EOF'
const fs = require('fs');
const [file, preset, weights, ourWeights] = process.argv.slice(2);
const rows = fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
const median = (a) => {
  const s = a.filter((x) => Number.isFinite(x)).sort((x, y) => x - y);
  if (!s.length) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const mib = (b) => (b / 2 ** 20).toFixed(0);
const contexts = [...new Set(rows.map((r) => r.context))];
const pad = (s, n) => String(s).padStart(n);
console.log(`\n${preset}: ours ${ourWeights} (RetNet recurrent decode) vs llama.cpp ${weights} (Transformer twin), batch 1, medians over repeats`);
console.log(
  ['context', 'ours tok/s', 'llama tok/s', 'ratio', 'ours prefill', 'llama prefill', 'ratio', 'ours RSS MiB', 'llama RSS MiB'].map((h, i) => pad(h, i ? 13 : 7)).join(' '),
);
const decodeRatios = [];
const prefillRatios = [];
for (const c of contexts) {
  const ours = rows.filter((r) => r.context === c && r.impl === 'retnet');
  const llama = rows.filter((r) => r.context === c && r.impl === 'llama.cpp');
  const repeats = [...new Set(ours.map((r) => r.repeat))];
  const dr = [];
  const pr = [];
  for (const k of repeats) {
    const o = ours.find((r) => r.repeat === k);
    const l = llama.find((r) => r.repeat === k);
    if (o && l) {
      dr.push(o.tokensPerSecond / l.tokensPerSecond);
      pr.push(o.prefillTokensPerSecond / l.prefillTokensPerSecond);
    }
  }
  const d = median(dr);
  const p = median(pr);
  decodeRatios.push(d);
  prefillRatios.push(p);
  console.log(
    [
      pad(c, 7),
      pad(median(ours.map((r) => r.tokensPerSecond)).toFixed(1), 13),
      pad(median(llama.map((r) => r.tokensPerSecond)).toFixed(1), 13),
      pad(d.toFixed(2) + 'x', 13),
      pad(median(ours.map((r) => r.prefillTokensPerSecond)).toFixed(0), 13),
      pad(median(llama.map((r) => r.prefillTokensPerSecond)).toFixed(0), 13),
      pad(p.toFixed(2) + 'x', 13),
      pad(mib(median(ours.map((r) => r.peakRssBytes))), 13),
      pad(mib(median(llama.map((r) => r.peakRssBytes))), 13),
    ].join(' '),
  );
  const spread = (a) => (a.length > 1 ? `${Math.min(...a).toFixed(2)}..${Math.max(...a).toFixed(2)}` : '-');
  console.log(`${' '.repeat(7)}  per-repeat decode ratios ${spread(dr)}, prefill ratios ${spread(pr)}`);
}
console.log(`median decode ratio (ours / llama.cpp) over contexts: ${median(decodeRatios).toFixed(2)}x; median prefill ratio: ${median(prefillRatios).toFixed(2)}x`);
const l0 = rows.find((r) => r.impl === 'llama.cpp');
if (l0) {
  const fa = (l0.llamaCppLog || []).filter((s) => /flash attention|load_backend/i.test(s)).map((s) => s.replace(/ from \S*\//, ' ')).join('; ');
  console.log(`llama.cpp: node-llama-cpp ${l0.nodeLlamaCpp} ${l0.buildType}, ${l0.threads} threads, context size ${l0.contextSize}, batch ${l0.batchSize}, KV types ${l0.kvCacheType}, ${l0.modelParams} params; ${fa}`);
}
console.log(`raw: ${file}`);
EOF
