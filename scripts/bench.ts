// `npm run bench` / `retnet bench [decode|train|kernels|all]`: throughput and memory of the
// native core on random-weight presets, with the machine's limits measured in the same run.
// Each decode/train configuration runs in its own child process so its peak RSS is its own.
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

import { RetNet } from '../lib';
import { dims, parameterShapes, resolveConfig, type RetNetConfig } from '../lib/config';
import { buildInfo } from '../lib/info';
import { WEIGHT_FORMATS, addon, type Precision, type TrainMode, type WeightFormat } from '../lib/native';
import { Sampler, type SamplingOptions } from '../lib/sampling';

export const PRESETS: Record<string, Partial<RetNetConfig> & { vocab_size: number }> = {
  // The byte-level model `npm start` trains.
  brown: { vocab_size: 256, decoder_embed_dim: 256, decoder_value_embed_dim: 512, decoder_retention_heads: 2, decoder_ffn_embed_dim: 512, decoder_layers: 4 },
  tiny: { vocab_size: 256, decoder_embed_dim: 64, decoder_value_embed_dim: 128, decoder_retention_heads: 2, decoder_ffn_embed_dim: 128, decoder_layers: 2, activation_fn: 'swish' },
  base: { vocab_size: 32000, decoder_embed_dim: 512, decoder_value_embed_dim: 864, decoder_retention_heads: 2, decoder_ffn_embed_dim: 864, decoder_layers: 6, activation_fn: 'swish', no_scale_embedding: false },
  medium: { vocab_size: 32000, decoder_embed_dim: 1024, decoder_value_embed_dim: 1728, decoder_retention_heads: 4, decoder_ffn_embed_dim: 1728, decoder_layers: 16, activation_fn: 'swish', no_scale_embedding: false },
};

export interface DecodeFigure {
  preset: string;
  weights: WeightFormat;
  batch: number;
  context: number;
  prefillTokensPerSecond: number;
  tokensPerSecond: number;
  msPerToken: number;
  stepBytes: number;
  /** DRAM read bandwidth at the time of the timed steps: the better of a probe just before the
   * figure's child starts and one in the child right after its steps (this VM's bandwidth
   * swings within minutes, so the fraction is taken against readings of that moment). */
  bandwidthGBps: number;
  rooflineFraction: number;
  peakRssBytes: number;
}

/**
 * Batch-1 decode after the shortest and the longest context, timed in one process in
 * alternating blocks of steps: separate children see the machine at different moments, and
 * its bandwidth drifts more between them than the context changes a step.
 */
export interface ContextFigure {
  preset: string;
  weights: WeightFormat;
  shortContext: number;
  longContext: number;
  rounds: number;
  stepsPerRound: number;
  /** Medians over the rounds. */
  shortMsPerToken: number;
  longMsPerToken: number;
  /** Tokens/s after the long context over tokens/s after the short one: the median of the rounds' ratios. */
  longOverShort: number;
}

/**
 * Decode steps called one at a time (session.step, as `decode` times them) against the same
 * steps in native decode runs (model.decodeRun, as generate() takes them: each row's token
 * drawn greedily on the worker and fed back, no trip through JS between steps), after the
 * shortest context, in alternating blocks in one process and against the same probes.
 */
export interface RunFigure {
  preset: string;
  weights: WeightFormat;
  batch: number;
  context: number;
  rounds: number;
  stepsPerRound: number;
  /** Medians over the rounds. */
  callMsPerStep: number;
  runMsPerStep: number;
  /** Run tokens/s over called steps' tokens/s: the median of the rounds' ratios. */
  runOverCall: number;
  stepBytes: number;
  /** The better of probes just before the figure's child and in it after its steps. */
  bandwidthGBps: number;
  callRooflineFraction: number;
  runRooflineFraction: number;
}

/**
 * End to end: `concurrency` model.generate() calls at once through the scheduler (batched
 * steps, native sampling with generate's defaults, text decoding), each `maxTokens` tokens
 * after a short prompt. Against the step-only figure it shows what serving adds to a step.
 */
export interface GenerateFigure {
  preset: string;
  weights: WeightFormat;
  concurrency: number;
  promptTokens: number;
  maxTokens: number;
  /** Generated tokens over the wall time, prefills included; the median of 3 rounds. */
  tokensPerSecond: number;
  /**
   * The same model's bare steps at batch `concurrency` (session.step, one logits buffer), in
   * rounds alternating with the generate() rounds: tokens/s, the median of 3.
   */
  stepsTokensPerSecond: number;
  /** generate() over the bare steps: the median of the rounds' ratios (what serving costs). */
  againstSteps: number;
}

/**
 * A turn on a live session: a short prompt prefilled into a batch-1 session that already holds
 * `context` tokens, timed to its next-token logits. That is the time to first token of a chat
 * turn, or of a request whose prompt the prefix cache mostly held.
 */
export interface TurnFigure {
  preset: string;
  weights: WeightFormat;
  context: number;
  promptTokens: number;
  rounds: number;
  /** The prefill call's median over the rounds (every prompt length each round, in turn). */
  msToLogits: number;
  /** A decode step's median in the same rounds: the least a one-token turn could take. */
  stepMs: number;
}

