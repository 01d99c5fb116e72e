#!/usr/bin/env node
// Times llama.cpp (through node-llama-cpp, CPU only) on a GGUF model the way scripts/bench.ts
// times our decode: for each context length C, prefill C prompt tokens (random ids), then time
// single-token decode steps with the KV cache holding C tokens, and report peak RSS.
//
// node-llama-cpp is NOT a dependency of this project: install it elsewhere and point
// LLAMACPP_PREFIX at that directory (default /tmp/llamacpp):
//   npm install --prefix /tmp/llamacpp node-llama-cpp@3.21.1
//
//   node scripts/llamacpp-bench.mjs --model FILE.gguf [--name base] [--weights f32]
//     [--context 512,2048,8192,16384] [--steps 64] [--warmup 4] [--threads 2]
//     [--context-size 16384] [--batch-size 512] [--flash-attention auto|on|off]
//     [--decode generate|fixed] [--seed 1] [--check] [--in-process] [--log-level warn] [--info]
//
// One JSON line per context on stdout:
//   {"impl":"llama.cpp","model":...,"weights":"f32","context":C,"prefillTokensPerSecond":...,
//    "tokensPerSecond":...,"msPerToken":...,"peakRssBytes":..., ...details}
//
// Method, per context C (each in a fresh child process, so peak RSS is that context's own, as in
// scripts/bench.ts; --in-process runs them in one process with a fresh context each, and then
// peak RSS is the process's running maximum):
//  - load the model (mmap, CPU only, gpuLayers 0) and create a context of --context-size tokens
//    (raised to fit C + warmup + steps, rounded up to 256, when that is larger), default KV cache
//    type (f16), flash attention as node-llama-cpp's default ("auto"), batch size 512 (its default);
//  - prefill: evaluate C random prompt tokens (uniform in [3, vocab), fixed seed) and sample the
//    next token from the last one's logits; prefill tok/s = C / that time;
//  - decode: --warmup untimed steps, then --steps timed steps of one token each, each computing
//    the full logits (output projection included) and sampling greedily:
//      generate: feed back the sampled token (what generation does);
//      fixed:    feed a fixed token id each step (what llama-bench's tg does), still sampling;
//    decode tok/s = steps / time.
//  - --check: afterwards, one more step asking for the full next-token distribution, and report
//    whether every probability is finite and they sum to 1 (i.e. the logits were finite).

import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const USAGE = `usage: node scripts/llamacpp-bench.mjs --model FILE.gguf [--name NAME] [--weights f32]
  [--context 512,2048,8192,16384] [--steps 64] [--warmup 4] [--threads 2] [--context-size 16384]
  [--batch-size 512] [--flash-attention auto|on|off] [--decode generate|fixed] [--seed 1]
  [--check] [--in-process] [--log-level warn] [--info]
  --info: load the model only and print what llama.cpp reports (params, size, vocab, CPU backend)
env LLAMACPP_PREFIX: where node-llama-cpp is installed (default /tmp/llamacpp)`;

function positiveInt(text, flag) {
  const v = Number(text);
  if (!Number.isSafeInteger(v) || v < 1) throw new Error(`${flag} must be a positive integer, got ${text}`);
  return v;
}

function parseArgs(argv) {
  const o = {
    model: null,
    name: null,
    weights: null,
    contexts: [512, 2048, 8192, 16384],
    steps: 64,
    warmup: 4,
    threads: 2,
    contextSize: 16384,
    batchSize: 512,
    flashAttention: 'auto',
    decode: 'generate',
    seed: 1,
    check: false,
    inProcess: false,
    child: false,
    logLevel: 'warn',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const need = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    switch (a) {
      case '--model': o.model = need(); break;
      case '--name': o.name = need(); break;
      case '--weights': o.weights = need(); break;
      case '--context': o.contexts = need().split(',').map((s) => positiveInt(s, a)); break;
      case '--steps': o.steps = positiveInt(need(), a); break;
      case '--warmup': { const v = Number(need()); if (!Number.isSafeInteger(v) || v < 0) throw new Error('--warmup must be >= 0'); o.warmup = v; break; }
      case '--threads': o.threads = positiveInt(need(), a); break;
      case '--context-size': o.contextSize = positiveInt(need(), a); break;
      case '--batch-size': o.batchSize = positiveInt(need(), a); break;
      case '--flash-attention': {
        const v = need();
        if (!['auto', 'on', 'off'].includes(v)) throw new Error('--flash-attention must be auto, on or off');
        o.flashAttention = v;
        break;
      }
      case '--decode': {
        const v = need();
        if (v !== 'generate' && v !== 'fixed') throw new Error('--decode must be generate or fixed');
        o.decode = v;
        break;
      }
      case '--seed': o.seed = positiveInt(need(), a); break;
      case '--check': o.check = true; break;
      case '--in-process': o.inProcess = true; break;
      case '--child': o.child = true; break;
      case '--info': o.info = true; break;
      case '--log-level': o.logLevel = need(); break;
      case '-h': case '--help': console.log(USAGE); process.exit(0);
      default: throw new Error(`unknown argument ${a}\n${USAGE}`);
    }
  }
  if (!o.model) throw new Error(`--model is required\n${USAGE}`);
  o.model = path.resolve(o.model);
  if (!o.name) o.name = path.basename(o.model).replace(/\.gguf$/, '');
  return o;
}

