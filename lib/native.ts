// Loads the compiled addon and types its surface. Only lib/ talks to it.
import * as fs from 'fs';
import * as path from 'path';

export type NativeMode = 'parallel' | 'chunkwise' | 'recurrent';
export const WEIGHT_FORMATS = ['f32', 'bf16', 'int8'] as const;
export type WeightFormat = (typeof WEIGHT_FORMATS)[number];

/**
 * What a training pass's layer products (projections and feed-forward, forward and backward)
 * round their inputs to: 'fp32' (none), or 'bf16', multiplied on AVX512-BF16's dot product
 * where the CPU has it, always summed in fp32. The output head and loss, retention, weights,
 * gradients, optimizer state and everything else stay fp32. CPU only.
 */
export type Precision = 'fp32' | 'bf16';

/** The backend a native model runs on. */
export type NativeDevice = 'cpu' | 'cuda';

/** How the addon was built: threads, CPU GEMM kernel set, whether CUDA was compiled in and how many devices it sees. */
export interface NativeBuildInfo {
  threads: number;
  /** The CPU kernel set: 'avx512', 'avx2-fma' or 'generic' (see RETNET_CPU_ISA). */
  gemm: string;
  /** Whether bf16 products run on the CPU's bf16 dot product (AVX512-BF16); else on fp32 arithmetic. */
  bf16Dot: boolean;
  cuda: boolean;
  cudaDevices: number;
  /**
   * The GEMM a CUDA model created now uses for full-sequence products: 'cublas (<library>)',
   * 'own (<why not cuBLAS>)' or 'error: ...' (a bad RETNET_CUDA_GEMM); '' without CUDA.
   */
  cudaGemm: string;
}

export interface NativeState {
  positions(): number[];
  clone(): NativeState;
  exportState(): { kv: Float32Array; scale: Float32Array; positions: number[] };
  /** `prefix`, then exportState's kv and scale as float32 bytes, assembled off the JS thread. */
  saveState(prefix: Uint8Array): Promise<Buffer>;
  /**
   * Sets the positions and checks the sizes and scale now (throws); checks kv and copies it in
   * off the JS thread (rejects). `kv` is read then: it must not change until this settles.
   */
  importState(kv: Float32Array, scale: Float32Array, positions: number[]): Promise<void>;
  dispose(): void;
}

/** Sampling options as lib/sampling.ts resolves them (defaults filled in, validated). */
export interface NativeSamplerOptions {
  temperature: number;
  topK: number;
  topP: number;
  repetitionPenalty: number;
}

/**
 * Draws prefillBatch makes on its worker, one entry per state: a batch-1 state with a sampler gets
 * its next token drawn from its logits' first vocab[i] ids with histories[i] penalised (as
 * sampler.sample would), written to sampled[i] when the call completes (-1 for states without
 * a sampler); its outputs[i] is then left as it was. A sampler is busy until the call ends.
 */
export interface NativeStepSampling {
  samplers: (NativeSampler | null)[];
  histories: Int32Array[];
  vocab: Int32Array;
  sampled: Int32Array;
}

/** A decodeRun's draws: a sampler for every state, as NativeStepSampling's (busy until the run ends). */
export interface NativeRunSampling {
  samplers: NativeSampler[];
  histories: Int32Array[];
  vocab: Int32Array;
}

/** A decodeRun in progress. */
export interface NativeDecodeRun {
  /** Resolves the steps taken, after the last onStep; rejects with a step's error or what onStep threw. */
  done: Promise<number>;
  /** Lets the run take up to `steps` steps in all (a lower figure changes nothing). */
  grant(steps: number): void;
  /** Ends the run after the step in progress. */
  stop(): void;
}

/** A sampler and its PRNG stream (csrc/sampler.cc); sample() runs on the calling thread. */
export interface NativeSampler {
  /** One id from logits; `history` ids in [0, logits.length) are penalised once each. */
  sample(logits: Float32Array, history: Int32Array): number;
}

export type TrainMode = 'parallel' | 'chunkwise';

/** One micro-batch of trainStep: tokens [batch*length]; targets (-1 = ignore) and mask [batch*length] or null. */
export interface NativeMicroBatch {
  tokens: Int32Array;
  batch: number;
  length: number;
  targets: Int32Array | null;
  mask: Float32Array | null;
}

export interface NativeTrainOptions {
  mode: TrainMode;
  chunkSize: number;
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Global gradient-norm clip; 0 = off. */
  clipNorm: number;
  /** Parameter names without weight decay. */
  noDecay: string[];
  /** Seed of dropout / drop path (config rates > 0); micro-batch k draws from its own stream. */
  seed: number;
  /** Recompute each layer's activations in the backward instead of keeping them (absent: false). */
  checkpointActivations?: boolean;
  /** What the layers' linear products round their inputs to (absent: 'fp32'); see Precision. */
  precision?: Precision;
}