export interface TrainFigure {
  preset: string;
  mode: 'parallel' | 'chunkwise';
  precision: Precision;
  checkpointActivations: boolean;
  batch: number;
  seqLen: number;
  chunkSize: number;
  tokensPerSecond: number;
  peakRssBytes: number;
}

export interface SamplingFigure {
  options: SamplingOptions;
  vocabSize: number;
  msPerToken: number;
}

export interface KernelFigure {
  kernel: string;
  shape: string;
  gflops: number;
  fractionOfPeak: number;
  /** Decode products: weight bytes read per second (each product reads its weight from memory). */
  weightGBps?: number;
}

interface Options {
  what: 'decode' | 'train' | 'kernels' | 'all';
  presets: string[];
  weights: WeightFormat[];
  batches: number[];
  contexts: number[];
  trainShapes: Array<[number, number]>;
  trainModes: TrainMode[];
  checkpointing: boolean[];
  precisions: Precision[];
  steps: number;
  chunkSize: number;
  json?: string;
  plot?: string;
  help?: boolean;
}

const USAGE = `usage: retnet bench [decode|train|kernels|all] [--preset base,medium] [--weights f32,bf16,int8] [--batch 1,4,16,64]
  [--context 512,2048,8192,16384] [--train-shapes 4x512,1x2048,1x8192] [--train-modes parallel,chunkwise]
  [--checkpointing off,on] [--precision fp32,bf16] [--steps 64] [--chunk-size 128]
  [--json FILE] [--plot FILE.svg]`;

/** Comma-separated integers in [1, max]. */
function positiveList(value: string, flag: string, max: number): number[] {
  const out = value.split(',').map(Number);
  if (out.some((n) => !Number.isInteger(n) || n < 1 || n > max)) throw new Error(`${flag} takes comma-separated integers in [1, ${max}]`);
  return out;
}

/** The bench runs for minutes to hours before it writes its files: their directories are checked first. */
export function checkOutputPath(file: string, flag: string): void {
  const dir = path.dirname(path.resolve(file));
  try {
    if (!fs.statSync(dir).isDirectory()) throw new Error('not a directory');
    fs.accessSync(dir, fs.constants.W_OK);
  } catch (e) {
    throw new Error(`${flag}: cannot write ${file} (${dir}: ${(e as Error).message})`);
  }
  if (fs.statSync(file, { throwIfNoEntry: false })?.isDirectory()) throw new Error(`${flag}: ${file} is a directory; give a file name`);
}

export function parseBenchArgs(argv: string[]): Options {
  const o: Options = {
    what: 'all',
    presets: ['base'],
    weights: ['f32'],
    batches: [1, 4, 16, 64],
    contexts: [512, 2048, 8192, 16384],
    trainShapes: [
      [4, 512],
      [1, 2048],
      [1, 8192],
    ],
    trainModes: ['parallel', 'chunkwise'],
    checkpointing: [false],
    precisions: ['fp32', 'bf16'],
    steps: 64,
    chunkSize: 128,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === 'decode' || arg === 'train' || arg === 'kernels' || arg === 'all') {
      o.what = arg;
      continue;
    }
    if (arg === '--help' || arg === '-h') {
      o.help = true;
      continue;
    }
    const value = argv[++i];
    if (value === undefined) throw new Error(`${arg} needs a value\n${USAGE}`);
    switch (arg) {
      case '--preset':
        o.presets = value.split(',');
        for (const p of o.presets) if (!Object.hasOwn(PRESETS, p)) throw new Error(`--preset: unknown preset ${p} (${Object.keys(PRESETS).join(', ')})`);
        break;
      case '--weights':
        o.weights = value.split(',') as WeightFormat[];
        for (const w of o.weights) if (!WEIGHT_FORMATS.includes(w)) throw new Error(`--weights: unknown format ${w} (${WEIGHT_FORMATS.join(', ')})`);
        break;
      case '--batch':
        o.batches = positiveList(value, arg, 4096);
        break;
      case '--context':
        o.contexts = positiveList(value, arg, 1 << 20);
        break;
      case '--train-shapes':
        o.trainShapes = value.split(',').map((s) => {
          const [b, t] = s.split('x').map(Number);
          if (!Number.isInteger(b) || !Number.isInteger(t) || b < 1 || t < 2) throw new Error(`--train-shapes: bad shape ${s} (BxT)`);
          return [b, t] as [number, number];
        });
        break;
      case '--train-modes':
        o.trainModes = value.split(',') as TrainMode[];
        for (const m of o.trainModes) if (m !== 'parallel' && m !== 'chunkwise') throw new Error(`--train-modes: unknown mode ${m} (parallel, chunkwise)`);
        break;
      case '--checkpointing':
        o.checkpointing = value.split(',').map((v) => {
          if (v !== 'off' && v !== 'on') throw new Error(`--checkpointing: ${v} is not off or on`);
          return v === 'on';
        });
        break;
      case '--precision':
        o.precisions = value.split(',') as Precision[];
        for (const p of o.precisions) if (p !== 'fp32' && p !== 'bf16') throw new Error(`--precision: unknown precision ${p} (fp32, bf16)`);
        break;
      case '--steps':
        o.steps = positiveList(value, arg, 1 << 20)[0];
        break;
      case '--chunk-size':
        o.chunkSize = positiveList(value, arg, 1 << 20)[0];
        break;
      case '--json':
        o.json = value;
        break;
      case '--plot':
        o.plot = value;
        break;
      default:
        throw new Error(`unknown argument ${arg}\n${USAGE}`);
    }
  }
  return o;
}

function seconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

/**
 * Bytes one decode step must read: every layer's weights and the output projection (in the
 * decode format), one fp32 embedding row per sequence, and the state (read and written).
 */
export function decodeStepBytes(config: RetNetConfig, batch: number, weights: WeightFormat = 'f32'): number {
  const d = dims(config);
  const stateFloats = d.L * d.H * d.dv * d.dk;
  const bytesPerWeight = weights === 'f32' ? 4 : weights === 'bf16' ? 2 : 1;
  return bytesPerWeight * stepWeightCount(config) + 4 * (batch * d.D + 2 * batch * stateFloats);
}

/** Weights a token passes through: every layer's and the output projection (not the embedding). */
export function stepWeightCount(config: RetNetConfig): number {
  let count = 0;
  for (const [name, shape] of parameterShapes(config)) {
    if (name === 'embed_tokens.weight' || name.startsWith('retnet_rel_pos')) continue;
    count += shape.reduce((a, b) => a * b, 1);
  }
  return count;
}

/**
 * The sampler's time per token (native, on the JS thread between decode steps), on logits spread
 * evenly over [-4, 4): flatter than a trained model's, so top-p keeps many candidates.
 */
function samplingFigures(vocabSize: number): SamplingFigure[] {
  const logits = new Float32Array(vocabSize);
  let state = 1;
  for (let i = 0; i < vocabSize; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    logits[i] = (state / 2 ** 32) * 8 - 4;
  }
  const history = [1, 2, 3];
  const cases: SamplingOptions[] = [{ temperature: 0 }, {}, { topK: 40 }, { topP: 0.9 }, { topK: 40, topP: 0.95, repetitionPenalty: 1.1 }];
  return cases.map((options) => {
    const sampler = new Sampler({ ...options, seed: 1 });
    for (let i = 0; i < 5; i++) sampler.sample(logits, history);
    const draws = 100;
    const start = process.hrtime.bigint();
    for (let i = 0; i < draws; i++) sampler.sample(logits, history);
    return { options, vocabSize, msPerToken: (seconds(start) * 1000) / draws };
  });
}

/** The middle value (the upper one of an even count). */
function median(a: number[]): number {
  return a.slice().sort((x, y) => x - y)[a.length >> 1];
}

/** The floor (the step's bytes at the probed bandwidth) over the step's measured time. */
function rooflineFraction(stepBytes: number, bandwidthGBps: number, stepSeconds: number): number {
  return stepBytes / (bandwidthGBps * 1e9) / stepSeconds;
}

/** One decode configuration, in this process (a child of the bench). */
async function runDecode(
  preset: string,
  weights: WeightFormat,
  batch: number,
  context: number,
  steps: number,
  chunkSize: number,
): Promise<DecodeFigure> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1, weights });
  const V = model.config.vocab_size;
  const session = model.createSession({ batch });
  const prompt = Array.from({ length: batch }, (_, b) => Array.from({ length: context }, (_, t) => (t * 7 + b * 31) % V));
  let start = process.hrtime.bigint();
  await session.prefill(prompt, { mode: 'chunkwise', chunkSize });
  const prefillSeconds = seconds(start);
  const ids = Array.from({ length: batch }, (_, b) => (b * 13 + 1) % V);
  // One logits buffer for every step, as generate() does.
  const logits = new Float32Array(batch * V);
  for (let i = 0; i < 4; i++) await session.step(ids, { logits });
  start = process.hrtime.bigint();
  for (let i = 0; i < steps; i++) await session.step(ids, { logits });
  const stepSeconds = seconds(start) / steps;
  const stepBytes = decodeStepBytes(model.config, batch, weights);
  // Read before the probe, whose buffer would count in it.
  const peakRssBytes = process.resourceUsage().maxRSS * 1024;
  const bandwidth = await addon().benchKernel('bandwidth', { megabytes: 256, reps: 5 });
  session.dispose();
  model.dispose();
  return {
    preset,
    weights,
    batch,
    context,
    prefillTokensPerSecond: (batch * context) / prefillSeconds,
    tokensPerSecond: batch / stepSeconds,
    msPerToken: stepSeconds * 1000,
    stepBytes,
    bandwidthGBps: bandwidth,
    rooflineFraction: rooflineFraction(stepBytes, bandwidth, stepSeconds),
    peakRssBytes,
  };
}

