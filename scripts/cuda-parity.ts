// CUDA-vs-CPU parity of the whole model on every fixture in test/data/fixtures: logits of the
// three forms (and against torchscale's files), prefill in each mode (two segments: logits and
// state), decode steps, stepBatch and decodeRun, loss and gradients (also with dropout and drop path), and
// two AdamW steps.
// Used by test/cuda/parity.test.ts (jest) and, without jest, on the GPU machine:
//   node dist/scripts/cuda-parity.js        (prints a table; exit code 1 on any failure)
// The CUDA model's full-sequence products run on the GEMM buildInfo().cudaGemm names (cuBLAS when
// it loads); RETNET_CUDA_GEMM=own|cublas picks one, so each can be checked.
import * as fs from 'fs';
import * as path from 'path';

import { buildInfo } from '../lib/info';
import { RetNet } from '../lib/model';
import { NativeModel, NativeState, addon } from '../lib/native';

export interface ParityRow {
  fixture: string;
  check: string;
  error: number;
  tolerance: number;
}

export const passed = (row: ParityRow): boolean => row.error <= row.tolerance;

// Tolerances (fp32 on both sides; spec §13 suggests the same against torchscale).
const LOGITS_ABS = 2e-5;
const STATE_ABS = 1e-5;
const SCALE_REL = 1e-6;
const LOSS_ABS = 1e-5;
const GRAD_REL = 1e-4;  // max-abs difference / max |g|
const DECODE_STEPS = 8;

/**
 * Prefills a batch-1 state per prompt twice; steps one set in a decode run with greedy draws (ids
 * below `vocab`) and
 * the other one step call at a time with the same draws made here. Returns how many of the
 * drawn tokens differ (0: the run's steps are those of step alone, as stepBatch's are).
 */
export async function decodeRunMismatches(model: NativeModel, vocab: number, prompts: Int32Array[], steps: number, mode: 'chunkwise', chunkSize: number): Promise<number> {
  const greedy = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1 };
  const none = new Int32Array(0);
  const prefilled = (): Promise<NativeState[]> =>
    Promise.all(
      prompts.map(async (p) => {
        const state = model.createState(1);
        await model.prefill(state, p, p.length, mode, chunkSize);
        return state;
      }),
    );
  const [running, alone] = [await prefilled(), await prefilled()];
  const first = Int32Array.from(prompts, (_, i) => i + 1);
  const drawn: Int32Array[] = [];
  await model.decodeRun(
    running,
    first,
    { samplers: prompts.map((_, i) => new (addon().NativeSampler)(greedy, i)), histories: prompts.map(() => none), vocab: Int32Array.from(prompts, () => vocab) },
    Int32Array.from(prompts, () => steps),
    prompts.map(() => none),
    steps,
    (tokens) => drawn.push(tokens.slice()),
  ).done;
  const sampler = new (addon().NativeSampler)(greedy, 0);
  let ids = Array.from(first);
  let mismatches = Math.abs(drawn.length - steps) * prompts.length;
  for (let k = 0; k < Math.min(steps, drawn.length); k++) {
    const logits = await Promise.all(alone.map((state, i) => model.step(state, Int32Array.of(ids[i]))));
    ids = logits.map((l) => sampler.sample(l, none));
    mismatches += ids.filter((t, i) => t !== drawn[k][i]).length;
  }
  for (const state of [...running, ...alone]) state.dispose();
  return mismatches;
}

/** test/data/fixtures, found above this file (scripts/ under ts-jest, dist/scripts/ when compiled). */
export function fixturesDir(): string {
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    const candidate = path.join(dir, 'test', 'data', 'fixtures');
    if (fs.existsSync(candidate)) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('test/data/fixtures not found');
}

export function fixtureNames(): string[] {
  const root = fixturesDir();
  return fs
    .readdirSync(root, { withFileTypes: true })
    .filter((e) => e.isDirectory() && fs.existsSync(path.join(root, e.name, 'config.json')))
    .map((e) => e.name)
    .sort();
}

