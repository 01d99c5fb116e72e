// Loading of the torchscale fixtures in test/data/fixtures (layout in RETNET_SPEC.md §13).
import * as fs from 'fs';
import * as path from 'path';
import { dims, parameterShapes, resolveConfig, type RetNetConfig } from '../../lib/config';
import { parseSafetensors } from '../../lib/safetensors';

export const FIXTURES_DIR = path.join(__dirname, '..', 'data', 'fixtures');

export type GradsKind = 'grads' | 'grads_chunkwise';

interface GradEntry {
  file: string;
  shape: number[];
  max_abs: number;
  max_abs_diff_vs_parallel?: number;
}

/** The meta.json fields tests read; the file has more (kept via the index signature). */
export interface FixtureMeta {
  name: string;
  batch: number;
  seq_len: number;
  vocab_size: number;
  chunk_size: number;
  last_chunk_len: number;
  max_abs_diff: { parallel_vs_recurrent: number; parallel_vs_chunkwise: number; recurrent_vs_chunkwise: number };
  training: {
    loss_value: number;
    loss_chunkwise: number;
    loss_recurrent_value: number;
    grads: Record<string, GradEntry>;
    grads_chunkwise: Record<string, GradEntry>;
    grads_chunkwise_vs_parallel_max_rel: number;
    [other: string]: unknown;
  };
  [other: string]: unknown;
}

export interface Fixture {
  name: string;
  dir: string;
  config: RetNetConfig;
  /** torchscale state_dict names (buffers included), as in model.safetensors. */
  weights: Map<string, Float32Array>;
  tokens: number[][];
  /** LE float32 [B, T, V] per mode. */
  logits: { parallel: Float32Array; recurrent: Float32Array; chunkwise: Float32Array };
  /** Recurrent state after the last token: per layer kv [B, H, dv, dk] and scale [H]. */
  state: { kv: Float32Array[]; scale: Float32Array[] };
  meta: FixtureMeta;
}

/** Fixture names (directories holding a config.json), sorted. */
export function listFixtures(): string[] {
  return fs
    .readdirSync(FIXTURES_DIR, { withFileTypes: true })
    .filter((entry) => entry.isDirectory() && fs.existsSync(path.join(FIXTURES_DIR, entry.name, 'config.json')))
    .map((entry) => entry.name)
    .sort();
}

/** A little-endian float32 file, optionally checked against an expected element count. */
export function readF32(file: string, expectedLength?: number): Float32Array {
  const bytes = fs.readFileSync(file);
  if (bytes.byteLength % 4 !== 0) throw new Error(`${file}: ${bytes.byteLength} bytes is not a whole number of float32`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(bytes.byteLength / 4);
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
  if (expectedLength !== undefined && out.length !== expectedLength) {
    throw new Error(`${file}: ${out.length} float32 values, expected ${expectedLength}`);
  }
  return out;
}

function readJson(file: string): unknown {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

export function loadFixture(name: string): Fixture {
  const dir = path.join(FIXTURES_DIR, name);
  const config = resolveConfig(readJson(path.join(dir, 'config.json')));
  const meta = readJson(path.join(dir, 'meta.json')) as FixtureMeta;
  const { V, H, dk, dv, L } = dims(config);

  const modelFile = path.join(dir, 'model.safetensors');
  const parsed = parseSafetensors(fs.readFileSync(modelFile), modelFile);
  const weights = new Map<string, Float32Array>();
  for (const [tensorName, shape] of parameterShapes(config)) {
    const tensor = parsed.tensors.get(tensorName);
    if (tensor === undefined) throw new Error(`${modelFile}: missing ${tensorName}`);
    if (tensor.shape.join(',') !== shape.join(',')) {
      throw new Error(`${modelFile}: ${tensorName} has shape [${tensor.shape}], expected [${shape}]`);
    }
    weights.set(tensorName, tensor.data);
  }

  const { tokens } = readJson(path.join(dir, 'tokens.json')) as { tokens: number[][] };
  const B = tokens.length;
  const T = B > 0 ? tokens[0].length : 0;
  if (B !== meta.batch || tokens.some((row) => row.length !== meta.seq_len)) {
    throw new Error(`${dir}/tokens.json: expected ${meta.batch} rows of ${meta.seq_len} tokens`);
  }
  const logitsFile = (mode: string) => readF32(path.join(dir, `logits_${mode}.f32`), B * T * V);
  const stateFile = (layer: number, what: string, length: number) =>
    readF32(path.join(dir, 'state', `layer${layer}.${what}.f32`), length);
  const layers = Array.from({ length: L }, (_, layer) => layer);
  return {
    name,
    dir,
    config,
    weights,
    tokens,
    logits: { parallel: logitsFile('parallel'), recurrent: logitsFile('recurrent'), chunkwise: logitsFile('chunkwise') },
    state: {
      kv: layers.map((layer) => stateFile(layer, 'prev_key_value', B * H * dv * dk)),
      scale: layers.map((layer) => stateFile(layer, 'scale', H)),
    },
    meta,
  };
}

/** The stored gradients (parameter name → values in the parameter's shape) listed in meta.json. */
export function readGrads(name: string, kind: GradsKind): Map<string, Float32Array> {
  const dir = path.join(FIXTURES_DIR, name);
  const meta = readJson(path.join(dir, 'meta.json')) as FixtureMeta;
  const grads = new Map<string, Float32Array>();
  for (const [param, entry] of Object.entries(meta.training[kind])) {
    grads.set(param, readF32(path.join(dir, entry.file), entry.shape.reduce((a, b) => a * b, 1)));
  }
  return grads;
}

/** Largest |a_i − b_i|; NaN anywhere counts as infinitely far. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`maxAbsDiff: lengths ${a.length} and ${b.length} differ`);
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= max)) max = Number.isNaN(d) ? Infinity : d;
  }
  return max;
}

/** Largest |a_i| (for relative tolerances); NaN counts as infinite. */
export function maxAbs(a: ArrayLike<number>): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const m = Math.abs(a[i]);
    if (!(m <= max)) max = Number.isNaN(m) ? Infinity : m;
  }
  return max;
}