async function importNodeLlamaCpp() {
  const prefix = path.resolve(process.env.LLAMACPP_PREFIX || '/tmp/llamacpp');
  let entry;
  try {
    entry = createRequire(path.join(prefix, 'package.json')).resolve('node-llama-cpp');
  } catch {
    throw new Error(`node-llama-cpp not found under ${prefix}: npm install --prefix ${prefix} node-llama-cpp@3.21.1`);
  }
  const lib = await import(pathToFileURL(entry).href);
  let version = null;
  try {
    version = createRequire(path.join(prefix, 'package.json'))('node-llama-cpp/package.json').version;
  } catch {
    // package.json is not exported; read it beside dist/
    try {
      const fs = await import('node:fs');
      version = JSON.parse(fs.readFileSync(path.join(path.dirname(entry), '..', 'package.json'), 'utf8')).version;
    } catch {}
  }
  return { lib, version, prefix };
}

function rng(seed) {
  let s = (seed * 2654435761) >>> 0 || 1;
  return () => {
    s ^= s << 13; s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5; s >>>= 0;
    return s / 4294967296;
  };
}

const ms = (t0) => Number(process.hrtime.bigint() - t0) / 1e6;

async function loadModel(o) {
  const { lib, version, prefix } = await importNodeLlamaCpp();
  // llama.cpp's info log says what flash attention "auto" resolved to and how the KV cache was
  // laid out: keep those lines (for the JSON), pass warnings and errors on to stderr.
  const levels = ['disabled', 'fatal', 'error', 'warn', 'info', 'log', 'debug'];
  const shown = Math.max(levels.indexOf(o.logLevel), 0);
  const llamaLog = [];
  const llama = await lib.getLlama({
    gpu: false, // CPU only: the prebuilt CPU binary
    build: 'never', // never compile llama.cpp from source here
    maxThreads: o.threads,
    logLevel: levels[Math.max(shown, levels.indexOf('log'))], // "log": which CPU backend variant was loaded
    logger: (level, message) => {
      const text = String(message).trim();
      if (/flash|llama_kv_cache: size|CPU : |n_threads|print_info: (model params|model type|file type|file size|n_embd |n_layer|n_head |n_head_kv|n_ff|n_vocab|vocab type)|llama_context: (n_ctx |n_batch|n_ubatch)|compute buffer size|load_backend|system_info/i.test(text)) llamaLog.push(text);
      if (levels.indexOf(level) <= shown && text) process.stderr.write(`[llama.cpp ${level}] ${text}\n`);
    },
  });
  const model = await llama.loadModel({ modelPath: o.model, gpuLayers: 0 });
  const V = model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length ?? 32000;
  let params = null;
  try {
    params = model._model.getTotalParameters(); // llama_model_n_params (not public API)
  } catch {}
  const info = {
    nodeLlamaCpp: version,
    prefix,
    buildType: llama.buildType,
    gpu: llama.gpu,
    cpuMathCores: llama.cpuMathCores,
    modelParams: params,
    modelSizeBytes: model.size,
    modelDescription: model.typeDescription,
    vocab: V,
    trainContextSize: model.trainContextSize,
    embedding: model.embeddingVectorSize,
  };
  return { lib, llama, model, info, V, llamaLog, loadLogEnd: llamaLog.length };
}