/** Whether this build can run the CUDA backend, and why not. */
export function cudaAvailability(): { available: boolean; reason: string } {
  const info = buildInfo();
  if (!info.cuda) return { available: false, reason: 'retnet was built without CUDA' };
  if (info.cudaDevices === 0) return { available: false, reason: 'no CUDA device' };
  return { available: true, reason: `${info.cudaDevices} CUDA device(s)` };
}

/** Largest |a_i − b_i|; NaN anywhere counts as infinitely far. */
function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= max)) max = Number.isNaN(d) ? Infinity : d;
  }
  return max;
}

function maxAbs(a: ArrayLike<number>): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]));
  return max;
}

/** max-abs difference relative to the reference's largest magnitude (0 when both are 0). */
function relDiff(got: ArrayLike<number>, want: ArrayLike<number>): number {
  const d = maxAbsDiff(got, want);
  return d === 0 ? 0 : d / maxAbs(want);
}

function readF32(file: string): Float32Array {
  const bytes = fs.readFileSync(file);
  const out = new Float32Array(bytes.byteLength / 4);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  return out;
}

/** Worst relative gradient difference over parameters, named. */
function gradRows(fixture: string, label: string, got: Map<string, Float32Array>, want: Map<string, Float32Array>): ParityRow {
  let worst = 0;
  let worstName = '';
  for (const [name, g] of want) {
    const other = got.get(name);
    const err = other ? relDiff(other, g) : Infinity;
    if (!(err <= worst)) {
      worst = err;
      worstName = name;
    }
  }
  return { fixture, check: `${label} grads${worstName ? ` (worst ${worstName})` : ''}`, error: worst, tolerance: GRAD_REL };
}

function stateRows(fixture: string, label: string, got: NativeState, want: NativeState): ParityRow[] {
  const a = got.exportState();
  const b = want.exportState();
  const positions = a.positions.every((p, i) => p === b.positions[i]) ? 0 : Infinity;
  return [
    { fixture, check: `${label} state kv`, error: maxAbsDiff(a.kv, b.kv), tolerance: STATE_ABS },
    { fixture, check: `${label} state scale (rel)`, error: relDiff(a.scale, b.scale), tolerance: SCALE_REL },
    { fixture, check: `${label} state positions`, error: positions, tolerance: 0 },
  ];
}