/** See RunFigure: the same prompt in a batch-`batch` session and in `batch` batch-1 states. */
async function runRuns(preset: string, weights: WeightFormat, batch: number, context: number, steps: number, chunkSize: number): Promise<RunFigure> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1, weights });
  const native = model.native();
  const V = model.config.vocab_size;
  const prompt = Array.from({ length: batch }, (_, b) => Array.from({ length: context }, (_, t) => (t * 7 + b * 31) % V));
  const session = model.createSession({ batch });
  await session.prefill(prompt, { mode: 'chunkwise', chunkSize });
  const states = prompt.map(() => native.createState(1));
  await native.prefillBatch(states, Int32Array.from(prompt.flat()), new Int32Array(batch).fill(context), 'chunkwise', chunkSize, states.map(() => new Float32Array(V)));
  const ids = Array.from({ length: batch }, (_, b) => (b * 13 + 1) % V);
  const logits = new Float32Array(batch * V);
  const greedy = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };
  const samplers = ids.map((_, b) => new (addon().NativeSampler)(greedy, b));
  const sampling = { samplers, histories: ids.map(() => new Int32Array(0)), vocab: new Int32Array(batch).fill(V) };
  const noStops = ids.map(() => new Int32Array(0));
  const rounds = 8;
  const stepsPerRound = Math.max(16, Math.ceil(steps / 2));
  const blocks = {
    call: async (): Promise<void> => {
      for (let i = 0; i < stepsPerRound; i++) await session.step(ids, { logits });
    },
    run: async (): Promise<void> => {
      const maxSteps = new Int32Array(batch).fill(stepsPerRound);
      await native.decodeRun(states, Int32Array.from(ids), sampling, maxSteps, noStops, stepsPerRound, () => undefined).done;
    },
  };
  const ms = { call: [] as number[], run: [] as number[] };
  await blocks.call();
  await blocks.run();
  for (let r = 0; r < rounds; r++) {
    for (const which of r % 2 ? (['run', 'call'] as const) : (['call', 'run'] as const)) {
      const start = process.hrtime.bigint();
      await blocks[which]();
      ms[which].push((seconds(start) * 1000) / stepsPerRound);
    }
  }
  const bandwidthGBps = await addon().benchKernel('bandwidth', { megabytes: 256, reps: 5 });
  session.dispose();
  for (const state of states) state.dispose();
  model.dispose();
  const stepBytes = decodeStepBytes(model.config, batch, weights);
  const [callMsPerStep, runMsPerStep] = [median(ms.call), median(ms.run)];
  return {
    preset,
    weights,
    batch,
    context,
    rounds,
    stepsPerRound,
    callMsPerStep,
    runMsPerStep,
    runOverCall: median(ms.call.map((call, r) => call / ms.run[r])),
    stepBytes,
    bandwidthGBps,
    callRooflineFraction: rooflineFraction(stepBytes, bandwidthGBps, callMsPerStep / 1000),
    runRooflineFraction: rooflineFraction(stepBytes, bandwidthGBps, runMsPerStep / 1000),
  };
}

/** See ContextFigure: one model, a session per context, blocks of steps taken in turn. */
async function runContexts(preset: string, weights: WeightFormat, shortContext: number, longContext: number, steps: number, chunkSize: number): Promise<ContextFigure> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1, weights });
  const V = model.config.vocab_size;
  const sessions = [];
  for (const context of [shortContext, longContext]) {
    const session = model.createSession({ batch: 1 });
    await session.prefill([Array.from({ length: context }, (_, t) => (t * 7) % V)], { mode: 'chunkwise', chunkSize });
    sessions.push(session);
  }
  const logits = new Float32Array(V);
  const rounds = 30;
  const stepsPerRound = Math.max(16, Math.ceil(steps / 4));
  const ms: number[][] = [[], []];
  for (let r = 0; r < rounds; r++) {
    // Each round swaps which context goes first.
    for (const which of r % 2 ? [1, 0] : [0, 1]) {
      for (let i = 0; i < 2; i++) await sessions[which].step([1], { logits });
      const start = process.hrtime.bigint();
      for (let i = 0; i < stepsPerRound; i++) await sessions[which].step([1], { logits });
      ms[which].push((seconds(start) * 1000) / stepsPerRound);
    }
  }
  for (const session of sessions) session.dispose();
  model.dispose();
  const [shortMsPerToken, longMsPerToken] = ms.map(median);
  // Per round, so that drift between rounds cancels.
  const longOverShort = median(ms[0].map((short, r) => short / ms[1][r]));
  return { preset, weights, shortContext, longContext, rounds, stepsPerRound, shortMsPerToken, longMsPerToken, longOverShort };
}

const TURN_PROMPT_TOKENS = [1, 4, 16, 64];