export interface NativeModel {
  forward(tokens: Int32Array, batch: number, length: number, mode: NativeMode, chunkSize: number): Promise<Float32Array>;
  /** Σ of next-token cross-entropy over every row and position but the last (length >= 2), on a worker. */
  lossSum(tokens: Int32Array, batch: number, length: number, mode: NativeMode, chunkSize: number): Promise<number>;
  createState(batch: number): NativeState;
  prefill(state: NativeState, tokens: Int32Array, length: number, mode: NativeMode, chunkSize: number): Promise<Float32Array>;
  /** With `logits` (batch * V floats), fills and resolves that buffer instead of a new one. */
  step(state: NativeState, tokens: Int32Array, logits?: Float32Array): Promise<Float32Array>;
  /**
   * Converts the projection weights to bf16 / int8 for good (every product then reads them), and
   * changes weightVersion(). The format they already have: no change; compact weights take no
   * other format (their fp32 values are gone).
   */
  setWeightFormat(format: WeightFormat): Promise<void>;
  /** One decode step for several states (rows in order); logits [sum of batches, V]. */
  stepBatch(states: NativeState[], tokens: Int32Array): Promise<Float32Array>;
  /**
   * The same, with each state's logits (its batch * V floats) written into `outputs[i]` on the JS
   * thread when the step completes: no fresh buffer (and page faults) per step. Resolves `outputs`.
   */
  stepBatch(states: NativeState[], tokens: Int32Array, outputs: Float32Array[]): Promise<Float32Array[]>;
  /**
   * Decode steps for batch-1 states on one worker, with no trip through JS between them: each
   * step draws every state's next token with its sampler (histories[i] growing by each draw
   * where the sampler penalises) and feeds it back as that state's next token. onStep gets each
   * step's drawn tokens, in order, on the JS thread, in one array the run refills each step: it
   * must read them during the call. The run ends after the step where stop()
   * was called, a state drew one of its stopTokens[i] or took maxSteps[i] steps, or the steps
   * taken reach `granted` (raised by grant()).
   */
  decodeRun(
    states: NativeState[],
    tokens: Int32Array,
    sampling: NativeRunSampling,
    maxSteps: Int32Array,
    stopTokens: Int32Array[],
    granted: number,
    onStep: (tokens: Int32Array) => void,
  ): NativeDecodeRun;
  /**
   * Prefills batch-1 states at once: state i consumes the next lengths[i] of `tokens`, and
   * outputs[i] (V floats) gets its next-token logits, written on the JS thread at completion.
   * The products run over every state's rows together, retention per state: on the CPU each
   * state ends bit for bit as prefill() alone would leave it. Resolves `outputs`. `sampling`
   * draws a state's next token on the worker instead (see NativeStepSampling).
   */
  prefillBatch(
    states: NativeState[],
    tokens: Int32Array,
    lengths: Int32Array,
    mode: NativeMode,
    chunkSize: number,
    outputs: Float32Array[],
    sampling?: NativeStepSampling,
  ): Promise<Float32Array[]>;
  getParam(name: string): Float32Array;
  /** getParam, copied off the JS thread. */
  readParam(name: string): Promise<Float32Array>;
  paramNames(): string[];
  /** Replaces one parameter (sizes and finiteness checked). */
  setParam(name: string, data: Float32Array): void;
  /** Drops the AdamW moments and step (a new Trainer starts from zero). */
  resetOptimizer(): void;
  /** Copies parameter values in off the JS thread. Sizes and names are checked here; finiteness on the worker (a rejection names the tensor, value and index). */
  setParams(tensors: Record<string, Float32Array>): Promise<void>;
  /** Changes whenever a call that modifies the weights (setParam, setParams, trainStep) starts. */
  weightVersion(): number;
  /** Mean next-token (or `targets`) cross-entropy and its gradient per trainable parameter (tied: embed_tokens.weight only). */
  lossAndGradients(
    tokens: Int32Array,
    batch: number,
    length: number,
    mode: TrainMode,
    chunkSize: number,
    targets: Int32Array | null,
    mask: Float32Array | null,
    seed: number,
    checkpointActivations: boolean,
    precision: Precision,
  ): Promise<{ loss: number; grads: Record<string, Float32Array> }>;
  /**
   * One optimizer step in one native call: forward+backward of each micro-batch (equal weights), global-norm
   * clipping (gradNorm is the norm before clipping), AdamW, zeroed gradients. loss is the mean of the
   * micro-batch losses; tokens is Σ batch*length. Fails at once while another call uses the model.
   */
  trainStep(micro: NativeMicroBatch[], opts: NativeTrainOptions): Promise<{ loss: number; gradNorm: number; tokens: number }>;
  /** AdamW moments, each parameter's in rows as getParam gives it, one after another in paramNames() order (buffers included), and the step count, copied off the JS thread. */
  readOptimizerState(): Promise<{ step: number; m: Float32Array; v: Float32Array }>;
  /** Sizes checked at once (throws); values checked and copied in off the JS thread (rejects). */
  setOptimizerState(step: number, m: Float32Array, v: Float32Array): Promise<void>;
  dispose(): void;
}

