// Float64 reference of the RetNet training loss (RETNET_SPEC.md §8.2) and its gradient, for small
// sizes. A tiny reverse-mode tape over row-major matrices: each op stores its own backward rule, the
// decoder is written once from spec §4–§8 in terms of those ops, and the detached normalisers
// (parallel c_n, chunkwise ι_i and κ) are computed from forward values outside the tape, so the
// backward sees them as constants (the stop-gradient).
import { BUFFER_NAMES, dims, parameterShapes, type Activation, type RetNetConfig } from '../../lib/config';
import { erf, type Weights } from './retnet_ref';

export type LossMode = 'parallel' | 'chunkwise';

export interface LossOptions {
  /** Per [b][t], the token that position t predicts, −1 to ignore it. Default tokens[b][t+1], −1 at t = T−1. */
  targets?: number[][];
  /** Per [b][t], the weight of that position's cross-entropy. Default 1. */
  mask?: number[][];
  /**
   * Per-row divisors to use instead of computing them, as returned in `normalisers` by an earlier
   * refLossAndGrads call on the same shapes. Freezing them makes refLoss the function whose exact
   * gradient refLossAndGrads returns, so finite differences can check it.
   */
  frozenNormalisers?: Float64Array[];
}

export interface LossAndGrads {
  loss: number;
  /** Gradient of every trainable parameter by state_dict name, flattened like the parameter. */
  grads: Map<string, Float64Array>;
  /**
   * The detached divisor of each retention output row, one array of length T per
   * (layer, batch row, head) in that loop order: parallel c_n, chunkwise μ_i = max(ι_i, κ).
   */
  normalisers: Float64Array[];
}

const PARALLEL_CLAMP_MAX = 5e4;
const INV_SQRT_2PI = 1 / Math.sqrt(2 * Math.PI);

/** A row-major [rows, cols] matrix on the tape; `grad` is allocated when a gradient first reaches it. */
class Matrix {
  grad: Float64Array | null = null;
  constructor(
    readonly rows: number,
    readonly cols: number,
    readonly value: Float64Array,
  ) {}

  gradient(): Float64Array {
    return (this.grad ??= new Float64Array(this.value.length));
  }
}

function checkSameShape(a: Matrix, b: Matrix, op: string): void {
  if (a.rows !== b.rows || a.cols !== b.cols) {
    throw new Error(`reference grad: ${op} of [${a.rows},${a.cols}] and [${b.rows},${b.cols}]`);
  }
}

class Tape {
  private readonly backwardSteps: Array<() => void> = [];

  /** A forward-only tape (refLoss) records nothing. */
  constructor(private readonly recording: boolean) {}

  /** Registers `out`'s backward rule; it runs only if some gradient reached `out`. */
  private record(out: Matrix, backward: (dOut: Float64Array) => void): Matrix {
    if (this.recording) {
      this.backwardSteps.push(() => {
        if (out.grad) backward(out.grad);
      });
    }
    return out;
  }

  backward(loss: Matrix): void {
    if (!this.recording) throw new Error('reference grad: backward on a forward-only tape');
    loss.gradient()[0] = 1;
    for (let s = this.backwardSteps.length - 1; s >= 0; s--) this.backwardSteps[s]();
  }

  /** a [n,k] · b [k,m]. */
  matmul(a: Matrix, b: Matrix): Matrix {
    const n = a.rows;
    const k = a.cols;
    const m = b.cols;
    if (b.rows !== k) throw new Error(`reference grad: matmul of [${n},${k}] and [${b.rows},${m}]`);
    const av = a.value;
    const bv = b.value;
    const c = new Float64Array(n * m);
    for (let i = 0; i < n; i++) {
      for (let p = 0; p < k; p++) {
        const aip = av[i * k + p];
        for (let j = 0; j < m; j++) c[i * m + j] += aip * bv[p * m + j];
      }
    }
    return this.record(new Matrix(n, m, c), (dc) => {
      const da = a.gradient();
      const db = b.gradient();
      for (let i = 0; i < n; i++) {
        for (let p = 0; p < k; p++) {
          const aip = av[i * k + p];
          let acc = 0;
          for (let j = 0; j < m; j++) {
            acc += dc[i * m + j] * bv[p * m + j]; // dA = dC·Bᵀ
            db[p * m + j] += aip * dc[i * m + j]; // dB = Aᵀ·dC
          }
          da[i * k + p] += acc;
        }
      }
    });
  }

