// Training loop around the native train step: option checking, the learning-rate schedule,
// micro-batching, evaluation, fit() with checkpoints, and resume.
//
// Each optimizer step is a single native call (forward + backward over every micro-batch, global
// gradient-norm clipping, AdamW); this file only decides what goes into that call.

import { performance } from 'perf_hooks';

import { checkCheckpointTarget, loadCheckpoint, saveCheckpoint } from './checkpoint';
import { parameterShapes } from './config';
import type { Dataset, DatasetState } from './dataset';
import type { RetNet } from './model';
import type { NativeMicroBatch, Precision, TrainMode } from './native';
import { TokenBatch, TokenInput, toTokenBatch } from './tokens';
import { optionsObject } from './typed';

export type LrSchedule = 'cosine' | 'linear' | 'constant';
export type { TrainMode };

export interface TrainerOptions {
  /** Peak learning rate (reached at the end of warmup). */
  lr: number;
  /** Floor the cosine/linear decay ends at, in [0, lr]. Default lr / 10. */
  minLr?: number;
  /** Steps of linear warmup from lr / warmupSteps up to lr, an integer in [0, totalSteps]. Default 0. */
  warmupSteps?: number;
  /** Decay after warmup. Default 'cosine'. */
  schedule?: LrSchedule;
  /** Step at which the decay reaches minLr (later steps stay there), an integer >= 1. */
  totalSteps: number;
  /** AdamW first-moment decay, in [0, 1). Default 0.9. */
  beta1?: number;
  /** AdamW second-moment decay, in [0, 1). Default 0.95. */
  beta2?: number;
  /** AdamW denominator epsilon, > 0. Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay, >= 0. Default 0.1. */
  weightDecay?: number;
  /** Parameter names without weight decay. Default: every norm weight (see defaultNoDecay). */
  noDecay?: string[];
  /** Global gradient-norm clip, >= 0 (0 turns it off). Default 1.0. */
  clipNorm?: number;
  /** Micro-batches accumulated into one step, an integer >= 1. Default 1. */
  gradAccumulation?: number;
  /** Retention form for training and evaluation. Default: 'chunkwise' if the model's config sets chunkwise_recurrent, else 'parallel' (as forward() and torchscale). */
  mode?: TrainMode;
  /** Chunk size for 'chunkwise'. Default: the model's recurrent_chunk_size. */
  chunkSize?: number;
  /** Seed of the native core's training randomness (reserved for dropout), a safe integer. Default 0. */
  seed?: number;
  /**
   * Activation checkpointing: keep only each layer's input in the forward and recompute the
   * layer's activations before its backward. Activation memory drops from all layers to one, for
   * one more forward pass through the layers (about a quarter more time); the step's numbers are
   * unchanged. Default false.
   */
  checkpointActivations?: boolean;
  /**
   * What the layers' linear products of each step round their inputs to: 'fp32' (default), or
   * 'bf16', which runs them on AVX512-BF16's dot product where the CPU has it, summed in fp32;
   * the output head, weights, gradients and AdamW state stay fp32, and evaluate() stays fp32.
   * Without AVX512-BF16 the same rounding runs at fp32 speed. CPU only. See Precision.
   */
  precision?: Precision;
}

export type ResolvedTrainerOptions = Required<TrainerOptions>;

/**
 * A step's tokens: one batch (number[][] or { data, shape }) whose rows are split evenly into
 * gradAccumulation micro-batches, or an array of exactly gradAccumulation batches, one per
 * micro-batch. Every row trains positions 0..T-2 to predict the token after them.
 */
export type StepInput = TokenInput | TokenInput[];

export interface StepResult {
  /** Number of the step just taken (1 for the first). */
  step: number;
  /** Mean cross-entropy over the step's predicted tokens (nats/token), before the update. */
  loss: number;
  /** Learning rate used by this step. */
  lr: number;
  /** Global gradient norm before clipping. */
  gradNorm: number;
  /** Input tokens (rows x length) per second of wall time of the step. */
  tokensPerSecond: number;
}

