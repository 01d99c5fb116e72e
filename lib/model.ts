// The public model: loading, saving, full-sequence forward, decode sessions and generation.
// Validation, files and tokenization live here; all arithmetic is in the native core.
import { promises as fsp } from 'fs';
import * as path from 'path';

import { RetNetConfig, countParameters, dims, parameterShapes, resolveConfig } from './config';
import { GenerateChunk, GenerateOptions, collectText, validateGenerateOptions } from './generate';
import { NativeDevice, NativeModel, Precision, WEIGHT_FORMATS, WeightFormat, addon } from './native';
import { TensorEntry, finishInterruptedReplace, openSafetensors, safetensorsWriter, writeFilesAtomic, writeSafetensorsFile } from './safetensors';
import { PrefillMode, Session, SessionOwner, checkPrefillOptions, restoreSessionState } from './session';
// serving: the batcher behind generate()
import { BatchingOptions, Scheduler, SchedulerOptions } from './scheduler';
import { ByteTokenizer, Tokenizer, checkTokenizer } from './tokenizer';
import { TokenInput, toTokenBatch } from './tokens';
import { formatValue, isTypedArray, optionsObject } from './typed';
import { EMBED, OUTPUT, checkWeights, generateWeightsYielding, largestParameter, largestShape, planWeights, plannedValues } from './weights';

export type ForwardMode = PrefillMode;

export interface ForwardOptions {
  /** Retention form. Default: 'chunkwise' if config.chunkwise_recurrent, else 'parallel' (as torchscale). */
  mode?: ForwardMode;
  /** Chunk size for 'chunkwise' (default: config.recurrent_chunk_size). */
  chunkSize?: number;
}

export interface LossOptions {
  /** Retention form: 'parallel' or 'chunkwise'. Default as forward(). */
  mode?: 'parallel' | 'chunkwise';
  /** Chunk size for 'chunkwise' (default: config.recurrent_chunk_size). */
  chunkSize?: number;
  /** Target id per position [B*T] (-1 = ignore). Default: the next token (the last position has none). */
  targets?: Int32Array;
  /** Weight per position [B*T] (finite, >= 0; 0 = ignore). loss = Σ mask·CE / Σ mask over positions with a target. */
  mask?: Float32Array;
  /** Seed of dropout / drop path when the config's rates are > 0 (default 0). */
  seed?: number;
  /**
   * Keep only each layer's input during the forward and recompute its activations just before
   * its backward: one layer's activations in memory instead of all of them, for one more forward
   * pass through the layers. The gradients are the same, bit for bit. Default false.
   */
  checkpointActivations?: boolean;
  /** What the layers' linear products round their inputs to: 'fp32' (default) or 'bf16' (see Precision). */
  precision?: Precision;
}

export interface ModelOptions {
  /**
   * Backend: 'cpu' (default), 'cuda' (device 0; fails when the build has no CUDA or no device is
   * usable) or 'auto' (CUDA when usable, else the CPU with a one-time console notice).
   */
  device?: 'cpu' | 'cuda' | 'auto';
  /** Tokenizer for string prompts (default: ByteTokenizer when the vocabulary has >= 256 ids). */
  tokenizer?: Tokenizer;
  /**
   * The projection weights' format: 'f32' (default), or compact 'bf16' / 'int8' (one scale per
   * output row). A compact model converts them as they load and keeps no fp32 copy: decode steps
   * move 2x / 4x fewer bytes, the model takes about that much less memory, and every form
   * (forward, prefill, decode) reads the same compact weights. Embedding and norms stay fp32.
   * Such a model cannot be trained or saved; stateDict() gives its compact values as fp32.
   * CPU only: a model on 'cuda' rejects them.
   */
  weights?: WeightFormat;
}

export interface CreateOptions extends ModelOptions {
  /** Seed of torchscale's initialisation (default 0). */
  seed?: number;
}

export interface GenerateRequest extends GenerateOptions, BatchingOptions {
  /** Prefill form for the prompt (default 'chunkwise'). */
  prefillMode?: PrefillMode;
}