  transpose(a: Matrix): Matrix {
    const { rows, cols } = a;
    const out = new Float64Array(rows * cols);
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) out[j * rows + i] = a.value[i * cols + j];
    }
    return this.record(new Matrix(cols, rows, out), (d) => {
      const da = a.gradient();
      for (let i = 0; i < rows; i++) {
        for (let j = 0; j < cols; j++) da[i * cols + j] += d[j * rows + i];
      }
    });
  }

  add(a: Matrix, b: Matrix): Matrix {
    checkSameShape(a, b, 'add');
    const out = new Float64Array(a.value.length);
    for (let i = 0; i < out.length; i++) out[i] = a.value[i] + b.value[i];
    return this.record(new Matrix(a.rows, a.cols, out), (d) => {
      const da = a.gradient();
      const db = b.gradient();
      for (let i = 0; i < d.length; i++) {
        da[i] += d[i];
        db[i] += d[i];
      }
    });
  }

  /** Elementwise a ⊙ b. */
  mul(a: Matrix, b: Matrix): Matrix {
    checkSameShape(a, b, 'mul');
    const out = new Float64Array(a.value.length);
    for (let i = 0; i < out.length; i++) out[i] = a.value[i] * b.value[i];
    return this.record(new Matrix(a.rows, a.cols, out), (d) => {
      const da = a.gradient();
      const db = b.gradient();
      for (let i = 0; i < d.length; i++) {
        da[i] += d[i] * b.value[i];
        db[i] += d[i] * a.value[i];
      }
    });
  }

  /** s·a for a constant s. */
  scale(a: Matrix, s: number): Matrix {
    return this.mulConstant(a, new Float64Array(a.value.length).fill(s));
  }

  /** a ⊙ c for a constant c of a's shape (no gradient to c). */
  mulConstant(a: Matrix, c: Float64Array): Matrix {
    if (c.length !== a.value.length) throw new Error('reference grad: constant of the wrong size');
    const out = new Float64Array(c.length);
    for (let i = 0; i < out.length; i++) out[i] = a.value[i] * c[i];
    return this.record(new Matrix(a.rows, a.cols, out), (d) => {
      const da = a.gradient();
      for (let i = 0; i < d.length; i++) da[i] += d[i] * c[i];
    });
  }

  /** Row i times the constant factors[i] (no gradient to the factors). */
  scaleRows(a: Matrix, factors: Float64Array): Matrix {
    if (factors.length !== a.rows) throw new Error('reference grad: row factors of the wrong size');
    const c = new Float64Array(a.value.length);
    for (let i = 0; i < a.rows; i++) c.fill(factors[i], i * a.cols, (i + 1) * a.cols);
    return this.mulConstant(a, c);
  }

  /** Every row of a times w [1, cols] elementwise (a norm gain). */
  mulColumns(a: Matrix, w: Matrix): Matrix {
    if (w.rows !== 1 || w.cols !== a.cols) throw new Error('reference grad: gain of the wrong size');
    const { rows, cols } = a;
    const out = a.value.map((x, i) => x * w.value[i % cols]);
    return this.record(new Matrix(rows, cols, out), (d) => {
      const da = a.gradient();
      const dw = w.gradient();
      for (let i = 0; i < rows; i++) {
        for (let j = 0; j < cols; j++) {
          da[i * cols + j] += d[i * cols + j] * w.value[j];
          dw[j] += d[i * cols + j] * a.value[i * cols + j];
        }
      }
    });
  }

  /** Each row x ↦ x·r with r = (mean(x²) + ε)^(−1/2); no gain. */
  rmsNormRows(a: Matrix, eps: number): Matrix {
    const { rows, cols } = a;
    const x = a.value;
    const inv = new Float64Array(rows);
    const out = new Float64Array(rows * cols);
    for (let i = 0; i < rows; i++) {
      let sumSq = 0;
      for (let j = 0; j < cols; j++) sumSq += x[i * cols + j] * x[i * cols + j];
      inv[i] = 1 / Math.sqrt(sumSq / cols + eps);
      for (let j = 0; j < cols; j++) out[i * cols + j] = x[i * cols + j] * inv[i];
    }
    // ∂r/∂x_j = −r³·x_j/cols, so dx = r·dy − r³·x·(dy·x)/cols.
    return this.record(new Matrix(rows, cols, out), (d) => {
      const da = a.gradient();
      for (let i = 0; i < rows; i++) {
        const r = inv[i];
        let dyDotX = 0;
        for (let j = 0; j < cols; j++) dyDotX += d[i * cols + j] * x[i * cols + j];
        const coef = (r * r * r * dyDotX) / cols;
        for (let j = 0; j < cols; j++) da[i * cols + j] += r * d[i * cols + j] - coef * x[i * cols + j];
      }
    });
  }

  /** Elementwise f(a), with f' for the backward. */
  unary(a: Matrix, fn: ElementwiseFunction): Matrix {
    const out = a.value.map(fn.value);
    return this.record(new Matrix(a.rows, a.cols, out), (d) => {
      const da = a.gradient();
      for (let i = 0; i < d.length; i++) da[i] += d[i] * fn.derivative(a.value[i]);
    });
  }

  /**
   * Spec §3.3: row t's interleaved pairs rotated by φ = fl32(t·θ_j) (positions start at 0 here).
   * A rotation's transpose is its inverse, so the backward rotates by −φ.
   */
  rotate(a: Matrix, angle: ArrayLike<number>): Matrix {
    const { rows, cols } = a;
    const cos = new Float64Array(rows * cols);
    const sin = new Float64Array(rows * cols);
    for (let t = 0; t < rows; t++) {
      for (let i = 0; i < cols; i += 2) {
        const phi = Math.fround(t * angle[i]); // t·θ is exact in float64; fround gives the float32 product
        cos[t * cols + i] = Math.cos(phi);
        sin[t * cols + i] = Math.sin(phi);
      }
    }
    const x = a.value;
    const out = new Float64Array(rows * cols);
    for (let p = 0; p < rows * cols; p += 2) {
      out[p] = x[p] * cos[p] - x[p + 1] * sin[p];
      out[p + 1] = x[p + 1] * cos[p] + x[p] * sin[p];
    }
    return this.record(new Matrix(rows, cols, out), (d) => {
      const da = a.gradient();
      for (let p = 0; p < rows * cols; p += 2) {
        da[p] += d[p] * cos[p] + d[p + 1] * sin[p];
        da[p + 1] += d[p + 1] * cos[p] - d[p] * sin[p];
      }
    });
  }

  /** The sub-matrix of `rows` × `cols` starting at (row, col). */
  block(a: Matrix, row: number, rows: number, col: number, cols: number): Matrix {
    if (row + rows > a.rows || col + cols > a.cols) throw new Error('reference grad: block out of range');
    const out = new Float64Array(rows * cols);
    for (let i = 0; i < rows; i++) {
      out.set(a.value.subarray((row + i) * a.cols + col, (row + i) * a.cols + col + cols), i * cols);
    }
    return this.record(new Matrix(rows, cols, out), (d) => {
      const da = a.gradient();
      for (let i = 0; i < rows; i++) {
        for (let j = 0; j < cols; j++) da[(row + i) * a.cols + col + j] += d[i * cols + j];
      }
    });
  }

  /** A [rows, cols] matrix made of non-overlapping parts, each placed with its top-left at (row, col). */
  assemble(rows: number, cols: number, parts: Array<{ part: Matrix; row: number; col: number }>): Matrix {
    const out = new Float64Array(rows * cols);
    for (const { part, row, col } of parts) {
      if (row + part.rows > rows || col + part.cols > cols) throw new Error('reference grad: part out of range');
      for (let i = 0; i < part.rows; i++) {
        out.set(part.value.subarray(i * part.cols, (i + 1) * part.cols), (row + i) * cols + col);
      }
    }
    return this.record(new Matrix(rows, cols, out), (d) => {
      for (const { part, row, col } of parts) {
        const dp = part.gradient();
        for (let i = 0; i < part.rows; i++) {
          for (let j = 0; j < part.cols; j++) dp[i * part.cols + j] += d[(row + i) * cols + col + j];
        }
      }
    });
  }

  /** Row ids[n] of table, for every n (the embedding lookup). */
  gatherRows(table: Matrix, ids: number[]): Matrix {
    const D = table.cols;
    const out = new Float64Array(ids.length * D);
    ids.forEach((id, n) => out.set(table.value.subarray(id * D, (id + 1) * D), n * D));
    return this.record(new Matrix(ids.length, D, out), (d) => {
      const dt = table.gradient();
      ids.forEach((id, n) => {
        for (let j = 0; j < D; j++) dt[id * D + j] += d[n * D + j];
      });
    });
  }

  /**
   * Σ_n w_n·CE(logits_n, target_n) / Σ_n w_n over rows with target ≠ −1, as a [1,1] matrix.
   * d/dlogits_n = w_n/Σw · (softmax(logits_n) − onehot(target_n)).
   */
  crossEntropy(logits: Matrix, targets: number[], weights: number[]): Matrix {
    const V = logits.cols;
    const x = logits.value;
    const softmax = new Float64Array(x.length);
    let weightSum = 0;
    let total = 0;
    targets.forEach((target, n) => {
      if (target === -1) return;
      let max = -Infinity;
      for (let v = 0; v < V; v++) max = Math.max(max, x[n * V + v]);
      let sumExp = 0;
      for (let v = 0; v < V; v++) {
        softmax[n * V + v] = Math.exp(x[n * V + v] - max);
        sumExp += softmax[n * V + v];
      }
      for (let v = 0; v < V; v++) softmax[n * V + v] /= sumExp;
      total += weights[n] * (max + Math.log(sumExp) - x[n * V + target]);
      weightSum += weights[n];
    });
    if (!(weightSum > 0)) throw new Error('reference grad: no position with a target and a positive mask');
    return this.record(new Matrix(1, 1, Float64Array.of(total / weightSum)), (d) => {
      const dl = logits.gradient();
      targets.forEach((target, n) => {
        if (target === -1) return;
        const w = (d[0] * weights[n]) / weightSum;
        for (let v = 0; v < V; v++) dl[n * V + v] += w * softmax[n * V + v];
        dl[n * V + target] -= w;
      });
    });
  }
}