export interface StepRecord {
  step: number;
  loss: number;
  lr: number;
  gradNorm: number;
}

export interface TrainingHistory {
  steps: StepRecord[];
  validation: Array<{ step: number; loss: number }>;
}

export interface FitProgress {
  kind: 'step' | 'eval' | 'checkpoint';
  step: number;
  totalSteps: number;
  /** For 'step': that step's numbers. */
  result?: StepResult;
  /** For 'eval': the mean validation loss (nats/token). */
  validationLoss?: number;
  /** For 'checkpoint': where it was written. */
  checkpointDir?: string;
  elapsedSeconds: number;
  /** Estimated seconds left, from the mean step time of this fit() call. */
  etaSeconds: number;
}

const DEFAULT_FIT_BATCH = 8;

export interface FitOptions {
  /** Rows per step (split into gradAccumulation micro-batches), an integer >= 1. Default 8. */
  batchSize?: number;
  /** Train until the trainer has taken this many steps in total. Default: totalSteps. */
  steps?: number;
  /** Evaluate on the validation batches every this many steps (0: only at the end). Default 0. */
  evalEvery?: number;
  /** Use at most this many validation batches per evaluation. Default: all. */
  evalBatches?: number;
  /** Write a checkpoint every this many steps (0: only at the end). Default 0. */
  checkpointEvery?: number;
  /** Checkpoint directory; without it no checkpoint is written. */
  checkpointDir?: string;
  /** Aborting stops after the step in progress (and writes a checkpoint when checkpointDir is set). */
  signal?: AbortSignal;
  onProgress?: (progress: FitProgress) => void;
}

export interface FitSummary {
  startStep: number;
  endStep: number;
  stepsRun: number;
  aborted: boolean;
  /** Loss of the last step (NaN when no step ran). */
  lastLoss: number;
  /** Mean loss of the last (up to) 20 steps (NaN when no step ran). */
  recentLoss: number;
  /** Validation loss (nats/token) of this call's last evaluation (the final one unless aborted); undefined if none ran. */
  validationLoss: number | undefined;
  elapsedSeconds: number;
  /** Trained tokens per second over the whole call, evaluation and checkpoints included. */
  tokensPerSecond: number;
  checkpointDir: string | undefined;
}

const OPTION_NAMES = [
  'lr',
  'minLr',
  'warmupSteps',
  'schedule',
  'totalSteps',
  'beta1',
  'beta2',
  'eps',
  'weightDecay',
  'noDecay',
  'clipNorm',
  'gradAccumulation',
  'mode',
  'chunkSize',
  'seed',
  'checkpointActivations',
  'precision',
] as const;

const RECENT_STEPS = 20;

function optionError(name: string, requirement: string, value: unknown): Error {
  return new Error(`invalid trainer option: ${name} must be ${requirement}, got ${JSON.stringify(value) ?? String(value)}`);
}

function isFiniteNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/** Parameters that get no weight decay by default: the norm gains (decaying them towards 0 only hurts). */
export function defaultNoDecay(model: RetNet): string[] {
  return parameterShapes(model.config)
    .map(([name]) => name)
    .filter((name) => /(^|[._])(layer_norm|layernorm_embedding)\.weight$/.test(name));
}