const CONFIG_FILE = 'config.json';
/** The most rows a session may have (csrc/model.h kMaxDecodeBatch). */
const MAX_SESSION_BATCH = 1 << 20;
const WEIGHTS_FILE = 'model.safetensors';
/** A training checkpoint's trainer state (lib/checkpoint.ts writes it). */
export const CHECKPOINT_TRAINER_FILE = 'trainer.json';

function checkDevice(device: ModelOptions['device']): void {
  if (device === undefined || device === 'cpu' || device === 'cuda' || device === 'auto') return;
  throw new Error(`device must be 'cpu', 'cuda' or 'auto', got ${JSON.stringify(device)}`);
}

let autoDeviceNoticeShown = false;

/**
 * A loader's staging buffer holds the largest tensor (125 MiB for a 32k x 1024 embedding) and
 * would stay resident until the next garbage collection: its pages go back to the system now.
 */
function releaseScratch(scratch: Float32Array): void {
  addon().discardMemory(scratch);
}

/** The backend for a device option; 'auto' falls back to the CPU with a notice (once per process). */
function resolveDevice(device: ModelOptions['device']): NativeDevice {
  if (device === 'cuda') return 'cuda';
  if (device !== 'auto') return 'cpu';
  const info = addon().buildInfo();
  if (info.cuda && info.cudaDevices > 0) return 'cuda';
  if (!autoDeviceNoticeShown) {
    autoDeviceNoticeShown = true;
    console.warn(`retnet: device 'auto' runs on the CPU (${info.cuda ? 'no CUDA device found' : 'built without CUDA'})`);
  }
  return 'cpu';
}

export class RetNet implements SessionOwner {
  readonly config: RetNetConfig;
  readonly tokenizer: Tokenizer | undefined;
  private nativeModel: NativeModel | undefined;

  private constructor(
    config: RetNetConfig,
    nativeModel: NativeModel,
    tokenizer: Tokenizer | undefined,
    readonly weights: WeightFormat,
  ) {
    this.config = config;
    this.nativeModel = nativeModel;
    this.tokenizer = tokenizer ?? (config.vocab_size >= 256 ? new ByteTokenizer({ vocabSize: config.vocab_size }) : undefined);
  }

  /**
   * Loads a directory holding config.json + model.safetensors (torchscale names), or one
   * .safetensors file whose __metadata__.config holds the config JSON.
   */
  static async load(location: string, options: ModelOptions = {}): Promise<RetNet> {
    options = optionsObject(options, 'RetNet.load');
    checkDevice(options.device);
    let stat;
    try {
      stat = await fsp.stat(location);
    } catch {
      throw new Error(`RetNet.load: ${location} does not exist`);
    }
    let weightsPath = location;
    let rawConfig: unknown;
    if (stat.isDirectory()) {
      await finishInterruptedReplace(location);
      weightsPath = path.join(location, WEIGHTS_FILE);
      const configPath = path.join(location, CONFIG_FILE);
      let text: string;
      try {
        text = await fsp.readFile(configPath, 'utf8');
      } catch {
        throw new Error(`RetNet.load: ${configPath} is missing`);
      }
      try {
        rawConfig = JSON.parse(text);
      } catch (e) {
        throw new Error(`RetNet.load: ${configPath} is not valid JSON (${(e as Error).message})`);
      }
    }
    // The file is read one tensor at a time straight into the model, so loading never holds
    // more than the model plus its largest tensor.
    const reader = await openSafetensors(weightsPath);
    try {
      if (rawConfig === undefined) {
        const text = reader.metadata.config;
        if (text === undefined) throw new Error(`RetNet.load: ${weightsPath} has no __metadata__.config and no config.json`);
        try {
          rawConfig = JSON.parse(text);
        } catch (e) {
          throw new Error(`RetNet.load: __metadata__.config of ${weightsPath} is not valid JSON (${(e as Error).message})`);
        }
      }
      const config = resolveConfig(rawConfig);
      const plan = planWeights(config, reader.shapes, weightsPath);
      // Every tensor passes through one buffer, except an embedding a stored tied output
      // projection is compared with later.
      const keepEmbed = plan.some((w) => w.name === OUTPUT && w.from === 'stored') && config.share_decoder_input_output_embed;
      const scratch = new Float32Array(largestShape(reader.shapes.values()));
      async function* checked(): AsyncGenerator<[string, Float32Array]> {
        let embed: Float32Array | undefined;
        for (const weight of plan) {
          const into = weight.name === EMBED && keepEmbed ? undefined : scratch;
          const stored = weight.from === 'stored' ? await reader.read(weight.storedAs ?? weight.name, into) : undefined;
          const values = plannedValues(config, weight, stored, embed, weightsPath);
          if (weight.name === EMBED) embed = values;
          yield [weight.name, values];
        }
      }
      try {
        return await RetNet.fromWeights(config, checked(), options, weightsPath);
      } finally {
        releaseScratch(scratch);
      }
    } finally {
      await reader.close();
    }
  }