/** See TurnFigure: one session, every prompt length and a step per round, the order turning. */
async function runTurns(preset: string, weights: WeightFormat, context: number, chunkSize: number): Promise<TurnFigure[]> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1, weights });
  const V = model.config.vocab_size;
  const session = model.createSession({ batch: 1 });
  await session.prefill([Array.from({ length: context }, (_, t) => (t * 7) % V)], { mode: 'chunkwise', chunkSize });
  const logits = new Float32Array(V);
  const rounds = 9;
  const ms = TURN_PROMPT_TOKENS.map((): number[] => []);
  const stepMs: number[] = [];
  for (let r = 0; r < rounds; r++) {
    for (let j = 0; j < TURN_PROMPT_TOKENS.length; j++) {
      const i = (j + r) % TURN_PROMPT_TOKENS.length;
      const prompt = Array.from({ length: TURN_PROMPT_TOKENS[i] }, (_, t) => (t * 11 + r) % V);
      const start = process.hrtime.bigint();
      await session.prefill([prompt], { mode: 'chunkwise', chunkSize });
      ms[i].push(seconds(start) * 1000);
    }
    const start = process.hrtime.bigint();
    await session.step([1], { logits });
    stepMs.push(seconds(start) * 1000);
  }
  session.dispose();
  model.dispose();
  return TURN_PROMPT_TOKENS.map((promptTokens, i) => ({
    preset,
    weights,
    context,
    promptTokens,
    rounds,
    msToLogits: median(ms[i]),
    stepMs: median(stepMs),
  }));
}

const GENERATE_PROMPT_TOKENS = 16;

/** See GenerateFigure. */
async function runGenerate(preset: string, weights: WeightFormat, concurrency: number, maxTokens: number): Promise<GenerateFigure> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1, weights });
  const V = model.config.vocab_size;
  const round = async (): Promise<number> => {
    const start = process.hrtime.bigint();
    let tokens = 0;
    await Promise.all(
      Array.from({ length: concurrency }, async (_, r) => {
        const prompt = Array.from({ length: GENERATE_PROMPT_TOKENS }, (_, t) => (t * 7 + r * 31) % V);
        const stream = model.generate(prompt, { maxTokens, seed: r });
        for (let next = await stream.next(); !next.done; next = await stream.next()) tokens++;
      }),
    );
    return tokens / seconds(start);
  };
  const session = model.createSession({ batch: concurrency });
  await session.prefill(Array.from({ length: concurrency }, (_, r) => Array.from({ length: GENERATE_PROMPT_TOKENS }, (_, t) => (t * 7 + r * 31) % V)));
  const ids = Array.from({ length: concurrency }, (_, r) => (r * 13 + 1) % V);
  const logits = new Float32Array(concurrency * V);
  const stepsRound = async (): Promise<number> => {
    const start = process.hrtime.bigint();
    for (let i = 0; i < maxTokens; i++) await session.step(ids, { logits });
    return (concurrency * maxTokens) / seconds(start);
  };
  await round();
  await stepsRound();
  const rates: number[] = [];
  const stepRates: number[] = [];
  // Alternating, so both see the machine at the same moments (its bandwidth drifts).
  for (let r = 0; r < 3; r++) {
    rates.push(await round());
    stepRates.push(await stepsRound());
  }
  session.dispose();
  model.dispose();
  return {
    preset,
    weights,
    concurrency,
    promptTokens: GENERATE_PROMPT_TOKENS,
    maxTokens,
    tokensPerSecond: median(rates),
    stepsTokensPerSecond: median(stepRates),
    againstSteps: median(rates.map((rate, r) => rate / stepRates[r])),
  };
}

/** One training configuration: forward + backward + AdamW per step, in this process. */
async function runTrain(
  preset: string,
  mode: TrainMode,
  precision: Precision,
  batch: number,
  seqLen: number,
  chunkSize: number,
  checkpointActivations: boolean,
): Promise<TrainFigure> {
  const model = await RetNet.create(PRESETS[preset], { seed: 1 });
  const V = model.config.vocab_size;
  const tokens = Int32Array.from({ length: batch * seqLen }, (_, i) => (i * 7919) % V);
  const native = model.native();
  const opts = { mode, chunkSize, lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, clipNorm: 1, noDecay: [], seed: 1, checkpointActivations, precision };
  const micro = [{ tokens, batch, length: seqLen, targets: null, mask: null }];
  await native.trainStep(micro, opts); // warm-up: allocations, page faults
  const reps = seqLen * batch >= 8192 ? 1 : 2;
  const start = process.hrtime.bigint();
  for (let i = 0; i < reps; i++) await native.trainStep(micro, opts);
  const perStep = seconds(start) / reps;
  model.dispose();
  return { preset, mode, precision, checkpointActivations, batch, seqLen, chunkSize, tokensPerSecond: (batch * seqLen) / perStep, peakRssBytes: process.resourceUsage().maxRSS * 1024 };
}

/** The figure's roofline against the better of its own probe and one taken before its child. */
function againstBetterProbe(f: DecodeFigure, probeBeforeGBps: number): DecodeFigure {
  const bandwidthGBps = Math.max(f.bandwidthGBps, probeBeforeGBps);
  return { ...f, bandwidthGBps, rooflineFraction: rooflineFraction(f.stepBytes, bandwidthGBps, f.msPerToken / 1000) };
}