async function runContext(o, env, C) {
  const { model, V, info, llamaLog, loadLogEnd } = env;
  const logStart = llamaLog.length;
  const warmup = o.warmup;
  const need = C + warmup + o.steps + (o.check ? 2 : 1);
  const contextSize = Math.max(o.contextSize, Math.ceil(need / 256) * 256);
  const context = await model.createContext({
    contextSize,
    batchSize: o.batchSize,
    flashAttention: o.flashAttention === 'auto' ? undefined : o.flashAttention === 'on',
    threads: { ideal: o.threads, min: o.threads },
    sequences: 1,
  });
  const sequence = context.getSequence();
  try {
    await sequence.clearHistory(); // a fresh sequence anyway; make the empty KV cache explicit
    const r = rng(o.seed + C);
    const prompt = Array.from({ length: C }, () => 3 + Math.floor(r() * (V - 3)));
    const fixedToken = 3 + ((o.seed * 7919) % (V - 3));

    // temperature 0: greedy; yieldEogToken: keep going if the random model "ends" the text.
    const it = sequence.evaluate(prompt, { temperature: 0, yieldEogToken: true });
    let t0 = process.hrtime.bigint();
    let step = await it.next();
    const prefillMs = ms(t0);
    if (step.done) throw new Error('generation ended after the prompt');
    const tokens = [step.value];
    const feed = () => (o.decode === 'fixed' ? fixedToken : undefined);
    for (let i = 0; i < warmup; i++) {
      step = await it.next(feed());
      tokens.push(step.value);
    }
    t0 = process.hrtime.bigint();
    for (let i = 0; i < o.steps; i++) {
      step = await it.next(feed());
      if (step.done) throw new Error(`generation ended after ${i} decode steps`);
      tokens.push(step.value);
    }
    const decodeMs = ms(t0);
    await it.return();

    let check;
    if (o.check) {
      const [out] = await sequence.controlledEvaluate([[fixedToken, { generateNext: { probabilities: true, token: true } }]]);
      const probs = out?.next?.probabilities;
      let finite = probs != null && probs.size > 0;
      let sum = 0;
      let max = 0;
      if (probs) {
        for (const p of probs.values()) {
          if (!Number.isFinite(p)) finite = false;
          sum += p;
          if (p > max) max = p;
        }
      }
      check = {
        probabilitiesFinite: finite,
        probabilitiesCount: probs?.size ?? 0,
        probabilitySum: sum,
        maxProbability: max,
        nextToken: out?.next?.token ?? null,
        kvTokens: sequence.nextTokenIndex,
        sampledTokens: tokens.slice(0, 8),
        distinctSampledTokens: new Set(tokens).size,
      };
    }
    const result = {
      impl: 'llama.cpp',
      model: o.name,
      weights: o.weights ?? (model.fileInfo.metadata?.general?.file_type === 1 ? 'f16' : model.fileInfo.metadata?.general?.file_type === 0 ? 'f32' : 'unknown'),
      context: C,
      prefillTokensPerSecond: C / (prefillMs / 1000),
      tokensPerSecond: o.steps / (decodeMs / 1000),
      msPerToken: decodeMs / o.steps,
      peakRssBytes: process.resourceUsage().maxRSS * 1024,
      steps: o.steps,
      warmup,
      decode: o.decode,
      threads: context.currentThreads,
      contextSize: context.contextSize,
      batchSize: context.batchSize,
      flashAttention: context.flashAttention,
      kvCacheType: [context.kvCacheKeyType, context.kvCacheValueType],
      ...info,
      llamaCppLog: [...llamaLog.slice(0, loadLogEnd), ...llamaLog.slice(logStart)],
      ...(check ? { check } : {}),
    };
    return result;
  } finally {
    await sequence.dispose?.();
    await context.dispose();
  }
}

async function runInProcess(o) {
  const env = await loadModel(o);
  try {
    for (const C of o.contexts) {
      const r = await runContext(o, env, C);
      process.stdout.write(JSON.stringify(r) + '\n');
    }
  } finally {
    await env.model.dispose();
    await env.llama.dispose?.();
  }
}

function runChildren(o, argv) {
  const self = fileURLToPath(import.meta.url);
  // the same arguments, one context each, as a child
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--context') { i++; continue; }
    if (argv[i] === '--in-process') continue;
    rest.push(argv[i]);
  }
  let failed = false;
  for (const C of o.contexts) {
    const res = spawnSync(process.execPath, [self, '--child', '--context', String(C), ...rest], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      maxBuffer: 1 << 24,
    });
    const line = (res.stdout || '').split('\n').filter((l) => l.startsWith('{"impl"')).pop();
    if (res.status !== 0 || !line) {
      process.stderr.write(`llamacpp-bench: context ${C} failed (exit ${res.status}${res.signal ? `, ${res.signal}` : ''})\n${res.stdout || ''}`);
      failed = true;
      continue;
    }
    process.stdout.write(line + '\n');
  }
  if (failed) process.exitCode = 1;
}

async function main() {
  const argv = process.argv.slice(2);
  const o = parseArgs(argv);
  if (o.info) {
    // load only (no evaluation): what llama.cpp made of the file
    const env = await loadModel(o);
    process.stdout.write(JSON.stringify({ model: o.name, file: o.model, ...env.info, llamaCppLog: env.llamaLog }) + '\n');
    await env.model.dispose();
    return;
  }
  if (o.child || o.inProcess || o.contexts.length === 1) await runInProcess(o);
  else runChildren(o, argv);
}

main().catch((e) => {
  console.error(`llamacpp-bench: ${e.stack || e.message}`);
  process.exit(1);
});
