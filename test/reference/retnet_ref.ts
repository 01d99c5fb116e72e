// Float64 reference of the RetNet forward pass (torchscale semantics, RETNET_SPEC.md),
// written with plain loops for clarity. Used by tests to check the native kernels.
import {
  angleBuffer,
  decayBuffer,
  dims,
  parameterShapes,
  resolveConfig,
  type Activation,
  type RetNetConfig,
} from '../../lib/config';

export type Weights = Map<string, Float64Array | Float32Array>;
export type Mode = 'parallel' | 'chunkwise' | 'recurrent';
export interface RefState {
  /** Per layer, [B, H, dv, dk] (torchscale `prev_key_value`). */
  kv: Float64Array[];
  /** Per layer, [H] (torchscale `scale`, shared by the batch). */
  scale: Float64Array[];
}

type Vec = Float64Array;
type Tensor = Float64Array | Float32Array;

/** One head's rotated queries/keys and values for a run of consecutive positions. */
interface HeadSequence {
  q: Vec[]; // [T][dk], rotated
  k: Vec[]; // [T][dk], scaled by dk^-0.5 and rotated
  v: Vec[]; // [T][dv]
  lambda: number; // ln γ of this head (the decay buffer)
  startPos: number; // absolute position of q[0]
}

/** Computes one head's retention output rows [T][dv] (before the group norm). */
type RetentionCore = (layer: number, b: number, h: number, seq: HeadSequence) => Vec[];

const PARALLEL_CLAMP_MAX = 5e4;

function getWeight(weights: Weights, name: string): Tensor {
  const w = weights.get(name);
  if (w === undefined) throw new Error(`reference: missing weight ${name}`);
  return w;
}

/** rows · Wᵀ for W stored [out, in]; no biases anywhere in RetNet. */
function linear(rows: Vec[], w: Tensor, outDim: number): Vec[] {
  return rows.map((x) => {
    const inDim = x.length;
    if (w.length !== outDim * inDim) throw new Error(`reference: weight size ${w.length} != ${outDim}x${inDim}`);
    const y = new Float64Array(outDim);
    for (let o = 0; o < outDim; o++) {
      let acc = 0;
      for (let i = 0; i < inDim; i++) acc += x[i] * w[o * inDim + i];
      y[o] = acc;
    }
    return y;
  });
}

/** x / sqrt(mean(x²) + ε), times the weight when given (the group norm has none). */
function rmsNorm(x: Vec, eps: number, w?: Tensor): Vec {
  let sumSq = 0;
  for (let i = 0; i < x.length; i++) sumSq += x[i] * x[i];
  const inv = 1 / Math.sqrt(sumSq / x.length + eps);
  const y = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) y[i] = x[i] * inv * (w ? w[i] : 1);
  return y;
}

/**
 * erf by the everywhere-positive series erf(x) = 2/√π · e^(−x²) · Σ_n 2^n x^(2n+1) / (1·3·…·(2n+1)):
 * no cancellation, so the absolute error stays near 1e-16 for |x| < 6; beyond, |erf| = 1 in float64.
 */
export function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax >= 6) return Math.sign(x);
  let term = ax;
  let sum = ax;
  for (let n = 1; term > 1e-17 * sum; n++) {
    term *= (2 * ax * ax) / (2 * n + 1);
    sum += term;
  }
  return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * Math.exp(-ax * ax) * sum;
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

function swish(x: number): number {
  return x * sigmoid(x);
}

function activation(name: Activation): (x: number) => number {
  switch (name) {
    case 'gelu':
      return (x) => 0.5 * x * (1 + erf(x / Math.SQRT2));
    case 'swish':
      return swish;
    case 'relu':
      return (x) => Math.max(x, 0);
  }
}

/**
 * torchscale's theta_shift (rotate_every_two): pairs (x_2j, x_2j+1) rotated by φ = fl32(n·θ_j).
 * n < 2^24 and θ is float32, so n·θ is exact in float64 and fround gives the float32 product.
 */
function rotate(x: Vec, pos: number, angle: Tensor): Vec {
  const y = new Float64Array(x.length);
  for (let i = 0; i < x.length; i += 2) {
    const phi = Math.fround(pos * angle[i]);
    const c = Math.cos(phi);
    const s = Math.sin(phi);
    y[i] = x[i] * c - x[i + 1] * s;
    y[i + 1] = x[i + 1] * c + x[i] * s;
  }
  return y;
}

