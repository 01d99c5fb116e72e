// Next-token sampling: repetition penalty, temperature, top-k, top-p, with a seeded PRNG.

import { randomInt } from 'node:crypto';

import { Rng } from './random';

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

/** Renders a user-supplied value for an error message. */
export function formatValue(value: unknown): string {
  return typeof value === 'number' ? String(value) : JSON.stringify(value) ?? String(value);
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

// Hot loops avoid looking up globals per element: that is slow inside vm contexts (jest, sandboxes).
const { exp } = Math;

// randomInt's range must be below 2^48.
const RANDOM_SEED_BOUND = 2 ** 48 - 1;
/**
 * Top-p buckets candidates by weight, 16 per halving below the max (weight 1) and the last one
 * for everything under 2^-63, read off the float64 bits: the key (sign, exponent, 4 mantissa
 * bits) grows with the weight, so each bucket holds a contiguous range of weights.
 */
const NUCLEUS_BUCKETS = 1024;
const WEIGHT_ONE_KEY = 0x3ff0; // the top 16 bits of 1.0
/** Index of a float64's high 32-bit word within its two Uint32 halves. */
const HIGH_WORD = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1 ? 1 : 0;

function nucleusBucket(highWord: number): number {
  const bucket = WEIGHT_ONE_KEY - (highWord >>> 16);
  return bucket < NUCLEUS_BUCKETS ? bucket : NUCLEUS_BUCKETS - 1;
}

/**
 * Picks next tokens from logits. One Sampler holds one PRNG stream: the same options and seed
 * with the same sequence of sample() calls give the same tokens.
 */
export class Sampler {
  /** The seed in use (drawn from crypto when none was given), so a run can be reproduced. */
  readonly seed: number;
  private readonly temperature: number;
  private readonly topK: number;
  private readonly topP: number;
  private readonly repetitionPenalty: number;
  private readonly rng: Rng;
  // Working buffers reused across calls (sized to the vocabulary).
  private scores = new Float64Array(0);
  private candidates = new Int32Array(0);
  private weights = new Float64Array(0);
  private weightWords = new Uint32Array(0);
  private sortedWeights = new Float64Array(0);
  private readonly bucketMass = new Float64Array(NUCLEUS_BUCKETS);

  constructor(options: SamplingOptions = {}) {
    validateSamplingOptions(options);
    this.temperature = options.temperature ?? 1;
    this.topK = options.topK ?? 0;
    this.topP = options.topP ?? 1;
    this.repetitionPenalty = options.repetitionPenalty ?? 1;
    this.seed = options.seed ?? randomInt(RANDOM_SEED_BOUND);
    this.rng = new Rng(this.seed);
  }

  /**
   * Samples one id from `logits` (length = vocabulary size; the caller's array is not modified).
   * `history` is the ids seen so far (prompt and generated); only the repetition penalty reads it.
   * Order of operations: repetition penalty, temperature, top-k, top-p, then a draw. Logits of
   * -Infinity are never picked unless every logit is -Infinity; NaN logits are an Error.
   */
  sample(logits: Float32Array, history: ArrayLike<number>): number {
    const vocabSize = logits.length;
    if (vocabSize === 0) throw new Error('Sampler.sample: logits are empty');
    const scores = this.penalizedScores(logits, history);
    if (this.temperature === 0) return argmax(scores);

    const candidateCount = this.topK > 0 && this.topK < vocabSize ? this.selectTopK(scores) : this.selectAll(vocabSize);
    const candidates = this.candidates;
    const weights = this.weights;
    let maxScore = -Infinity;
    for (let j = 0; j < candidateCount; j++) if (scores[candidates[j]] > maxScore) maxScore = scores[candidates[j]];
    // Unnormalised softmax in float64. Subtracting the max before dividing by the temperature keeps
    // the exponent <= 0 even for tiny temperatures; equality with the max is tested first so that
    // +/-Infinity logits give weight 1 instead of NaN.
    let total = 0;
    for (let j = 0; j < candidateCount; j++) {
      const score = scores[candidates[j]];
      const weight = score === maxScore ? 1 : exp((score - maxScore) / this.temperature);
      weights[j] = weight;
      total += weight;
    }
    if (this.topP < 1) return this.drawFromNucleus(candidateCount, total);
    return this.draw(candidates, weights, candidateCount, total);
  }

  /** Copies logits to float64 and applies the repetition penalty once per distinct id in history. */
  private penalizedScores(logits: Float32Array, history: ArrayLike<number>): Float64Array {
    const vocabSize = logits.length;
    if (this.scores.length !== vocabSize) {
      this.scores = new Float64Array(vocabSize);
      this.candidates = new Int32Array(vocabSize);
      this.weights = new Float64Array(vocabSize);
      this.weightWords = new Uint32Array(this.weights.buffer);
      this.sortedWeights = new Float64Array(vocabSize);
    }
    const scores = this.scores;
    for (let i = 0; i < vocabSize; i++) {
      const logit = logits[i];
      // NaN is the only value unequal to itself (and the check avoids a global lookup per id).
      if (logit !== logit) throw new Error(`Sampler.sample: logits[${i}] is NaN`);
      scores[i] = logit;
    }
    const penalty = this.repetitionPenalty;
    if (penalty !== 1) {
      const penalized = new Set<number>();
      for (let p = 0; p < history.length; p++) {
        const id = history[p];
        if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
          throw new Error(`Sampler.sample: history[${p}] = ${String(id)} is not a token id in [0, ${vocabSize})`);
        }
        if (penalized.has(id)) continue;
        penalized.add(id);
        scores[id] = scores[id] > 0 ? scores[id] / penalty : scores[id] * penalty;
      }
    }
    return scores;
  }

  private selectAll(vocabSize: number): number {
    const candidates = this.candidates;
    for (let i = 0; i < vocabSize; i++) candidates[i] = i;
    return vocabSize;
  }

  /**
   * Fills candidates[0..k), in id order, with the k highest-scoring ids (lower id wins ties) using a size-k
   * min-heap: O(V log k) rather than sorting the whole vocabulary.
   */
  private selectTopK(scores: Float64Array): number {
    const k = this.topK;
    const heap = this.candidates;
    // "Worse" = lower score, or equal score and higher id; the heap root is the worst kept id.
    const worse = (a: number, b: number): boolean => scores[a] < scores[b] || (scores[a] === scores[b] && a > b);
    const siftDown = (start: number): void => {
      let parent = start;
      for (;;) {
        const left = 2 * parent + 1;
        if (left >= k) return;
        const right = left + 1;
        const child = right < k && worse(heap[right], heap[left]) ? right : left;
        if (!worse(heap[child], heap[parent])) return;
        [heap[parent], heap[child]] = [heap[child], heap[parent]];
        parent = child;
      }
    };
    for (let i = 0; i < k; i++) heap[i] = i;
    for (let i = (k >> 1) - 1; i >= 0; i--) siftDown(i);
    for (let id = k; id < scores.length; id++) {
      // A later id with an equal score is never better than the root, so ties keep the lower id.
      if (worse(heap[0], id)) {
        heap[0] = id;
        siftDown(0);
      }
    }
    // The nucleus step needs id order.
    heap.subarray(0, k).sort();
    return k;
  }

  /**
   * Keeps the most likely candidates (lower id first among equal weights) until their mass reaches
   * topP, at least one, then draws among them. Needs the candidates in id order.
   */
  private drawFromNucleus(candidateCount: number, total: number): number {
    const candidates = this.candidates;
    const weights = this.weights;
    const words = this.weightWords;
    const bucketMass = this.bucketMass;
    const targetMass = this.topP * total;
    // The nucleus is the heaviest prefix: whole buckets from the heaviest down, then the part of
    // the bucket where the mass is reached, which alone needs sorting. O(V) whatever the
    // distribution (a flat one, from a high temperature say, used to mean sorting everything).
    bucketMass.fill(0);
    for (let j = 0; j < candidateCount; j++) bucketMass[nucleusBucket(words[2 * j + HIGH_WORD])] += weights[j];
    // The last bucket with mass stops the walk too: rounding can leave the sum short of topP * total.
    let lastWithMass = NUCLEUS_BUCKETS - 1;
    while (lastWithMass > 0 && bucketMass[lastWithMass] === 0) lastWithMass--;
    let boundary = 0;
    let massAbove = 0;
    for (; boundary < lastWithMass; boundary++) {
      if (massAbove + bucketMass[boundary] >= targetMass) break;
      massAbove += bucketMass[boundary];
    }
    let sortedCount = 0;
    for (let j = 0; j < candidateCount; j++) {
      if (nucleusBucket(words[2 * j + HIGH_WORD]) === boundary) this.sortedWeights[sortedCount++] = weights[j];
    }
    const sorted = this.sortedWeights.subarray(0, sortedCount).sort();
    // Walk down from the boundary bucket's heaviest until the mass is reached; `cutoff` is the
    // lightest kept weight. Every heavier bucket's weights exceed it.
    let i = sortedCount;
    let mass = massAbove;
    do {
      i--;
      mass += sorted[i];
    } while (i > 0 && mass < targetMass);
    const cutoff = sorted[i];
    let cutoffTiesToKeep = 0;
    for (let x = i; x < sortedCount && sorted[x] === cutoff; x++) cutoffTiesToKeep++;
    // Compact the kept candidates in place, in id order, so ties at the cutoff keep the lowest ids.
    let kept = 0;
    let keptMass = 0;
    for (let j = 0; j < candidateCount; j++) {
      const weight = weights[j];
      if (weight > cutoff || (weight === cutoff && cutoffTiesToKeep-- > 0)) {
        candidates[kept] = candidates[j];
        weights[kept] = weight;
        keptMass += weight;
        kept++;
      }
    }
    return this.draw(candidates, weights, kept, keptMass);
  }

  /** Draws ids[j] with probability weights[j] / total over j < count. */
  private draw(ids: Int32Array, weights: Float64Array, count: number, total: number): number {
    const target = this.rng.nextFloat() * total;
    let cumulative = 0;
    let lastPositive = ids[0];
    for (let j = 0; j < count; j++) {
      if (weights[j] <= 0) continue;
      cumulative += weights[j];
      lastPositive = ids[j];
      if (target < cumulative) return ids[j];
    }
    // Only reached when rounding makes target equal the summed mass.
    return lastPositive;
  }
}

/** Index of the largest score; the lowest index wins ties. */
function argmax(scores: Float64Array): number {
  let best = 0;
  for (let i = 1; i < scores.length; i++) if (scores[i] > scores[best]) best = i;
  return best;
}