/** Fills defaults and throws an Error naming the first invalid option. */
export function resolveTrainerOptions(model: RetNet, options: TrainerOptions): ResolvedTrainerOptions {
  if (options === null || typeof options !== 'object') throw new Error('Trainer: options must be an object');
  // Each field read once: what is checked is what is used (a getter could answer differently).
  const o: TrainerOptions = { ...options };
  for (const key of Object.keys(o)) {
    if (!(OPTION_NAMES as readonly string[]).includes(key)) throw new Error(`invalid trainer option: unknown option ${key}`);
  }
  // lr, the betas and eps reach the native step as float32, chunkSize as int32.
  if (!isFiniteNumber(o.lr) || !(Math.fround(o.lr) > 0) || !Number.isFinite(Math.fround(o.lr))) {
    throw optionError('lr', 'a number > 0 that float32 holds (1.4e-45 to 3.4e38)', o.lr);
  }
  const minLr = o.minLr ?? o.lr / 10;
  if (!isFiniteNumber(minLr) || minLr < 0 || minLr > o.lr) throw optionError('minLr', `a number in [0, lr=${o.lr}]`, o.minLr);
  if (!Number.isSafeInteger(o.totalSteps) || o.totalSteps < 1) throw optionError('totalSteps', 'an integer >= 1', o.totalSteps);
  const warmupSteps = o.warmupSteps ?? 0;
  if (!Number.isSafeInteger(warmupSteps) || warmupSteps < 0 || warmupSteps > o.totalSteps) {
    throw optionError('warmupSteps', `an integer in [0, totalSteps=${o.totalSteps}]`, o.warmupSteps);
  }
  const schedule = o.schedule ?? 'cosine';
  if (!['cosine', 'linear', 'constant'].includes(schedule)) throw optionError('schedule', "'cosine', 'linear' or 'constant'", o.schedule);
  const beta1 = o.beta1 ?? 0.9;
  if (!isFiniteNumber(beta1) || beta1 < 0 || Math.fround(beta1) >= 1) throw optionError('beta1', 'a number in [0, 1) (below 1 as a float32)', o.beta1);
  const beta2 = o.beta2 ?? 0.95;
  if (!isFiniteNumber(beta2) || beta2 < 0 || Math.fround(beta2) >= 1) throw optionError('beta2', 'a number in [0, 1) (below 1 as a float32)', o.beta2);
  const eps = o.eps ?? 1e-8;
  if (!isFiniteNumber(eps) || !(Math.fround(eps) > 0)) throw optionError('eps', 'a finite number > 0 (above 0 as a float32)', o.eps);
  const weightDecay = o.weightDecay ?? 0.1;
  if (!isFiniteNumber(weightDecay) || weightDecay < 0) throw optionError('weightDecay', 'a finite number >= 0', o.weightDecay);
  const parameterNames = new Set(model.native().paramNames());
  const noDecay = o.noDecay ?? defaultNoDecay(model);
  if (!Array.isArray(noDecay) || !noDecay.every((name) => typeof name === 'string' && parameterNames.has(name))) {
    throw optionError('noDecay', "an array of the model's parameter names", o.noDecay);
  }
  const clipNorm = o.clipNorm ?? 1.0;
  if (!isFiniteNumber(clipNorm) || clipNorm < 0) throw optionError('clipNorm', 'a finite number >= 0 (0: off)', o.clipNorm);
  const gradAccumulation = o.gradAccumulation ?? 1;
  if (!Number.isSafeInteger(gradAccumulation) || gradAccumulation < 1) {
    throw optionError('gradAccumulation', 'an integer >= 1', o.gradAccumulation);
  }
  const mode = o.mode ?? (model.config.chunkwise_recurrent ? 'chunkwise' : 'parallel');
  if (mode !== 'parallel' && mode !== 'chunkwise') throw optionError('mode', "'parallel' or 'chunkwise'", o.mode);
  const chunkSize = o.chunkSize ?? model.config.recurrent_chunk_size;
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1 || chunkSize > 2 ** 31 - 1) throw optionError('chunkSize', 'an integer from 1 to 2^31 - 1', o.chunkSize);
  const seed = o.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw optionError('seed', 'a safe integer', o.seed);
  const checkpointActivations = o.checkpointActivations ?? false;
  if (typeof checkpointActivations !== 'boolean') throw optionError('checkpointActivations', 'a boolean', o.checkpointActivations);
  const precision = o.precision ?? 'fp32';
  if (precision !== 'fp32' && precision !== 'bf16') throw optionError('precision', "'fp32' or 'bf16'", o.precision);
  return {
    lr: o.lr,
    minLr,
    warmupSteps,
    schedule,
    totalSteps: o.totalSteps,
    beta1,
    beta2,
    eps,
    weightDecay,
    noDecay: [...noDecay],
    clipNorm,
    gradAccumulation,
    mode,
    chunkSize,
    seed,
    checkpointActivations,
    precision,
  };
}