function dot(a: Vec, b: Vec): number {
  let acc = 0;
  for (let i = 0; i < a.length; i++) acc += a[i] * b[i];
  return acc;
}

/** Spec §5: decay mask normalised by sqrt of its row sum, abs-sum row normaliser clamped to [1, 5e4]. */
function parallelCore(seq: HeadSequence): Vec[] {
  if (seq.startPos !== 0) throw new Error('reference: the parallel core starts at position 0');
  const { q, k, v, lambda } = seq;
  const T = q.length;
  const dv = v.length > 0 ? v[0].length : 0;
  const out: Vec[] = [];
  for (let n = 0; n < T; n++) {
    let rowSum = 0;
    for (let m = 0; m <= n; m++) rowSum += Math.exp(lambda * (n - m));
    const sqrtRho = Math.sqrt(rowSum);
    const scores = new Float64Array(n + 1);
    let absSum = 0;
    for (let m = 0; m <= n; m++) {
      scores[m] = (dot(q[n], k[m]) * Math.exp(lambda * (n - m))) / sqrtRho;
      absSum += Math.abs(scores[m]);
    }
    const c = Math.min(Math.max(absSum, 1), PARALLEL_CLAMP_MAX);
    const o = new Float64Array(dv);
    for (let m = 0; m <= n; m++) {
      const a = scores[m] / c;
      for (let j = 0; j < dv; j++) o[j] += a * v[m][j];
    }
    out.push(o);
  }
  return out;
}

/**
 * Spec §7: chunks of C with within-chunk constants, a cross-chunk state KV [dk][dv] with its
 * scale κ. A partial last chunk uses the first r rows of the length-C constants.
 */
function chunkwiseCore(seq: HeadSequence, C: number): Vec[] {
  if (seq.startPos !== 0) throw new Error('reference: the chunkwise core starts at position 0');
  const { q, k, v, lambda } = seq;
  const T = q.length;
  const dk = q.length > 0 ? q[0].length : 0;
  const dv = v.length > 0 ? v[0].length : 0;

  const sigma = new Float64Array(C); // σ_i = sqrt(ρ_i)
  for (let i = 0; i < C; i++) {
    let rho = 0;
    for (let j = 0; j <= i; j++) rho += Math.exp(lambda * (i - j));
    sigma[i] = Math.sqrt(rho);
  }
  const chunkScale = sigma[C - 1] * sigma[C - 1]; // S_C = ρ_{C−1}
  const innerMask = (i: number, j: number) => (j <= i ? Math.exp(lambda * (i - j)) / sigma[i] : 0);
  const valueDecay = (j: number) => Math.exp(lambda * (C - 1 - j)) / chunkScale; // β_j
  const queryDecay = (i: number) => Math.exp(lambda * (i + 1)) / (sigma[i] / chunkScale); // α_i
  const crossDecay = Math.exp(lambda * C); // Γ

  const kvState: Vec[] = Array.from({ length: dk }, () => new Float64Array(dv)); // [dk][dv]
  let kvScale = 1; // κ
  const out: Vec[] = [];
  for (let start = 0; start < T; start += C) {
    const r = Math.min(C, T - start);
    for (let i = 0; i < r; i++) {
      const qi = q[start + i];
      const scores = new Float64Array(i + 1);
      let absSum = 0;
      for (let j = 0; j <= i; j++) {
        scores[j] = dot(qi, k[start + j]) * innerMask(i, j);
        absSum += Math.abs(scores[j]);
      }
      const innerScale = Math.max(absSum, 1); // ι_i: no upper clamp here
      const inner = new Float64Array(dv);
      for (let j = 0; j <= i; j++) {
        const a = scores[j] / innerScale;
        for (let d = 0; d < dv; d++) inner[d] += a * v[start + j][d];
      }
      const cross = new Float64Array(dv);
      const alpha = queryDecay(i);
      for (let e = 0; e < dk; e++) {
        const qe = (alpha * qi[e]) / kvScale;
        for (let d = 0; d < dv; d++) cross[d] += qe * kvState[e][d];
      }
      const allScale = Math.max(innerScale, kvScale); // μ_i
      const o = new Float64Array(dv);
      for (let d = 0; d < dv; d++) o[d] = inner[d] / (allScale / innerScale) + cross[d] / (allScale / kvScale);
      out.push(o);
    }
    for (let e = 0; e < dk; e++) {
      for (let d = 0; d < dv; d++) {
        let acc = kvState[e][d] * crossDecay;
        for (let j = 0; j < r; j++) acc += k[start + j][e] * valueDecay(j) * v[start + j][d];
        kvState[e][d] = acc;
      }
    }
    let maxColumnAbsSum = 0;
    for (let d = 0; d < dv; d++) {
      let colSum = 0;
      for (let e = 0; e < dk; e++) colSum += Math.abs(kvState[e][d]);
      maxColumnAbsSum = Math.max(maxColumnAbsSum, colSum);
    }
    kvScale = Math.max(maxColumnAbsSum, 1);
  }
  return out;
}