/** Runs one configuration in a fresh node process and parses its JSON line. */
function inChild<T>(args: string[]): T {
  const out = execFileSync(process.execPath, [__filename, '--child', ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 20 });
  return JSON.parse(out.trim().split('\n').pop()!) as T;
}

async function kernels(presets: string[], peak: number): Promise<KernelFigure[]> {
  const native = addon();
  const figures: KernelFigure[] = [];
  for (const preset of presets) {
    const c = resolveConfig(PRESETS[preset]);
    const d = dims(c);
    for (const M of [512, 2048]) {
      for (const [N, K, what] of [
        [d.D, d.D, 'q/k'],
        [d.Dv, d.D, 'v/g'],
        [d.D, d.Dv, 'out'],
        [d.F, d.D, 'fc1/gate'],
        [d.D, d.F, 'fc2'],
        [d.V, d.D, 'logits'],
      ] as Array<[number, number, string]>) {
        const s = await native.benchKernel('linear', { M, N, K, reps: 3 });
        const gflops = (2 * M * N * K) / s / 1e9;
        figures.push({ kernel: `linear ${what}`, shape: `${preset} M=${M} N=${N} K=${K}`, gflops, fractionOfPeak: gflops / peak });
      }
    }
    // Decode products (linear_rowwise) at batch 1, 4 and 16: the weight streams from memory
    // once per step, so batch 1 is bound by bandwidth and larger batches by arithmetic.
    for (const [N, K, what] of [
      [d.D, d.D, 'q/k'],
      [d.F, d.D, 'fc1/gate'],
    ] as Array<[number, number, string]>) {
      for (const M of [1, 4, 16]) {
        const s = await native.benchKernel('decode_product', { M, N, K, reps: 3 });
        const gflops = (2 * M * N * K) / s / 1e9;
        figures.push({
          kernel: `decode ${what}`, shape: `${preset} batch=${M} N=${N} K=${K}`, gflops, fractionOfPeak: gflops / peak,
          weightGBps: (4 * N * K) / s / 1e9,
        });
      }
    }
    for (const [T, parallel] of [
      [2048, true],
      [2048, false],
      [8192, false],
    ] as Array<[number, boolean]>) {
      const chunk = parallel ? T : 128;
      const s = await native.benchKernel('retention', { B: 1, T, H: d.H, dk: d.dk, dv: d.dv, chunk, parallel, reps: 2 });
      // Useful multiply-adds: causal scores and their product with v inside each chunk, plus the cross-chunk terms.
      const inner = (T * (chunk + 1)) / 2;
      const cross = parallel ? 0 : 2 * T * d.dk * d.dv;
      const flops = d.H * (2 * inner * (d.dk + d.dv) + cross);
      const gflops = flops / s / 1e9;
      figures.push({ kernel: `retention ${parallel ? 'parallel' : 'chunkwise'}`, shape: `${preset} T=${T} H=${d.H} dk=${d.dk} dv=${d.dv} C=${chunk}`, gflops, fractionOfPeak: gflops / peak });
    }
  }
  return figures;
}

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(0)} MiB`;

async function plot(file: string, decode: DecodeFigure[], train: TrainFigure[]): Promise<void> {
  // vega and vega-lite are ES modules; keep a real dynamic import through the CommonJS build.
  const load = new Function('m', 'return import(m)') as (m: string) => Promise<any>;
  let vega: any;
  let vl: any;
  try {
    [vega, vl] = await Promise.all([load('vega'), load('vega-lite')]);
  } catch {
    throw new Error('--plot needs the packages vega and vega-lite (npm install vega vega-lite)');
  }
  const series = (f: DecodeFigure) => `${f.preset} ${f.weights} b${f.batch}`;
  const decodeRows = decode.map((f) => ({ ...f, series: series(f), peakRssMiB: f.peakRssBytes / 2 ** 20 }));
  const trainRows = train.map((f) => ({ ...f, series: `${f.preset} ${f.mode} ${f.precision} b${f.batch}${f.checkpointActivations ? ' ckpt' : ''}`, peakRssMiB: f.peakRssBytes / 2 ** 20 }));
  const line = (title: string, values: object[], x: string, xTitle: string, y: string, yTitle: string) => ({
    title,
    width: 320,
    height: 200,
    data: { values },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: x, type: 'quantitative', title: xTitle, scale: { type: 'log', base: 2 } },
      y: { field: y, type: 'quantitative', title: yTitle },
      color: { field: 'series', type: 'nominal', title: null },
    },
  });
  const spec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    resolve: { scale: { color: 'independent' } },
    vconcat: [
      {
        hconcat: [
          line('Decode: ms per step vs context', decodeRows, 'context', 'context (tokens)', 'msPerToken', 'ms / step'),
          line('Decode: peak RSS vs context', decodeRows, 'context', 'context (tokens)', 'peakRssMiB', 'MiB'),
        ],
      },
      {
        hconcat: [
          line('Training: tokens/s vs sequence length', trainRows, 'seqLen', 'sequence length', 'tokensPerSecond', 'tokens / s'),
          line('Training: peak RSS vs sequence length', trainRows, 'seqLen', 'sequence length', 'peakRssMiB', 'MiB'),
        ],
      },
    ],
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  fs.writeFileSync(file, await view.toSVG());
}

export async function main(argv: string[]): Promise<void> {
  if (argv[0] === '--child') {
    const [, kind, ...rest] = argv;
    const result =
      kind === 'decode'
        ? await runDecode(rest[0], rest[1] as WeightFormat, Number(rest[2]), Number(rest[3]), Number(rest[4]), Number(rest[5]))
        : kind === 'contexts'
          ? await runContexts(rest[0], rest[1] as WeightFormat, Number(rest[2]), Number(rest[3]), Number(rest[4]), Number(rest[5]))
          : kind === 'generate'
            ? await runGenerate(rest[0], rest[1] as WeightFormat, Number(rest[2]), Number(rest[3]))
            : kind === 'runs'
              ? await runRuns(rest[0], rest[1] as WeightFormat, Number(rest[2]), Number(rest[3]), Number(rest[4]), Number(rest[5]))
              : kind === 'turns'
                ? await runTurns(rest[0], rest[1] as WeightFormat, Number(rest[2]), Number(rest[3]))
                : await runTrain(rest[0], rest[1] as TrainMode, rest[2] as Precision, Number(rest[3]), Number(rest[4]), Number(rest[5]), rest[6] === 'on');
    process.stdout.write(JSON.stringify(result) + '\n');
    return;
  }
  const o = parseBenchArgs(argv);
  if (o.help) {
    console.log(USAGE);
    return;
  }
  if (o.json) checkOutputPath(o.json, '--json');
  if (o.plot) checkOutputPath(o.plot, '--plot');
  const info = buildInfo();
  const native = addon();
  const bandwidth = await native.benchKernel('bandwidth', { megabytes: 1024, reps: 5 });
  const peak = await native.benchKernel('fma_peak', { reps: 3 });
  console.log(`retnet bench: ${info.threads} threads, gemm ${info.gemm}; measured DRAM read ${bandwidth.toFixed(1)} GB/s, FMA peak ${peak.toFixed(0)} GFLOP/s`);
  const decode: DecodeFigure[] = [];
  const contexts: ContextFigure[] = [];
  const generate: GenerateFigure[] = [];
  const runs: RunFigure[] = [];
  const turns: TurnFigure[] = [];
  let sampling: SamplingFigure[] = [];
  const train: TrainFigure[] = [];
  let kernelFigures: KernelFigure[] = [];
  if (o.what === 'decode' || o.what === 'all') {
    console.log('\ndecode (prefill chunkwise, then recurrent steps; random weights)');
    for (const preset of o.presets) {
      for (const weights of o.weights) {
        for (const batch of o.batches) {
          for (const context of o.contexts) {
            const probeBefore = await native.benchKernel('bandwidth', { megabytes: 256, reps: 5 });
            const f = againstBetterProbe(
              inChild<DecodeFigure>(['decode', preset, weights, String(batch), String(context), String(o.steps), String(o.chunkSize)]),
              probeBefore,
            );
            decode.push(f);
            console.log(
              `${preset.padEnd(7)} ${weights.padEnd(4)} b=${String(batch).padStart(2)} ctx=${String(context).padStart(5)}  prefill ${f.prefillTokensPerSecond.toFixed(0).padStart(6)} tok/s` +
                `  decode ${f.msPerToken.toFixed(2).padStart(7)} ms/step ${f.tokensPerSecond.toFixed(1).padStart(7)} tok/s` +
                `  roofline ${(100 * f.rooflineFraction).toFixed(0).padStart(3)}% of ${(f.stepBytes / 1e6).toFixed(0)} MB/step at ${f.bandwidthGBps.toFixed(1)} GB/s  peak RSS ${mib(f.peakRssBytes)}`,
            );
          }
        }
        const shortContext = Math.min(...o.contexts);
        const longContext = Math.max(...o.contexts);
        if (o.batches.includes(1) && longContext > shortContext) {
          const f = inChild<ContextFigure>(['contexts', preset, weights, String(shortContext), String(longContext), String(o.steps), String(o.chunkSize)]);
          contexts.push(f);
          console.log(
            `${preset.padEnd(7)} ${weights.padEnd(4)} b= 1 ctx ${longContext} against ${shortContext}, ${f.rounds} alternating rounds of ${f.stepsPerRound} steps in one process:` +
              ` ${f.longMsPerToken.toFixed(2)} against ${f.shortMsPerToken.toFixed(2)} ms/step (medians), tokens/s ${f.longOverShort.toFixed(3)}x (median of the rounds' ratios)`,
          );
        }
        if (o.batches.includes(1)) {
          const figures = inChild<TurnFigure[]>(['turns', preset, weights, String(shortContext), String(o.chunkSize)]);
          turns.push(...figures);
          console.log(
            `${preset.padEnd(7)} ${weights.padEnd(4)} turns on a session at ${shortContext} tokens: next-token logits after ` +
              `${figures.map((f) => f.promptTokens).join(' / ')} prompt tokens: ${figures.map((f) => f.msToLogits.toFixed(2)).join(' / ')} ms` +
              ` (medians of ${figures[0].rounds}; a step ${figures[0].stepMs.toFixed(2)} ms)`,
          );
        }
        for (const batch of o.batches) {
          const probeBefore = await native.benchKernel('bandwidth', { megabytes: 256, reps: 5 });
          const child = inChild<RunFigure>(['runs', preset, weights, String(batch), String(shortContext), String(o.steps), String(o.chunkSize)]);
          const bandwidthGBps = Math.max(child.bandwidthGBps, probeBefore);
          const f: RunFigure = {
            ...child,
            bandwidthGBps,
            callRooflineFraction: rooflineFraction(child.stepBytes, bandwidthGBps, child.callMsPerStep / 1000),
            runRooflineFraction: rooflineFraction(child.stepBytes, bandwidthGBps, child.runMsPerStep / 1000),
          };
          runs.push(f);
          console.log(
            `${preset.padEnd(7)} ${weights.padEnd(4)} b=${String(batch).padStart(2)} ctx=${shortContext} steps in a native run against called one by one, ${f.rounds} alternating rounds of ${f.stepsPerRound}:` +
              ` ${f.runMsPerStep.toFixed(2)} against ${f.callMsPerStep.toFixed(2)} ms/step (medians), tokens/s ${f.runOverCall.toFixed(3)}x;` +
              ` roofline ${(100 * f.runRooflineFraction).toFixed(0)}% against ${(100 * f.callRooflineFraction).toFixed(0)}% at ${f.bandwidthGBps.toFixed(1)} GB/s`,
          );
        }
        for (const batch of o.batches) {
          const f = inChild<GenerateFigure>(['generate', preset, weights, String(batch), String(o.steps)]);
          generate.push(f);
          console.log(
            `${preset.padEnd(7)} ${weights.padEnd(4)} generate(): ${String(batch).padStart(2)} concurrent, ${f.promptTokens}-token prompts, ${f.maxTokens} tokens each:` +
              ` ${f.tokensPerSecond.toFixed(1)} tok/s, ${f.againstSteps.toFixed(2)}x the bare b=${batch} steps in alternating rounds (${f.stepsTokensPerSecond.toFixed(1)} tok/s)`,
          );
        }
      }
    }
    sampling = samplingFigures(PRESETS[o.presets[0]].vocab_size);
    console.log(`\nsampling (native on the JS thread, per token, vocab ${sampling[0].vocabSize}, logits uniform in [-4, 4))`);
    for (const f of sampling) console.log(`${JSON.stringify(f.options).padEnd(56)} ${f.msPerToken.toFixed(3).padStart(7)} ms`);
  }
  if (o.what === 'train' || o.what === 'all') {
    const bf16How = info.bf16Dot ? 'on AVX512-BF16' : 'rounded, fp32 arithmetic (no AVX512-BF16)';
    console.log(`\ntrain (forward + backward + AdamW, one step; bf16: the layers' linear products, ${bf16How}; the head stays fp32)`);
    for (const preset of o.presets) {
      for (const [batch, seqLen] of o.trainShapes) {
        for (const mode of o.trainModes) {
          for (const precision of o.precisions) {
            for (const checkpoint of o.checkpointing) {
              const args = [preset, mode, precision, String(batch), String(seqLen), String(o.chunkSize), checkpoint ? 'on' : 'off'];
              const f = inChild<TrainFigure>(['train', ...args]);
              train.push(f);
              const label = `${preset.padEnd(7)} ${mode.padEnd(9)} ${precision} ${batch}x${seqLen}${checkpoint ? ' ckpt' : ''}`;
              console.log(label.padEnd(40) + `${f.tokensPerSecond.toFixed(0).padStart(7)} tok/s  peak RSS ${mib(f.peakRssBytes)}`);
            }
          }
        }
      }
    }
  }
  if (o.what === 'kernels' || o.what === 'all') {
    console.log('\nkernels');
    kernelFigures = await kernels(o.presets, peak);
    for (const k of kernelFigures) {
      const weights = k.weightGBps === undefined ? '' : `  ${k.weightGBps.toFixed(1).padStart(5)} GB/s of weights`;
      console.log(`${k.kernel.padEnd(22)} ${k.shape.padEnd(44)} ${k.gflops.toFixed(1).padStart(7)} GFLOP/s  ${(100 * k.fractionOfPeak).toFixed(0).padStart(3)}% of peak${weights}`);
    }
  }
  if (o.json) {
    const report = { build: info, memoryBandwidthGBps: bandwidth, fmaPeakGflops: peak, decode, contexts, turns, runs, generate, sampling, train, kernels: kernelFigures };
    fs.writeFileSync(o.json, JSON.stringify(report, null, 2) + '\n');
    console.log(`\nwrote ${o.json}`);
  }
  if (o.plot) {
    await plot(o.plot, decode, train);
    console.log(`wrote ${o.plot}`);
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((e: Error) => {
    console.error(`retnet bench: ${e.message}`);
    process.exit(1);
  });
}