interface ElementwiseFunction {
  value: (x: number) => number;
  derivative: (x: number) => number;
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

const SWISH: ElementwiseFunction = {
  value: (x) => x * sigmoid(x),
  derivative: (x) => {
    const s = sigmoid(x);
    return s + x * s * (1 - s);
  },
};

const ACTIVATIONS: Record<Activation, ElementwiseFunction> = {
  gelu: {
    value: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    derivative: (x) => 0.5 * (1 + erf(x / Math.SQRT2)) + x * INV_SQRT_2PI * Math.exp(-0.5 * x * x),
  },
  swish: SWISH,
  relu: {
    value: (x) => (x > 0 ? x : 0),
    derivative: (x) => (x > 0 ? 1 : 0), // torch's choice at the kink
  },
};

/** One head's retention output rows [T, dv] and the detached divisor used for each row. */
interface CoreResult {
  out: Matrix;
  divisors: Float64Array;
}

/** Spec §5 with c_n detached: o = diag(1/c)·((q̃k̃ᵀ) ⊙ D̃)·v. */
function parallelCore(tape: Tape, q: Matrix, k: Matrix, v: Matrix, lambda: number, frozen?: Float64Array): CoreResult {
  const T = q.rows;
  const mask = new Float64Array(T * T); // D̃, zero above the diagonal
  for (let n = 0; n < T; n++) {
    let rho = 0;
    for (let m = 0; m <= n; m++) rho += Math.exp(lambda * (n - m));
    for (let m = 0; m <= n; m++) mask[n * T + m] = Math.exp(lambda * (n - m)) / Math.sqrt(rho);
  }
  const scores = tape.mulConstant(tape.matmul(q, tape.transpose(k)), mask);
  const divisors = new Float64Array(T); // c_n from forward values: a constant to the tape (detached)
  for (let n = 0; n < T; n++) {
    let absSum = 0;
    for (let m = 0; m <= n; m++) absSum += Math.abs(scores.value[n * T + m]);
    divisors[n] = frozen ? frozen[n] : Math.min(Math.max(absSum, 1), PARALLEL_CLAMP_MAX);
  }
  const out = tape.matmul(tape.scaleRows(scores, divisors.map((c) => 1 / c)), v);
  return { out, divisors };
}

/**
 * Spec §7. With ι_i and κ constants, inner/(μ/ι) + cross/(μ/κ) is (A·v + α⊙q̃·KV)/μ, which is what
 * is taped; the gradient flows through KV into earlier chunks. A partial last chunk uses the first
 * r rows of the length-C constants, as zero padding would.
 */
function chunkwiseCore(
  tape: Tape,
  q: Matrix,
  k: Matrix,
  v: Matrix,
  lambda: number,
  C: number,
  frozen?: Float64Array,
): CoreResult {
  const T = q.rows;
  const dk = q.cols;
  const dv = v.cols;
  const sigma = new Float64Array(C); // σ_i = sqrt(ρ_i)
  for (let i = 0; i < C; i++) {
    let rho = 0;
    for (let j = 0; j <= i; j++) rho += Math.exp(lambda * (i - j));
    sigma[i] = Math.sqrt(rho);
  }
  const chunkScale = sigma[C - 1] * sigma[C - 1]; // S_C
  const valueDecay = new Float64Array(C); // β, torchscale's value_inner_decay
  const queryDecay = new Float64Array(C); // α, torchscale's query_inner_decay
  for (let i = 0; i < C; i++) {
    valueDecay[i] = Math.exp(lambda * (C - 1 - i)) / chunkScale;
    queryDecay[i] = Math.exp(lambda * (i + 1)) / (sigma[i] / chunkScale);
  }
  const crossDecay = Math.exp(lambda * C); // Γ

  const divisors = new Float64Array(T);
  const chunks: Array<{ part: Matrix; row: number; col: number }> = [];
  let kvState: Matrix | null = null; // [dk, dv]; null stands for the initial KV = 0
  let kvScale = 1; // κ
  for (let start = 0; start < T; start += C) {
    const r = Math.min(C, T - start);
    const qc = tape.block(q, start, r, 0, dk);
    const kc = tape.block(k, start, r, 0, dk);
    const vc = tape.block(v, start, r, 0, dv);
    const innerMask = new Float64Array(r * r); // M̃ restricted to r rows
    for (let i = 0; i < r; i++) {
      for (let j = 0; j <= i; j++) innerMask[i * r + j] = Math.exp(lambda * (i - j)) / sigma[i];
    }
    const scores = tape.mulConstant(tape.matmul(qc, tape.transpose(kc)), innerMask);
    const chunkDivisors = new Float64Array(r); // μ_i from forward values: a constant to the tape (detached)
    for (let i = 0; i < r; i++) {
      let absSum = 0;
      for (let j = 0; j <= i; j++) absSum += Math.abs(scores.value[i * r + j]);
      const innerScale = Math.max(absSum, 1); // ι_i
      chunkDivisors[i] = frozen ? frozen[start + i] : Math.max(innerScale, kvScale); // μ_i
    }
    divisors.set(chunkDivisors, start);
    let numerator = tape.matmul(scores, vc);
    if (kvState) numerator = tape.add(numerator, tape.matmul(tape.scaleRows(qc, queryDecay.subarray(0, r)), kvState));
    chunks.push({ part: tape.scaleRows(numerator, chunkDivisors.map((mu) => 1 / mu)), row: start, col: 0 });

    // KV ← KV·Γ + Σ_j k̃_j ⊗ β_j v_j
    const update = tape.matmul(tape.transpose(kc), tape.scaleRows(vc, valueDecay.subarray(0, r)));
    kvState = kvState ? tape.add(tape.scale(kvState, crossDecay), update) : update;
    let maxColumnAbsSum = 0;
    for (let d = 0; d < dv; d++) {
      let colSum = 0;
      for (let e = 0; e < dk; e++) colSum += Math.abs(kvState.value[e * dv + d]);
      maxColumnAbsSum = Math.max(maxColumnAbsSum, colSum);
    }
    kvScale = Math.max(maxColumnAbsSum, 1); // κ, detached like ι
  }
  return { out: tape.assemble(T, dv, chunks), divisors };
}

function weightOf(weights: Weights, name: string): Float32Array | Float64Array {
  const w = weights.get(name);
  if (w === undefined) throw new Error(`reference grad: missing weight ${name}`);
  return w;
}

/** Names of the trainable parameters (buffers and a tied output projection excluded). */
function trainableShapes(config: RetNetConfig): Array<[string, number[]]> {
  return parameterShapes(config).filter(
    ([name]) =>
      !(BUFFER_NAMES as readonly string[]).includes(name) &&
      !(name === 'output_projection.weight' && config.share_decoder_input_output_embed),
  );
}

/** Spec §8.2 loss: next-token targets and unit weights unless the options give others. */
function lossTargets(tokens: number[][], V: number, opts: LossOptions): { targets: number[]; weights: number[] } {
  const targets: number[] = [];
  const weights: number[] = [];
  tokens.forEach((row, b) => {
    row.forEach((_, t) => {
      const target = opts.targets ? opts.targets[b][t] : t + 1 < row.length ? row[t + 1] : -1;
      if (!(target === -1 || (Number.isInteger(target) && target >= 0 && target < V))) {
        throw new Error(`reference grad: target ${target} out of range`);
      }
      targets.push(target);
      weights.push(opts.mask ? opts.mask[b][t] : 1);
    });
  });
  return { targets, weights };
}

/** Builds the whole training forward (spec §8.1–§8.2) on `tape`. */
function lossOnTape(
  tape: Tape,
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: LossMode,
  chunkSize: number,
  opts: LossOptions,
): { loss: Matrix; params: Map<string, Matrix>; normalisers: Float64Array[] } {
  const { V, D, Dv, H, dk, dv, L } = dims(config);
  const eps = config.layernorm_eps;
  const B = tokens.length;
  const T = B > 0 ? tokens[0].length : 0;
  if (tokens.some((row) => row.length !== T)) throw new Error('reference grad: ragged token batch');
  if (mode === 'chunkwise' && !(Number.isInteger(chunkSize) && chunkSize >= 1)) {
    throw new Error(`reference grad: bad chunk size ${chunkSize}`);
  }
  const ids = tokens.flat();
  if (ids.some((id) => !(Number.isInteger(id) && id >= 0 && id < V))) {
    throw new Error('reference grad: token out of range');
  }
  const residualScale = config.deepnorm ? Math.pow(2 * L, 0.25) : 1; // α
  const embedScale = config.no_scale_embedding ? 1 : Math.sqrt(D);
  const angle = weightOf(weights, 'retnet_rel_pos.angle');
  const decay = weightOf(weights, 'retnet_rel_pos.decay');

  const params = new Map<string, Matrix>();
  for (const [name, shape] of trainableShapes(config)) {
    const value = Float64Array.from(weightOf(weights, name));
    params.set(name, shape.length === 1 ? new Matrix(1, shape[0], value) : new Matrix(shape[0], shape[1], value));
  }
  const param = (name: string) => params.get(name)!;
  const linear = (x: Matrix, name: string) => tape.matmul(x, tape.transpose(param(name))); // x·Wᵀ
  const rmsNorm = (x: Matrix, name: string) => tape.mulColumns(tape.rmsNormRows(x, eps), param(name));
  const residual = (skip: Matrix, branch: Matrix) => tape.add(tape.scale(skip, residualScale), branch);

  const frozen = opts.frozenNormalisers;
  const normalisers: Float64Array[] = [];
  const retention = (layer: number, x: Matrix): Matrix => {
    const p = `layers.${layer}.retention.`;
    const Q = linear(x, `${p}q_proj.weight`);
    const K = tape.scale(linear(x, `${p}k_proj.weight`), 1 / Math.sqrt(dk));
    const Vv = linear(x, `${p}v_proj.weight`);
    const G = linear(x, `${p}g_proj.weight`);
    const heads: Array<{ part: Matrix; row: number; col: number }> = [];
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < H; h++) {
        const q = tape.rotate(tape.block(Q, b * T, T, h * dk, dk), angle);
        const k = tape.rotate(tape.block(K, b * T, T, h * dk, dk), angle);
        const v = tape.block(Vv, b * T, T, h * dv, dv);
        const frozenRows = frozen?.[normalisers.length];
        if (frozen && frozenRows?.length !== T) throw new Error('reference grad: frozen normalisers do not fit');
        const { out, divisors } =
          mode === 'parallel'
            ? parallelCore(tape, q, k, v, decay[h], frozenRows)
            : chunkwiseCore(tape, q, k, v, decay[h], chunkSize, frozenRows);
        normalisers.push(divisors);
        heads.push({ part: tape.rmsNormRows(out, eps), row: b * T, col: h * dv }); // group norm
      }
    }
    const gated = tape.mul(tape.unary(G, SWISH), tape.assemble(B * T, Dv, heads));
    return linear(gated, `${p}out_proj.weight`);
  };
  const act = ACTIVATIONS[config.activation_fn];
  const glu = (layer: number, x: Matrix): Matrix => {
    const p = `layers.${layer}.ffn.`;
    const product = tape.mul(tape.unary(linear(x, `${p}fc1.weight`), act), linear(x, `${p}gate.weight`));
    return linear(product, `${p}fc2.weight`);
  };

  let x = tape.scale(tape.gatherRows(param('embed_tokens.weight'), ids), embedScale);
  if (config.layernorm_embedding) x = rmsNorm(x, 'layernorm_embedding.weight');
  for (let layer = 0; layer < L; layer++) {
    const retentionNorm = `layers.${layer}.retention_layer_norm.weight`;
    const ffnNorm = `layers.${layer}.final_layer_norm.weight`;
    if (config.decoder_normalize_before) {
      x = residual(x, retention(layer, rmsNorm(x, retentionNorm)));
      x = residual(x, glu(layer, rmsNorm(x, ffnNorm)));
    } else {
      x = rmsNorm(residual(x, retention(layer, x)), retentionNorm);
      x = rmsNorm(residual(x, glu(layer, x)), ffnNorm);
    }
  }
  if (config.decoder_normalize_before) x = rmsNorm(x, 'layer_norm.weight');
  const tied = config.share_decoder_input_output_embed;
  const logits = linear(x, tied ? 'embed_tokens.weight' : 'output_projection.weight');
  const { targets, weights: positionWeights } = lossTargets(tokens, V, opts);
  return { loss: tape.crossEntropy(logits, targets, positionWeights), params, normalisers };
}

/** The training loss and the gradient of every trainable parameter, in float64. */
export function refLossAndGrads(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: LossMode,
  chunkSize: number = config.recurrent_chunk_size,
  opts: LossOptions = {},
): LossAndGrads {
  const tape = new Tape(true);
  const { loss, params, normalisers } = lossOnTape(tape, config, weights, tokens, mode, chunkSize, opts);
  tape.backward(loss);
  const grads = new Map<string, Float64Array>();
  for (const [name, p] of params) grads.set(name, p.grad ?? new Float64Array(p.value.length));
  return { loss: loss.value[0], grads, normalisers };
}

/** The training loss only (forward in float64, nothing recorded). */
export function refLoss(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: LossMode,
  chunkSize: number = config.recurrent_chunk_size,
  opts: LossOptions = {},
): number {
  return lossOnTape(new Tape(false), config, weights, tokens, mode, chunkSize, opts).loss.value[0];
}