/** Spec §8.1 and §4: the whole decoder on tokens[b][0..T) at absolute positions startPos.., returns logits rows [B·T][V]. */
function decoderForward(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  startPos: number,
  core: RetentionCore,
): Vec[] {
  const { V, D, Dv, H, dk, dv, F, L } = dims(config);
  const eps = config.layernorm_eps;
  const B = tokens.length;
  const T = B > 0 ? tokens[0].length : 0;
  if (tokens.some((row) => row.length !== T)) throw new Error('reference: ragged token batch');
  const alpha = config.deepnorm ? Math.pow(2 * L, 0.25) : 1;
  const embedScale = config.no_scale_embedding ? 1 : Math.sqrt(D);
  const act = activation(config.activation_fn);
  const angle = getWeight(weights, 'retnet_rel_pos.angle');
  const decay = getWeight(weights, 'retnet_rel_pos.decay');
  const kScale = 1 / Math.sqrt(dk);

  const embed = getWeight(weights, 'embed_tokens.weight');
  let x: Vec[] = [];
  for (const row of tokens) {
    for (const token of row) {
      if (!Number.isInteger(token) || token < 0 || token >= V) throw new Error(`reference: token ${token} out of range`);
      const e = new Float64Array(D);
      for (let i = 0; i < D; i++) e[i] = embed[token * D + i] * embedScale;
      x.push(e);
    }
  }
  if (config.layernorm_embedding) {
    const w = getWeight(weights, 'layernorm_embedding.weight');
    x = x.map((row) => rmsNorm(row, eps, w));
  }

  const retention = (layer: number, input: Vec[]): Vec[] => {
    const p = `layers.${layer}.retention.`;
    const Q = linear(input, getWeight(weights, `${p}q_proj.weight`), D);
    const K = linear(input, getWeight(weights, `${p}k_proj.weight`), D);
    const Vv = linear(input, getWeight(weights, `${p}v_proj.weight`), Dv);
    const G = linear(input, getWeight(weights, `${p}g_proj.weight`), Dv);
    const gated: Vec[] = G.map((g) => g.map(swish));
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const seq: HeadSequence = { q: [], k: [], v: [], lambda: decay[h], startPos };
        for (let t = 0; t < T; t++) {
          const row = b * T + t;
          seq.q.push(rotate(Q[row].slice(h * dk, (h + 1) * dk), startPos + t, angle));
          seq.k.push(rotate(K[row].slice(h * dk, (h + 1) * dk).map((value) => value * kScale), startPos + t, angle));
          seq.v.push(Vv[row].slice(h * dv, (h + 1) * dv));
        }
        const heads = core(layer, b, h, seq);
        for (let t = 0; t < T; t++) {
          const normed = rmsNorm(heads[t], eps); // group norm: per head, no affine, same ε
          const z = gated[b * T + t];
          for (let j = 0; j < dv; j++) z[h * dv + j] *= normed[j];
        }
      }
    }
    return linear(gated, getWeight(weights, `${p}out_proj.weight`), D);
  };

  const glu = (layer: number, input: Vec[]): Vec[] => {
    const p = `layers.${layer}.ffn.`;
    const hidden = linear(input, getWeight(weights, `${p}fc1.weight`), F);
    const gate = linear(input, getWeight(weights, `${p}gate.weight`), F);
    const product = hidden.map((row, n) => row.map((value, i) => act(value) * gate[n][i]));
    return linear(product, getWeight(weights, `${p}fc2.weight`), D);
  };

  const residual = (skip: Vec[], branch: Vec[]): Vec[] =>
    skip.map((row, n) => row.map((value, i) => alpha * value + branch[n][i]));

  for (let layer = 0; layer < L; layer++) {
    const retentionNorm = getWeight(weights, `layers.${layer}.retention_layer_norm.weight`);
    const ffnNorm = getWeight(weights, `layers.${layer}.final_layer_norm.weight`);
    if (config.decoder_normalize_before) {
      x = residual(x, retention(layer, x.map((row) => rmsNorm(row, eps, retentionNorm))));
      x = residual(x, glu(layer, x.map((row) => rmsNorm(row, eps, ffnNorm))));
    } else {
      x = residual(x, retention(layer, x)).map((row) => rmsNorm(row, eps, retentionNorm));
      x = residual(x, glu(layer, x)).map((row) => rmsNorm(row, eps, ffnNorm));
    }
  }
  if (config.decoder_normalize_before) {
    const w = getWeight(weights, 'layer_norm.weight');
    x = x.map((row) => rmsNorm(row, eps, w));
  }
  const outName = config.share_decoder_input_output_embed ? 'embed_tokens.weight' : 'output_projection.weight';
  return linear(x, getWeight(weights, outName), V);
}