export interface NativeAddon {
  /** The seed is a safe integer: the same seed gives lib/random.ts's Rng stream. */
  NativeSampler: new (options: NativeSamplerOptions, seed: number) => NativeSampler;
  /** Rejects with "retnet was built without CUDA" or "no CUDA device: <reason>" when 'cuda' cannot be used. */
  createModel(config: object, tensors: Record<string, Float32Array>, device?: NativeDevice): Promise<NativeModel>;
  buildInfo(): NativeBuildInfo;
  /** Zeroes `array`, handing its whole pages back to the system (for a buffer that is done with). */
  discardMemory(array: Float32Array): void;
  /** The CPU GEMM alone (tests): c[M, N] (=|+=) a b, a [M, K] or [K, M], b [K, N] or [N, K], row-major. */
  gemm(
    a: Float32Array,
    b: Float32Array,
    c: Float32Array,
    options: {
      M: number;
      N: number;
      K: number;
      aTransposed: boolean;
      bTransposed: boolean;
      accumulate: boolean;
      /** What the inputs are rounded to before the products (default 'fp32'). */
      precision?: Precision;
    },
  ): Promise<void>;
  /**
   * The int8 product alone (tests): y[M, N] = x[M, K] times the weight [N, K] whose row j is
   * weights[j] * scales[j], as a model's int8 projections compute it (activations on their
   * 16-bit grid, exact integer sums).
   */
  int8Linear(
    weights: Int8Array,
    scales: Float32Array,
    x: Float32Array,
    y: Float32Array,
    options: { M: number; N: number; K: number },
  ): Promise<void>;
  /**
   * The CPU model's fp32 product alone (tests): y[M, N] = x[M, K] times weights [N, K]
   * (row-major, laid out in panels of 64 output rows first, as the CPU keeps projection weights).
   */
  panelLinear(
    weights: Float32Array,
    x: Float32Array,
    y: Float32Array,
    options: { M: number; N: number; K: number; precision?: 'fp32' | 'bf16' },
  ): Promise<void>;
  /** Its backward (tests): dx (=, or += with accumulateDx) dy W and dw += dy^T x, dw [N, K] row-major. */
  panelLinearBackward(
    weights: Float32Array,
    x: Float32Array,
    dy: Float32Array,
    dx: Float32Array,
    dw: Float32Array,
    options: { M: number; N: number; K: number; accumulateDx?: boolean; precision?: 'fp32' | 'bf16' },
  ): Promise<void>;
  benchKernel(name: 'fma_peak', params: { reps: number }): Promise<number>;
  benchKernel(name: 'bandwidth', params: { megabytes: number; reps: number }): Promise<number>;
  benchKernel(name: 'linear', params: { M: number; N: number; K: number; reps: number }): Promise<number>;
  /** Seconds of one decode product (M batch rows) with its weight read from memory, as in a decode step. */
  benchKernel(name: 'decode_product', params: { M: number; N: number; K: number; reps: number }): Promise<number>;
  benchKernel(
    name: 'retention',
    params: { B: number; T: number; H: number; dk: number; dv: number; chunk: number; parallel: boolean; reps: number },
  ): Promise<number>;
}

let cached: NativeAddon | undefined;

/** Finds build/Release/retnet.node above this file (lib/ under ts-jest, dist/lib/ when compiled). */
export function addon(): NativeAddon {
  if (cached) return cached;
  // The addon reads this once, at its first product; a typo would silently keep the default.
  const isa = process.env.RETNET_CPU_ISA;
  if (isa !== undefined && !['avx512', 'avx2', 'generic'].includes(isa)) {
    throw new Error(`RETNET_CPU_ISA must be 'avx512', 'avx2' or 'generic' (a cap on the CPU kernels), got ${JSON.stringify(isa)}`);
  }
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    const candidate = path.join(dir, 'build', 'Release', 'retnet.node');
    if (fs.existsSync(candidate)) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      cached = require(candidate) as NativeAddon;
      return cached;
    }
    dir = path.dirname(dir);
  }
  throw new Error('retnet native addon not found: run `npm install` (or `npm run build`) to compile it');
}