/**
 * Learning rate of step `step` (1-based): linear warmup to lr over warmupSteps, then decay from
 * lr to minLr by totalSteps along the schedule ('constant' stays at lr), minLr after totalSteps.
 */
export function learningRateAt(
  step: number,
  o: Pick<ResolvedTrainerOptions, 'lr' | 'minLr' | 'warmupSteps' | 'schedule' | 'totalSteps'>,
): number {
  if (step <= o.warmupSteps) return (o.lr * step) / o.warmupSteps;
  if (o.schedule === 'constant') return o.lr;
  const decaySteps = o.totalSteps - o.warmupSteps;
  const progress = decaySteps > 0 ? Math.min(1, (step - o.warmupSteps) / decaySteps) : 1;
  const remaining = o.schedule === 'cosine' ? 0.5 * (1 + Math.cos(Math.PI * progress)) : 1 - progress;
  return o.minLr + (o.lr - o.minLr) * remaining;
}

/** Per-step seed for the native core: differs every step and is the same again after a resume. */
function stepSeed(seed: number, step: number): number {
  return ((seed >>> 0) ^ Math.imul(step, 0x9e3779b9)) >>> 0;
}

function isBatchList(input: StepInput): input is TokenInput[] {
  if (!Array.isArray(input) || input.length === 0) return false;
  const first = input[0] as unknown;
  // number[][] has number rows; a list of batches has number[][] or { data, shape } entries.
  return (Array.isArray(first) && Array.isArray(first[0])) || (!Array.isArray(first) && typeof first === 'object' && first !== null);
}

/** A micro-batch for the native core, whose default targets are the next tokens (none for the last position). */
function nextTokenMicroBatch({ data, shape: [B, T] }: TokenBatch): NativeMicroBatch {
  return { tokens: data, batch: B, length: T, targets: null, mask: null };
}

/** The Trainer that drives each model's optimizer state (the newest one made for it). */
const optimizerOwners = new WeakMap<RetNet, Trainer>();

export class Trainer {
  readonly model: RetNet;
  readonly options: ResolvedTrainerOptions;
  private steps = 0;
  private busy = false;
  private readonly history: TrainingHistory = { steps: [], validation: [] };

  constructor(model: RetNet, options: TrainerOptions) {
    options = optionsObject(options, 'Trainer');
    if (model.weights !== 'f32') {
      throw new Error(`Trainer needs a model with fp32 weights; this one holds ${model.weights} weights (load it without the weights option)`);
    }
    this.model = model;
    this.options = resolveTrainerOptions(model, options);
    // One Trainer drives a model's optimizer: a new one starts from fresh AdamW moments and
    // step 0 (its schedule starts at step 1), and the previous one can no longer step or save.
    model.native().resetOptimizer();
    optimizerOwners.set(model, this);
  }

  /** Steps taken so far (including those before a resume). */
  get stepCount(): number {
    return this.steps;
  }

  /** Every step's loss/lr/gradNorm and every evaluation, oldest first. */
  get trainingHistory(): TrainingHistory {
    return { steps: this.history.steps.slice(), validation: this.history.validation.slice() };
  }

  /** Learning rate the next step will use. */
  get nextLearningRate(): number {
    return learningRateAt(this.steps + 1, this.options);
  }