  /** A fresh model with torchscale's initialisation. */
  static async create(config: Partial<RetNetConfig> & { vocab_size: number }, options: CreateOptions = {}): Promise<RetNet> {
    options = optionsObject(options, 'RetNet.create');
    checkDevice(options.device);
    const resolved = resolveConfig(config);
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed)) throw new Error(`seed must be a safe integer, got ${String(options.seed)}`);
    const scratch = new Float32Array(largestParameter(resolved));
    try {
      return await RetNet.fromWeights(resolved, generateWeightsYielding(resolved, seed, { scratch }), options, 'RetNet.create');
    } finally {
      releaseScratch(scratch);
    }
  }

  /**
   * A model from in-memory weights keyed by torchscale state_dict names (flat Float32Arrays in
   * the shapes of parameterShapes(config)); checked like a loaded file. The arrays are copied in
   * one at a time until the promise settles: leave them unchanged until then.
   */
  static async fromStateDict(
    config: Partial<RetNetConfig> & { vocab_size: number },
    weights: Map<string, Float32Array>,
    options: ModelOptions = {},
  ): Promise<RetNet> {
    options = optionsObject(options, 'RetNet.fromStateDict');
    checkDevice(options.device);
    const resolved = resolveConfig(config);
    const shapes = new Map(parameterShapes(resolved));
    const entries = new Map<string, TensorEntry>();
    for (const [name, data] of weights) {
      if (!isTypedArray(data, 'Float32Array')) throw new Error(`fromStateDict: ${name} must be a Float32Array`);
      const shape = shapes.get(name);
      const matches = shape !== undefined && shape.reduce((a, b) => a * b, 1) === data.length;
      entries.set(name, { dtype: 'F32', shape: matches ? shape : [data.length], data });
    }
    return RetNet.fromWeights(resolved, checkWeights(resolved, entries, 'state dict'), options, 'state dict');
  }

  /**
   * Builds the native model and copies `weights` (state_dict names, checked but for non-finite
   * values, which setParams finds) into it one tensor at a time; each is copied before the next
   * is asked for, so the source may reuse a buffer. `source` names the weights in its errors.
   */
  private static async fromWeights(
    config: RetNetConfig,
    weights: Iterable<[string, Float32Array]> | AsyncIterable<[string, Float32Array]>,
    options: ModelOptions,
    source: string,
  ): Promise<RetNet> {
    const weightFormat = options.weights ?? 'f32';
    if (!(WEIGHT_FORMATS as readonly unknown[]).includes(weightFormat)) {
      throw new Error(`weights must be one of ${WEIGHT_FORMATS.map((f) => `'${f}'`).join(', ')}, got ${formatValue(options.weights)}`);
    }
    if (options.tokenizer !== undefined) checkTokenizer(options.tokenizer, config.vocab_size);
    const nativeModel = await addon()
      .createModel(config, {}, resolveDevice(options.device))
      .catch((e: Error) => {
        if (!/out of memory/.test(e.message)) throw e;
        const gib = (countParameters(config) * 4) / 2 ** 30;
        throw new Error(`${e.message}: a model of ${countParameters(config)} parameters needs ${gib.toFixed(1)} GiB for its fp32 weights`);
      });
    try {
      // Compact before the weights arrive: each projection is converted as it is set, and its
      // fp32 pages are never touched (loading never holds both).
      if (weightFormat !== 'f32') await nativeModel.setWeightFormat(weightFormat);
      for await (const [name, data] of weights) {
        // A tied output projection is the embedding itself in the native core.
        if (name === OUTPUT && config.share_decoder_input_output_embed) continue;
        await nativeModel.setParams({ [name]: data }).catch((e: Error) => {
          throw new Error(`${source}: ${e.message}`);
        });
      }
    } catch (e) {
      nativeModel.dispose();
      throw e;
    }
    return new RetNet(config, nativeModel, options.tokenizer, weightFormat);
  }

  /** Trainable parameters (a tied output projection counts once). */
  get parameterCount(): number {
    return countParameters(this.config);
  }

  get vocabSize(): number {
    return this.config.vocab_size;
  }

  get defaultChunkSize(): number {
    return this.config.recurrent_chunk_size;
  }

  /** @internal */
  native(): NativeModel {
    if (!this.nativeModel) throw new Error('model was disposed');
    return this.nativeModel;
  }

  /** @internal */
  stateLayout(): { layers: number; heads: number; keyDim: number; valueDim: number } {
    const d = dims(this.config);
    return { layers: d.L, heads: d.H, keyDim: d.dk, valueDim: d.dv };
  }

  /** Logits [B, T, V] for every position of `tokens`. */
  async forward(tokens: TokenInput, options: ForwardOptions = {}): Promise<{ logits: Float32Array; shape: [number, number, number] }> {
    options = optionsObject(options, 'forward');
    const batch = toTokenBatch(tokens, this.config.vocab_size);
    const { mode, chunkSize } = checkPrefillOptions(
      { mode: options.mode ?? (this.config.chunkwise_recurrent ? 'chunkwise' : 'parallel'), chunkSize: options.chunkSize },
      this.config.recurrent_chunk_size,
    );
    const [B, T] = batch.shape;
    const logits = await this.native().forward(batch.data, B, T, mode, chunkSize);
    return { logits, shape: [B, T, this.config.vocab_size] };
  }

  /**
   * Mean cross-entropy over the batch and its gradient for every trainable parameter, keyed by
   * torchscale names (a tied model reports the summed gradient under embed_tokens.weight only).
   */
  async lossAndGradients(tokens: TokenInput, options: LossOptions = {}): Promise<{ loss: number; grads: Map<string, Float32Array> }> {
    options = optionsObject(options, 'lossAndGradients');
    const batch = toTokenBatch(tokens, this.config.vocab_size);
    const mode = options.mode ?? (this.config.chunkwise_recurrent ? 'chunkwise' : 'parallel');
    if (mode !== 'parallel' && mode !== 'chunkwise') {
      throw new Error(`lossAndGradients: mode must be 'parallel' or 'chunkwise', got ${JSON.stringify(mode)}`);
    }
    const { chunkSize } = checkPrefillOptions({ mode, chunkSize: options.chunkSize }, this.config.recurrent_chunk_size);
    const [B, T] = batch.shape;
    const n = B * T;
    const { targets, mask } = options;
    if (targets !== undefined) {
      if (!isTypedArray(targets, 'Int32Array')) throw new Error('lossAndGradients: targets must be an Int32Array');
      if (targets.length !== n) throw new Error(`lossAndGradients: targets has ${targets.length} entries, expected batch*length = ${n}`);
      const bad = targets.findIndex((t) => t < -1 || t >= this.config.vocab_size);
      if (bad >= 0) {
        throw new Error(`lossAndGradients: targets[${bad}] = ${targets[bad]} is outside [-1, ${this.config.vocab_size})`);
      }
    }
    if (mask !== undefined) {
      if (!isTypedArray(mask, 'Float32Array')) throw new Error('lossAndGradients: mask must be a Float32Array');
      if (mask.length !== n) throw new Error(`lossAndGradients: mask has ${mask.length} entries, expected batch*length = ${n}`);
      const bad = mask.findIndex((w) => !(Number.isFinite(w) && w >= 0));
      if (bad >= 0) throw new Error(`lossAndGradients: mask[${bad}] = ${mask[bad]} must be finite and >= 0`);
    }
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`lossAndGradients: seed must be a non-negative safe integer, got ${String(options.seed)}`);
    const checkpointActivations = options.checkpointActivations ?? false;
    if (typeof checkpointActivations !== 'boolean') {
      throw new Error(`lossAndGradients: checkpointActivations must be a boolean, got ${JSON.stringify(options.checkpointActivations)}`);
    }
    const precision = options.precision ?? 'fp32';
    if (precision !== 'fp32' && precision !== 'bf16') {
      throw new Error(`lossAndGradients: precision must be 'fp32' or 'bf16', got ${JSON.stringify(options.precision)}`);
    }
    const result = await this.native().lossAndGradients(
      batch.data,
      B,
      T,
      mode,
      chunkSize,
      targets ?? null,
      mask ?? null,
      seed,
      checkpointActivations,
      precision,
    );
    return { loss: result.loss, grads: new Map(Object.entries(result.grads)) };
  }

  /** A decode session with its own recurrent state for `batch` rows. */
  createSession(options: { batch?: number } = {}): Session {
    options = optionsObject(options, 'createSession');
    const batch = options.batch ?? 1;
    if (!Number.isInteger(batch) || batch < 1 || batch > MAX_SESSION_BATCH) {
      throw new Error(`createSession: batch must be an integer from 1 to ${MAX_SESSION_BATCH}, got ${String(options.batch)}`);
    }
    return new Session(this, this.native().createState(batch), batch);
  }

  /**
   * A session from the Buffer of session.save() (same model shape). A bad header, size or scale
   * throws here; the state's floats are checked and copied off the JS thread before the
   * session's first call, which rejects if they are corrupt. `buffer` is read then: leave it
   * unchanged until that call settles.
   */
  restoreSession(buffer: Uint8Array): Session {
    if (!isTypedArray(buffer, 'Uint8Array')) throw new Error('restoreSession expects a Buffer');
    return restoreSessionState(this, buffer);
  }

  /** Streams generated tokens and their text. `prompt` is text (needs a tokenizer) or token ids. */
  async *generate(prompt: string | ArrayLike<number>, options: GenerateRequest = {}): AsyncGenerator<GenerateChunk> {
    options = optionsObject(options, 'generate');
    const tokenizer = this.requireTokenizer();
    validateGenerateOptions(options);
    if (options.batching !== undefined && typeof options.batching !== 'boolean') {
      throw new Error(`invalid generate option: batching must be true or false, got ${JSON.stringify(options.batching)}`);
    }
    const encoded: unknown = typeof prompt === 'string' ? tokenizer.encode(prompt) : prompt;
    if (!Array.isArray(encoded) && !ArrayBuffer.isView(encoded)) {
      throw new Error(`generate: the prompt must be text or an array of token ids, got ${encoded === null ? 'null' : typeof encoded}`);
    }
    const promptTokens = Array.from(encoded as ArrayLike<number>);
    if (promptTokens.length === 0) throw new Error('generate: the prompt is empty');
    toTokenBatch([promptTokens], this.config.vocab_size);
    // ---- serving: concurrent calls share batched decode steps (lib/scheduler.ts) ----
    if (options.batching !== false) {
      yield* this.scheduler().generate(promptTokens, tokenizer, options);
      return;
    }
    // Alone: a scheduler of its own, so it still steps in decode runs. One piece of prefill
    // (bit for bit a session's prefill), no prefix cache, none of the model's limits.
    const alone = new Scheduler(this, { maxConcurrent: 1, maxQueue: 0, prefillChunkTokens: 2 ** 31 - 1, prefixCacheEntries: 0, autoPrefixTokens: 0 });
    try {
      yield* alone.generate(promptTokens, tokenizer, options);
    } finally {
      alone.dispose();
    }
    // ---- end serving ----
  }

  // ---- serving (lib/scheduler.ts) ----
  private batchScheduler: Scheduler | undefined;

  /** The scheduler that batches concurrent generate() calls; `options` (re)configure its limits. */
  scheduler(options?: SchedulerOptions): Scheduler {
    // A disposed scheduler is replaced: disposing it must not end the model's serving.
    if (this.batchScheduler === undefined || this.batchScheduler.disposed) this.batchScheduler = new Scheduler(this);
    if (options) this.batchScheduler.configure(options);
    return this.batchScheduler;
  }
  // ---- end serving ----

  /** generate() collected into one string. */
  async generateText(prompt: string | ArrayLike<number>, options: GenerateRequest = {}): Promise<string> {
    return collectText(this.generate(prompt, options));
  }

  /** Every state_dict tensor (torchscale names, both copies when tied). */
  stateDict(): Map<string, Float32Array> {
    const nativeModel = this.native();
    const out = new Map<string, Float32Array>();
    for (const [name] of parameterShapes(this.config)) {
      const source = name === OUTPUT && this.config.share_decoder_input_output_embed ? EMBED : name;
      out.set(name, nativeModel.getParam(source));
    }
    return out;
  }

  /**
   * Writes safetensors with torchscale names and the config in __metadata__.config.
   * A path ending in .safetensors is one file; anything else is a directory with
   * config.json + model.safetensors. Both are written in full before either replaces its predecessor.
   */
  async save(location: string): Promise<void> {
    const nativeModel = this.native();
    if (this.weights !== 'f32') {
      // Its fp32 weights are gone: a save would write rounded ones, perhaps over the originals.
      throw new Error(`RetNet.save: this model holds ${this.weights} weights, not the fp32 ones it was loaded from; load it with weights 'f32' to save`);
    }
    const tied = this.config.share_decoder_input_output_embed;
    const tensors = parameterShapes(this.config).map(([name, shape]) => ({ name, shape }));
    // One tensor at a time from the native model (copied on a worker), so saving never holds a
    // copy of every weight. A training step or setParam between two tensors would mix two
    // versions of the weights: that fails the save (before the file replaces anything) instead.
    const version = nativeModel.weightVersion();
    const values = (name: string): Promise<Float32Array> => {
      if (nativeModel.weightVersion() !== version) throw new Error('RetNet.save: the weights changed while saving (a training step or setParam ran); nothing was written');
      return nativeModel.readParam(name === OUTPUT && tied ? EMBED : name).catch((e: Error) => {
        throw new Error(`RetNet.save: ${e.message}; nothing was written`);
      });
    };
    const metadata = { format: 'pt', config: JSON.stringify(this.config) };
    if (location.endsWith('.safetensors')) {
      await writeSafetensorsFile(location, tensors, values, metadata);
      return;
    }
    // A training checkpoint's weights go with its optimizer state (saveCheckpoint), and a
    // config.json without weights beside it is someone else's: neither is replaced.
    const present = await fsp.readdir(location).catch(() => [] as string[]);
    if (present.includes(CHECKPOINT_TRAINER_FILE)) {
      throw new Error(`RetNet.save: ${location} is a training checkpoint; new weights there would not match its optimizer state: use saveCheckpoint or another directory`);
    }
    if (present.includes(CONFIG_FILE) && !present.includes(WEIGHTS_FILE)) {
      throw new Error(`RetNet.save: ${location} has a ${CONFIG_FILE} but no ${WEIGHTS_FILE} (not a saved model); refusing to replace it`);
    }
    // The first directory mkdir made, if any: a failed save takes it away again.
    const made = await fsp.mkdir(location, { recursive: true });
    try {
      // Both files written before either replaces its predecessor: a failure never pairs new
      // weights with an old config.
      await writeFilesAtomic([
        { path: path.join(location, WEIGHTS_FILE), data: safetensorsWriter(tensors, values, metadata) },
        { path: path.join(location, CONFIG_FILE), data: Buffer.from(JSON.stringify(this.config, null, 2) + '\n') },
      ]);
    } catch (e) {
      if (made !== undefined) await fsp.rm(made, { recursive: true, force: true }).catch(() => undefined);
      throw e;
    }
  }

  /** Frees native memory now (sessions keep what they need until disposed). */
  dispose(): void {
    this.batchScheduler?.dispose(); // serving
    this.nativeModel?.dispose();
    this.nativeModel = undefined;
  }

  private requireTokenizer(): Tokenizer {
    if (!this.tokenizer) {
      throw new Error(
        `this model's vocabulary (${this.config.vocab_size}) is smaller than the byte tokenizer's 256 ids: pass a tokenizer`,
      );
    }
    return this.tokenizer;
  }
}