function emptyState(config: RetNetConfig, B: number): RefState {
  const { H, dk, dv, L } = dims(config);
  return {
    kv: Array.from({ length: L }, () => new Float64Array(B * H * dv * dk)),
    scale: Array.from({ length: L }, () => new Float64Array(H)),
  };
}

/**
 * Spec §6, driven like torchscale: the whole decoder runs once per position, each layer reading
 * and updating its state. Starts from S = 0, s = 0 (same as torchscale's "no entry").
 */
function recurrentForward(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  wrap: (core: RetentionCore) => RetentionCore,
): { logits: Vec[]; state: RefState } {
  const { H, dk, dv, L } = dims(config);
  const B = tokens.length;
  const T = B > 0 ? tokens[0].length : 0;
  const decay = getWeight(weights, 'retnet_rel_pos.decay');
  const gamma = Array.from(decay, (lambda) => Math.exp(lambda));
  const state = emptyState(config, B);
  const rows: Vec[][] = Array.from({ length: B }, () => []);
  for (let t = 0; t < T; t++) {
    // The scale depends on the position only, so every layer and batch row shares this step's values.
    const prevScale = state.scale[0].slice();
    const nextScale = prevScale.map((s, h) => s * gamma[h] + 1);
    const step: RetentionCore = (layer, b, h, seq) => {
      const S = state.kv[layer].subarray((b * H + h) * dv * dk, (b * H + h + 1) * dv * dk); // [dv][dk]
      const keep = (Math.sqrt(prevScale[h]) * gamma[h]) / Math.sqrt(nextScale[h]);
      const add = 1 / Math.sqrt(nextScale[h]);
      const [q] = seq.q;
      const [k] = seq.k;
      const [v] = seq.v;
      const o = new Float64Array(dv);
      for (let j = 0; j < dv; j++) {
        for (let i = 0; i < dk; i++) {
          S[j * dk + i] = S[j * dk + i] * keep + v[j] * k[i] * add;
          o[j] += S[j * dk + i] * q[i];
        }
      }
      return [o];
    };
    const logits = decoderForward(config, weights, tokens.map((row) => [row[t]]), t, wrap(step));
    for (let b = 0; b < B; b++) rows[b].push(logits[b]);
    for (let layer = 0; layer < L; layer++) state.scale[layer].set(nextScale);
  }
  return { logits: rows.flat(), state };
}

/** Logits rows [B·T][V] of one mode; `wrap` lets a caller observe every core call. */
function modeForward(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: Mode,
  chunkSize: number,
  wrap: (core: RetentionCore) => RetentionCore = (core) => core,
): { logits: Vec[]; state?: RefState } {
  switch (mode) {
    case 'parallel':
      return { logits: decoderForward(config, weights, tokens, 0, wrap((_l, _b, _h, seq) => parallelCore(seq))) };
    case 'chunkwise': {
      if (!Number.isInteger(chunkSize) || chunkSize < 1) throw new Error(`reference: bad chunk size ${chunkSize}`);
      const core: RetentionCore = (_l, _b, _h, seq) => chunkwiseCore(seq, chunkSize);
      return { logits: decoderForward(config, weights, tokens, 0, wrap(core)) };
    }
    case 'recurrent':
      return recurrentForward(config, weights, tokens, wrap);
  }
}

export function refForward(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: Mode,
  chunkSize: number = config.recurrent_chunk_size,
): { logits: Float64Array; state?: RefState } {
  const { V } = dims(config);
  const { logits, state } = modeForward(config, weights, tokens, mode, chunkSize);
  const flat = new Float64Array(logits.length * V);
  logits.forEach((row, n) => flat.set(row, n * V));
  return state ? { logits: flat, state } : { logits: flat };
}