  /** One optimizer step (see StepInput for how a batch is split into micro-batches). */
  async step(input: StepInput): Promise<StepResult> {
    const micro = this.microBatches(input);
    const stepNumber = this.steps + 1;
    const lr = learningRateAt(stepNumber, this.options);
    const o = this.options;
    const started = performance.now();
    const result = await this.exclusive('step', () =>
      this.model.native().trainStep(micro, {
        mode: o.mode,
        chunkSize: o.chunkSize,
        lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weightDecay: o.weightDecay,
        clipNorm: o.clipNorm,
        noDecay: o.noDecay,
        seed: stepSeed(o.seed, stepNumber),
        checkpointActivations: o.checkpointActivations,
        precision: o.precision,
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    this.steps = stepNumber;
    this.history.steps.push({ step: stepNumber, loss: result.loss, lr, gradNorm: result.gradNorm });
    return { step: stepNumber, loss: result.loss, lr, gradNorm: result.gradNorm, tokensPerSecond: result.tokens / seconds };
  }

  /** Mean next-token cross-entropy (nats/token) over every row of every batch, from forward passes only. */
  async evaluate(batches: TokenInput[]): Promise<number> {
    if (!Array.isArray(batches) || batches.length === 0) throw new Error('Trainer.evaluate: no batches given');
    const V = this.model.vocabSize;
    return this.exclusive('evaluate', async () => {
      let lossSum = 0;
      let predictions = 0;
      for (const input of batches) {
        const batch = toTokenBatch(input, V);
        const [B, T] = batch.shape;
        if (T < 2) throw new Error('Trainer.evaluate: rows need at least 2 tokens (one to predict)');
        // On the worker: the cross-entropy over [B, T, V] logits stalled the event loop (95 ms at 4 x 256, V 8192).
        lossSum += await this.model.native().lossSum(batch.data, B, T, this.options.mode, this.options.chunkSize);
        predictions += B * (T - 1);
      }
      return lossSum / predictions;
    });
  }

  /**
   * Trains on `dataset` until `steps` total steps, evaluating and checkpointing as asked.
   * Throws if the loss stops being finite (the weights are then unusable).
   */
  async fit(dataset: Dataset, options: FitOptions): Promise<FitSummary> {
    options = optionsObject(options, 'fit');
    const o = checkFitOptions(options, this.options.totalSteps);
    const methods = ['nextBatch', 'validationBatches', 'getState'] as const;
    if (dataset === null || typeof dataset !== 'object' || methods.some((m) => typeof (dataset as unknown as Record<string, unknown>)[m] !== 'function')) {
      throw new Error('fit: the first argument must be a Dataset (nextBatch, validationBatches and getState)');
    }
    // Before any step: a run should not train for an hour, then refuse its first checkpoint.
    if (o.checkpointDir !== undefined) await checkCheckpointTarget(o.checkpointDir);
    const startStep = this.steps;
    const started = performance.now();
    const elapsed = () => (performance.now() - started) / 1000;
    const eta = () => {
      const done = this.steps - startStep;
      return done === 0 ? NaN : (elapsed() / done) * (o.steps - this.steps);
    };
    const report = (progress: Omit<FitProgress, 'step' | 'totalSteps' | 'elapsedSeconds' | 'etaSeconds'>) =>
      o.onProgress?.({ ...progress, step: this.steps, totalSteps: o.steps, elapsedSeconds: elapsed(), etaSeconds: eta() });
    const validate = async () => {
      if (dataset.validationTokens.length === 0) return undefined;
      const loss = await this.evaluate(dataset.validationBatches(o.batchSize, o.evalBatches));
      this.history.validation.push({ step: this.steps, loss });
      report({ kind: 'eval', validationLoss: loss });
      return loss;
    };
    let checkpointedAt = startStep;
    const checkpoint = async () => {
      if (o.checkpointDir === undefined) return;
      await saveCheckpoint(o.checkpointDir, { model: this.model, trainer: this, dataset });
      checkpointedAt = this.steps;
      report({ kind: 'checkpoint', checkpointDir: o.checkpointDir });
    };

    let trainedTokens = 0;
    let validationLoss: number | undefined;
    let aborted = false;
    while (this.steps < o.steps) {
      if (o.signal?.aborted) {
        aborted = true;
        break;
      }
      const batch = dataset.nextBatch(o.batchSize);
      let result: StepResult;
      try {
        result = await this.step(batch);
      } catch (e) {
        // A step that fails before its update (a non-finite gradient) leaves the weights and
        // moments as they were: the run up to it is saved before the error goes up. One whose
        // update made the weights non-finite can't be saved (save refuses them), so the
        // checkpoint already there stays.
        if (o.checkpointDir === undefined || this.steps === checkpointedAt) throw e;
        try {
          await checkpoint();
        } catch (saveError) {
          throw new Error(`${(e as Error).message}; ${o.checkpointDir} was left as it was (${(saveError as Error).message})`, { cause: e });
        }
        throw new Error(`${(e as Error).message}; the run up to step ${this.steps} is saved in ${o.checkpointDir}`, { cause: e });
      }
      if (!Number.isFinite(result.loss)) {
        throw new Error(`training diverged at step ${result.step}: loss ${result.loss} (try a lower lr or clipNorm)`);
      }
      trainedTokens += batch.shape[0] * batch.shape[1];
      report({ kind: 'step', result });
      const last = this.steps === o.steps;
      if (!last && o.evalEvery > 0 && this.steps % o.evalEvery === 0) validationLoss = await validate();
      if (!last && o.checkpointEvery > 0 && this.steps % o.checkpointEvery === 0) await checkpoint();
    }
    // An abort asks to stop soon, so it skips the final evaluation but still saves the run.
    if (!aborted) validationLoss = await validate();
    await checkpoint();

    const recent = this.history.steps.slice(Math.max(startStep, this.history.steps.length - RECENT_STEPS));
    const seconds = elapsed();
    return {
      startStep,
      endStep: this.steps,
      stepsRun: this.steps - startStep,
      aborted,
      lastLoss: recent.at(-1)?.loss ?? NaN,
      recentLoss: recent.length === 0 ? NaN : recent.reduce((sum, r) => sum + r.loss, 0) / recent.length,
      validationLoss,
      elapsedSeconds: seconds,
      tokensPerSecond: trainedTokens / seconds,
      checkpointDir: o.checkpointDir,
    };
  }

  /** @internal The optimizer moments and step count, for checkpoints. */
  optimizerState(): Promise<{ step: number; m: Float32Array; v: Float32Array }> {
    return this.model.native().readOptimizerState();
  }

  /**
   * Continues a run from a checkpoint directory written by fit() or saveCheckpoint(). `overrides`
   * replace saved options (e.g. a larger totalSteps). Pass `datasetState` to Dataset.setState of
   * a dataset built from the same data with the same options; the following steps then match an
   * uninterrupted run bit for bit.
   */
  static async resume(
    dir: string,
    overrides: Partial<TrainerOptions> = {},
  ): Promise<{ model: RetNet; trainer: Trainer; datasetState: DatasetState | undefined }> {
    const checkpoint = await loadCheckpoint(dir);
    const { model, state, optimizer } = checkpoint;
    try {
      const trainer = new Trainer(model, { ...state.options, ...overrides });
      await model.native().setOptimizerState(optimizer.step, optimizer.m, optimizer.v);
      trainer.steps = state.step;
      trainer.history.steps.push(...state.history.steps);
      trainer.history.validation.push(...state.history.validation);
      return { model, trainer, datasetState: state.dataset };
    } catch (e) {
      model.dispose();
      throw e;
    }
  }

  private microBatches(input: StepInput): NativeMicroBatch[] {
    const k = this.options.gradAccumulation;
    const V = this.model.vocabSize;
    let batches: TokenBatch[];
    if (isBatchList(input)) {
      if (input.length !== k) {
        throw new Error(`Trainer.step: got ${input.length} micro-batches but gradAccumulation is ${k}`);
      }
      batches = input.map((batch) => toTokenBatch(batch, V));
    } else {
      const whole = toTokenBatch(input, V);
      const [B, T] = whole.shape;
      if (B % k !== 0) {
        throw new Error(`Trainer.step: batch of ${B} rows does not split into gradAccumulation=${k} equal micro-batches`);
      }
      const rows = B / k;
      batches = Array.from({ length: k }, (_, i) => ({
        data: whole.data.subarray(i * rows * T, (i + 1) * rows * T),
        shape: [rows, T] as [number, number],
      }));
    }
    for (const { shape } of batches) {
      if (shape[1] < 2) throw new Error('Trainer.step: rows need at least 2 tokens (one to predict)');
    }
    return batches.map(nextTokenMicroBatch);
  }

  /**
   * @internal Runs `work` unless a step, evaluation or checkpoint is already running: they share
   * the model's native state, and a checkpoint must not see a half-applied step.
   */
  async exclusive<T>(what: string, work: () => Promise<T>): Promise<T> {
    if (optimizerOwners.get(this.model) !== this) {
      throw new Error(`Trainer.${what}: a newer Trainer on this model has taken over its optimizer (a new Trainer starts from fresh AdamW moments); use that one`);
    }
    if (this.busy) throw new Error(`Trainer.${what}: a step, evaluation or checkpoint is still running; await it before starting another`);
    this.busy = true;
    try {
      return await work();
    } finally {
      this.busy = false;
    }
  }
}

const FIT_OPTION_NAMES = ['batchSize', 'steps', 'evalEvery', 'evalBatches', 'checkpointEvery', 'checkpointDir', 'signal', 'onProgress'] as const;

function checkFitOptions(options: FitOptions, totalSteps: number): Required<Omit<FitOptions, 'checkpointDir' | 'signal' | 'onProgress'>> &
  Pick<FitOptions, 'checkpointDir' | 'signal' | 'onProgress'> {
  if (options === null || typeof options !== 'object') throw new Error('fit: options must be an object');
  const fail = (name: string, requirement: string, value: unknown) =>
    new Error(`invalid fit option: ${name} must be ${requirement}, got ${JSON.stringify(value) ?? String(value)}`);
  // A misspelt option (chekpointDir) would otherwise be a run that silently saves nothing.
  for (const key of Object.keys(options)) {
    if (!(FIT_OPTION_NAMES as readonly string[]).includes(key)) throw new Error(`invalid fit option: unknown option ${key}`);
  }
  const signal = options.signal as { aborted?: unknown; addEventListener?: unknown } | undefined;
  if (signal !== undefined && (typeof signal?.aborted !== 'boolean' || typeof signal.addEventListener !== 'function')) {
    throw fail('signal', 'an AbortSignal', options.signal);
  }
  if (options.onProgress !== undefined && typeof options.onProgress !== 'function') throw fail('onProgress', 'a function', options.onProgress);
  const { batchSize = DEFAULT_FIT_BATCH, steps = totalSteps, evalEvery = 0, evalBatches = Infinity, checkpointEvery = 0 } = options;
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw fail('batchSize', 'an integer >= 1', batchSize);
  if (!Number.isSafeInteger(steps) || steps < 0) throw fail('steps', 'an integer >= 0', steps);
  if (!Number.isSafeInteger(evalEvery) || evalEvery < 0) throw fail('evalEvery', 'an integer >= 0', evalEvery);
  if (!(evalBatches === Infinity || (Number.isSafeInteger(evalBatches) && evalBatches >= 1))) {
    throw fail('evalBatches', 'an integer >= 1', evalBatches);
  }
  if (!Number.isSafeInteger(checkpointEvery) || checkpointEvery < 0) throw fail('checkpointEvery', 'an integer >= 0', checkpointEvery);
  if (options.checkpointDir !== undefined && (typeof options.checkpointDir !== 'string' || options.checkpointDir === '')) {
    throw fail('checkpointDir', 'a non-empty path', options.checkpointDir);
  }
  return { ...options, batchSize, steps, evalEvery, evalBatches, checkpointEvery };
}
