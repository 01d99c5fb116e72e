// Next-token sampling: repetition penalty, temperature, top-k, top-p, with a seeded PRNG.

import { randomInt } from 'node:crypto';

import { addon, type NativeSampler } from './native';
import { formatValue } from './typed';

export interface SamplingOptions {
  /** Softmax temperature, >= 0. 0 means greedy argmax (lowest id wins ties). Default 1. */
  temperature?: number;
  /** Keep only the k most likely ids; 0 turns it off. Default 0. */
  topK?: number;
  /** Nucleus sampling: keep the smallest set of most likely ids whose mass is >= topP, in (0, 1]. Default 1. */
  topP?: number;
  /** CTRL-style penalty (> 0) for ids already in the history; 1 turns it off. Default 1. */
  repetitionPenalty?: number;
  /** PRNG seed, a safe integer. Without one a random seed is drawn (see Sampler.seed). */
  seed?: number;
}

function optionError(field: string, requirement: string, value: unknown): Error {
  return new Error(`invalid sampling option: ${field} must be ${requirement}, got ${formatValue(value)}`);
}

function isFiniteNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

/** Throws an Error naming the first invalid field. Absent fields take their defaults. */
export function validateSamplingOptions(o: SamplingOptions): void {
  const { temperature, topK, topP, repetitionPenalty, seed } = o;
  if (temperature !== undefined && !(isFiniteNumber(temperature) && temperature >= 0)) {
    throw optionError('temperature', 'a finite number >= 0', temperature);
  }
  if (topK !== undefined && !(Number.isSafeInteger(topK) && topK >= 0)) {
    throw optionError('topK', 'an integer >= 0 (0 = off)', topK);
  }
  if (topP !== undefined && !(isFiniteNumber(topP) && topP > 0 && topP <= 1)) {
    throw optionError('topP', 'a number in (0, 1]', topP);
  }
  if (repetitionPenalty !== undefined && !(isFiniteNumber(repetitionPenalty) && repetitionPenalty > 0)) {
    throw optionError('repetitionPenalty', 'a finite number > 0', repetitionPenalty);
  }
  if (seed !== undefined && !Number.isSafeInteger(seed)) {
    throw optionError('seed', 'a safe integer', seed);
  }
}

// randomInt's range must be below 2^48.
const RANDOM_SEED_BOUND = 2 ** 48 - 1;
const NO_HISTORY = new Int32Array(0);

/**
 * Picks next tokens from logits. One Sampler holds one PRNG stream: the same options and seed
 * with the same sequence of sample() calls give the same tokens. The work is native
 * (csrc/sampler.cc), on the calling thread: tens of microseconds at vocabulary 32000.
 */
export class Sampler {
  /** The seed in use (drawn from crypto when none was given), so a run can be reproduced. */
  readonly seed: number;
  private readonly native: NativeSampler;
  private readonly penalizes: boolean;
  private historyIds = new Int32Array(64);

  constructor(options: SamplingOptions = {}) {
    validateSamplingOptions(options);
    this.seed = options.seed ?? randomInt(RANDOM_SEED_BOUND);
    this.penalizes = (options.repetitionPenalty ?? 1) !== 1;
    this.native = new (addon().NativeSampler)(
      {
        temperature: options.temperature ?? 1,
        topK: options.topK ?? 0,
        topP: options.topP ?? 1,
        repetitionPenalty: options.repetitionPenalty ?? 1,
      },
      this.seed,
    );
  }

  /**
   * Samples one id from `logits` (length = vocabulary size; the caller's array is not modified).
   * `history` is the ids seen so far (prompt and generated); only the repetition penalty reads it,
   * once per distinct id. Order of operations: repetition penalty, temperature, top-k, top-p
   * (ties at its cutoff keep the lowest ids), then a draw, all in float64. Logits of -Infinity
   * are never picked unless every logit is -Infinity; NaN logits are an Error.
   */
  sample(logits: Float32Array, history: ArrayLike<number>): number {
    return this.native.sample(logits, this.penalizes ? this.checkedHistory(history, logits.length) : NO_HISTORY);
  }

  /**
   * @internal What a native step needs to draw as sample(logits.subarray(0, vocabSize), history)
   * would: the native sampler (its PRNG stream is this one) and the checked history.
   */
  drawArgs(history: ArrayLike<number>, vocabSize: number): { sampler: NativeSampler; history: Int32Array } {
    return { sampler: this.native, history: this.penalizes ? this.checkedHistory(history, vocabSize) : NO_HISTORY };
  }

  /** history as int32 ids, each checked first (an Int32Array would wrap or truncate a bad one). */
  private checkedHistory(history: ArrayLike<number>, vocabSize: number): Int32Array {
    if (this.historyIds.length < history.length) this.historyIds = new Int32Array(Math.max(history.length, 2 * this.historyIds.length));
    const ids = this.historyIds;
    for (let p = 0; p < history.length; p++) {
      const id = history[p];
      if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
        throw new Error(`Sampler.sample: history[${p}] = ${String(id)} is not a token id in [0, ${vocabSize})`);
      }
      ids[p] = id;
    }
    return ids.subarray(0, history.length);
  }
}