/** Every parity check on one fixture. Needs a CUDA device. */
export async function checkFixture(name: string): Promise<ParityRow[]> {
  const dir = path.join(fixturesDir(), name);
  const meta = JSON.parse(fs.readFileSync(path.join(dir, 'meta.json'), 'utf8')) as { chunk_size: number };
  const tokenRows = (JSON.parse(fs.readFileSync(path.join(dir, 'tokens.json'), 'utf8')) as { tokens: number[][] }).tokens;
  const B = tokenRows.length;
  const T = tokenRows[0].length;
  const C = meta.chunk_size;
  const tokens = Int32Array.from(tokenRows.flat());
  const columns = (t0: number, t1: number) => Int32Array.from(tokenRows.flatMap((row) => row.slice(t0, t1)));
  const rows: ParityRow[] = [];
  const add = (check: string, error: number, tolerance: number) => rows.push({ fixture: name, check, error, tolerance });

  const cpuModel = await RetNet.load(dir, { device: 'cpu' });
  const gpuModel = await RetNet.load(dir, { device: 'cuda' });
  const both = [cpuModel.native(), gpuModel.native()] as const;
  const gpu = both[1];
  const weights = cpuModel.stateDict();
  try {
    // Full-sequence logits in each form.
    for (const mode of ['parallel', 'chunkwise', 'recurrent'] as const) {
      const [want, got] = await Promise.all(both.map((m) => m.forward(tokens, B, T, mode, C)));
      add(`forward ${mode} logits`, maxAbsDiff(got, want), LOGITS_ABS);
      add(`forward ${mode} logits vs torchscale`, maxAbsDiff(got, readF32(path.join(dir, `logits_${mode}.f32`))), LOGITS_ABS);
    }

    // Prefill in two segments (the second continues from a non-empty state), then decode steps.
    // Chunkwise and parallel prefill run the chunk kernel for the recurrent form (chunkwise: each
    // segment spans several chunks on every fixture, T/2 >= 2C); recurrent prefill runs steps.
    const half = Math.max(1, Math.floor(T / 2));
    const steps = Math.min(DECODE_STEPS, T - half);
    for (const mode of ['chunkwise', 'parallel', 'recurrent'] as const) {
      const states = both.map((m) => m.createState(B));
      const prefill = async (m: NativeModel, s: NativeState, t0: number, t1: number) => m.prefill(s, columns(t0, t1), t1 - t0, mode, C);
      const first = await Promise.all(both.map((m, i) => prefill(m, states[i], 0, half)));
      add(`prefill ${mode} [0,${half}) logits`, maxAbsDiff(first[1], first[0]), LOGITS_ABS);
      rows.push(...stateRows(name, `prefill ${mode} [0,${half})`, states[1], states[0]));
      const full = both.map((m) => m.createState(B));
      const second = await Promise.all(both.map((m, i) => prefill(m, full[i], 0, half).then(() => prefill(m, full[i], half, T))));
      add(`prefill ${mode} [0,${half})+[${half},${T}) logits`, maxAbsDiff(second[1], second[0]), LOGITS_ABS);
      rows.push(...stateRows(name, `prefill ${mode} two segments`, full[1], full[0]));
      if (mode !== 'chunkwise') continue;

      let stepErr = 0;
      for (let t = half; t < half + steps; t++) {
        const [want, got] = await Promise.all(both.map((m, i) => m.step(states[i], columns(t, t + 1))));
        stepErr = Math.max(stepErr, maxAbsDiff(got, want));
      }
      add(`decode ${steps} steps logits`, stepErr, LOGITS_ABS);
      rows.push(...stateRows(name, `decode ${steps} steps`, states[1], states[0]));

      // One batched step over two sessions at different positions, and the same rows stepped alone.
      const next = Int32Array.from([...columns(half + steps - 1, half + steps), ...columns(T - 1, T)]);
      const batched = await Promise.all(both.map((m, i) => m.stepBatch([states[i].clone(), full[i].clone()], next)));
      add('stepBatch logits', maxAbsDiff(batched[1], batched[0]), LOGITS_ABS);
      const alone = [
        ...(await gpu.step(states[1].clone(), next.subarray(0, B))),
        ...(await gpu.step(full[1].clone(), next.subarray(B))),
      ];
      add('stepBatch = step alone (CUDA, exact)', maxAbsDiff(batched[1], alone), 0);

      // Two batch-1 prompts of different lengths (prefixes of row 0) prefilled in one call, against the CPU's.
      const V = cpuModel.config.vocab_size;
      const lengths = Int32Array.from([half, T - 1]);
      const joined = Int32Array.from([...tokens.subarray(0, half), ...tokens.subarray(0, T - 1)]);
      const batchedPrefill = await Promise.all(
        both.map((m) => m.prefillBatch([m.createState(1), m.createState(1)], joined, lengths, mode, C, [new Float32Array(V), new Float32Array(V)])),
      );
      add('prefillBatch logits', Math.max(...batchedPrefill[1].map((l, i) => maxAbsDiff(l, batchedPrefill[0][i]))), LOGITS_ABS);
      add('decodeRun greedy tokens = step alone (CUDA, mismatches)', await decodeRunMismatches(gpu, V, [tokens.subarray(0, half), tokens.subarray(0, T - 1)], steps, mode, C), 0);
    }

    // Loss and gradients in both training forms.
    for (const mode of ['parallel', 'chunkwise'] as const) {
      const [want, got] = await Promise.all([cpuModel, gpuModel].map((m) => m.lossAndGradients(tokenRows, { mode, chunkSize: C })));
      add(`${mode} loss`, Math.abs(got.loss - want.loss), LOSS_ABS);
      rows.push(gradRows(name, mode, got.grads, want.grads));
    }
  } finally {
    cpuModel.dispose();
    gpuModel.dispose();
  }

  // Dropout and drop path: the same counter-based masks on both backends.
  const dropConfig = { ...cpuModel.config, dropout: 0.1, activation_dropout: 0.1, drop_path_rate: 0.2 };
  const dropped = await Promise.all(
    (['cpu', 'cuda'] as const).map((device) => RetNet.fromStateDict(dropConfig, weights, { device })),
  );
  try {
    const [want, got] = await Promise.all(dropped.map((m) => m.lossAndGradients(tokenRows, { mode: 'chunkwise', chunkSize: C, seed: 7 })));
    add('dropout loss', Math.abs(got.loss - want.loss), LOSS_ABS);
    rows.push(gradRows(name, 'dropout', got.grads, want.grads));

    // Two AdamW steps (eps 1e-3 keeps the update smooth in g, so fp32 gradient noise stays small in it).
    const names = dropped[0].native().paramNames();
    const before = names.map((n) => dropped[0].native().getParam(n));
    const options = {
      mode: 'chunkwise' as const, chunkSize: C, lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-3, weightDecay: 0.1,
      clipNorm: 1.0, noDecay: [], seed: 11,
    };
    const micro = [{ tokens, batch: B, length: T, targets: null, mask: null }];
    for (let step = 1; step <= 2; step++) {
      const [want, got] = await Promise.all(dropped.map((m) => m.native().trainStep(micro, options)));
      add(`trainStep ${step} loss`, Math.abs(got.loss - want.loss), LOSS_ABS);
      add(`trainStep ${step} grad norm (rel)`, Math.abs(got.gradNorm - want.gradNorm) / want.gradNorm, GRAD_REL);
    }
    const [wantState, gotState] = await Promise.all(dropped.map((m) => m.native().readOptimizerState()));
    add('AdamW first moment (rel)', relDiff(gotState.m, wantState.m), GRAD_REL);
    add('AdamW second moment (rel)', relDiff(gotState.v, wantState.v), 2 * GRAD_REL);
    let deltaErr = 0;
    let deltaMax = 0;
    names.forEach((n, i) => {
      const want = dropped[0].native().getParam(n).map((p, j) => p - before[i][j]);
      const got = dropped[1].native().getParam(n).map((p, j) => p - before[i][j]);
      deltaErr = Math.max(deltaErr, maxAbsDiff(got, want));
      deltaMax = Math.max(deltaMax, maxAbs(want));
    });
    // A gradient near 0 moves its weight by ~lr·g/eps, so fp32 noise in g shows up ~(max|g|/eps) larger here.
    add('AdamW parameter updates (rel to max update)', deltaMax === 0 ? deltaErr : deltaErr / deltaMax, 1e-2);
  } finally {
    dropped.forEach((m) => m.dispose());
  }
  return rows;
}