/**
 * Spec §10.1: the recurrent state after all N tokens in closed form,
 * s = Σ_{j<N} γ^j and S = Σ_m γ^(N−1−m) v_m ⊗ k̃_m / sqrt(s), from the keys and values that a
 * `prefillMode` pass computes (with ε > 0 they differ slightly between modes, as the logits do).
 */
export function refRecurrentState(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  prefillMode: Mode = 'parallel',
  chunkSize: number = config.recurrent_chunk_size,
): RefState {
  const { H, dk, dv } = dims(config);
  const B = tokens.length;
  const N = B > 0 ? tokens[0].length : 0;
  const decay = getWeight(weights, 'retnet_rel_pos.decay');
  const state = emptyState(config, B);
  for (const scale of state.scale) {
    for (let h = 0; h < H; h++) {
      for (let j = 0; j < N; j++) scale[h] += Math.exp(decay[h] * j);
    }
  }
  const recording =
    (core: RetentionCore): RetentionCore =>
    (layer, b, h, seq) => {
      const S = state.kv[layer].subarray((b * H + h) * dv * dk, (b * H + h + 1) * dv * dk); // [dv][dk]
      const norm = 1 / Math.sqrt(state.scale[layer][h]);
      seq.k.forEach((k, t) => {
        const weight = Math.exp(decay[h] * (N - 1 - (seq.startPos + t))) * norm;
        for (let j = 0; j < dv; j++) {
          for (let i = 0; i < dk; i++) S[j * dk + i] += weight * seq.v[t][j] * k[i];
        }
      });
      return core(layer, b, h, seq);
    };
  modeForward(config, weights, tokens, prefillMode, chunkSize, recording);
  return state;
}

/** mulberry32: a tiny 32-bit seeded PRNG, uniform in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed | 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Deterministic "wide" weights: matrices U(±scale·sqrt(3/fan_in)) (unit-variance outputs, so
 * retention outputs are O(1) and ε matters little), embeddings U(±scale·sqrt(3)), norm gains
 * U(0.5, 1.5), and torchscale's angle/decay buffers. A tied output projection copies the embedding.
 */
export function randomWeights(config: RetNetConfig, seed: number, scale = 1): Map<string, Float32Array> {
  const { H, dk } = dims(config);
  const rand = mulberry32(seed);
  const uniform = (n: number, lo: number, hi: number) => Float32Array.from({ length: n }, () => lo + (hi - lo) * rand());
  const weights = new Map<string, Float32Array>();
  for (const [name, shape] of parameterShapes(config)) {
    const size = shape.reduce((a, b) => a * b, 1);
    if (name === 'retnet_rel_pos.angle') {
      weights.set(name, angleBuffer(dk));
    } else if (name === 'retnet_rel_pos.decay') {
      weights.set(name, decayBuffer(H));
    } else if (name === 'output_projection.weight' && config.share_decoder_input_output_embed) {
      weights.set(name, Float32Array.from(getWeight(weights, 'embed_tokens.weight')));
    } else if (shape.length === 1) {
      weights.set(name, uniform(size, 0.5, 1.5));
    } else {
      const bound = name === 'embed_tokens.weight' ? scale * Math.sqrt(3) : scale * Math.sqrt(3 / shape[1]);
      weights.set(name, uniform(size, -bound, bound));
    }
  }
  return weights;
}

/** A small random config (every option of spec §1 that changes the math), validated by resolveConfig. */
export function randomConfig(seed: number, overrides: Partial<RetNetConfig> = {}): RetNetConfig {
  const rand = mulberry32(seed);
  const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
  const pick = <T>(options: readonly T[]): T => options[int(0, options.length - 1)];
  const H = int(1, 5);
  const dk = 2 * int(1, 8);
  const dv = int(1, 12);
  return resolveConfig({
    vocab_size: int(5, 40),
    decoder_embed_dim: H * dk,
    decoder_value_embed_dim: H * dv,
    decoder_retention_heads: H,
    decoder_ffn_embed_dim: int(1, 48),
    decoder_layers: int(1, 3),
    decoder_normalize_before: rand() < 0.6,
    activation_fn: pick(['gelu', 'swish', 'relu'] as const),
    layernorm_embedding: rand() < 0.5,
    share_decoder_input_output_embed: rand() < 0.5,
    deepnorm: rand() < 0.4,
    layernorm_eps: pick([1e-6, 1e-5, 1e-30]),
    no_scale_embedding: rand() < 0.5,
    recurrent_chunk_size: int(1, 9),
    ...overrides,
  });
}
