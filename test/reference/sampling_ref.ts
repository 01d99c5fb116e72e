// The sampler's semantics by full sorts, in float64, on lib/random.ts's PRNG stream: the native
// sampler must draw the same tokens for the same options and seed.
import { Rng } from '../../lib/random';

export interface ReferenceSamplingOptions {
  temperature: number;
  topK: number;
  topP: number;
  repetitionPenalty: number;
  seed: number;
}

export class ReferenceSampler {
  private readonly rng: Rng;

  constructor(private readonly options: ReferenceSamplingOptions) {
    this.rng = new Rng(options.seed);
  }

  sample(logits: Float32Array, history: number[]): number {
    const { temperature, topK, topP, repetitionPenalty } = this.options;
    const scores = Array.from(logits);
    for (const id of new Set(history)) {
      scores[id] = scores[id] > 0 ? scores[id] / repetitionPenalty : scores[id] * repetitionPenalty;
    }
    const byScore = (a: number, b: number): number => scores[b] - scores[a] || a - b;
    if (temperature === 0) return Array.from(scores.keys()).sort(byScore)[0];

    let ids = Array.from(scores.keys());
    if (topK > 0 && topK < ids.length) ids = ids.sort(byScore).slice(0, topK).sort((a, b) => a - b);
    const max = Math.max(...ids.map((id) => scores[id]));
    let weights = ids.map((id) => (scores[id] === max ? 1 : Math.exp((scores[id] - max) / temperature)));
    if (topP < 1) {
      const total = weights.reduce((a, b) => a + b, 0);
      const order = Array.from(ids.keys()).sort((a, b) => weights[b] - weights[a] || a - b);
      const kept = new Set<number>();
      let mass = 0;
      for (const j of order) {
        kept.add(j);
        mass += weights[j];
        if (mass >= topP * total) break;
      }
      ids = ids.filter((_, j) => kept.has(j));
      weights = weights.filter((_, j) => kept.has(j));
    }
    const target = this.rng.nextFloat() * weights.reduce((a, b) => a + b, 0);
    let cumulative = 0;
    for (let j = 0; j < ids.length; j++) {
      cumulative += weights[j];
      if (weights[j] > 0 && target < cumulative) return ids[j];
    }
    // Rounding can leave the target at the total: the last positive weight.
    return ids[weights.map((w) => w > 0).lastIndexOf(true)];
  }
}