function formatTable(rows: ParityRow[]): string {
  const lines = rows.map((r) => [r.fixture, r.check, r.error.toExponential(2), r.tolerance.toExponential(0), passed(r) ? 'ok' : 'FAIL']);
  const header = ['fixture', 'check', 'error', 'tolerance', ''];
  const widths = header.map((h, c) => Math.max(h.length, ...lines.map((l) => l[c].length)));
  return [header, ...lines].map((l) => l.map((cell, c) => cell.padEnd(widths[c])).join('  ')).join('\n');
}

async function main(): Promise<void> {
  const { available, reason } = cudaAvailability();
  if (!available) {
    console.log(`cuda-parity: skipped (${reason})`);
    return;
  }
  console.log(`cuda-parity: CUDA gemm ${buildInfo().cudaGemm}`);
  // Each fixture's table is printed as soon as it is done, so a crash later still leaves them.
  const rows: ParityRow[] = [];
  for (const name of fixtureNames()) {
    const fixtureRows = await checkFixture(name);
    console.log(formatTable(fixtureRows));
    rows.push(...fixtureRows);
  }
  const failed = rows.filter((r) => !passed(r));
  console.log(`cuda-parity: ${rows.length - failed.length}/${rows.length} checks passed`);
  if (failed.length > 0) process.exitCode = 1;
}

if (require.main === module) {
  main().catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  });
}
