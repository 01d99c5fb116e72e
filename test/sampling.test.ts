import { Sampler, SamplingOptions, validateSamplingOptions } from '../lib/sampling';
import { ReferenceSampler } from './reference/sampling_ref';

function softmax(logits: number[], temperature = 1): number[] {
  const max = Math.max(...logits);
  const weights = logits.map((l) => Math.exp((l - max) / temperature));
  const total = weights.reduce((a, b) => a + b, 0);
  return weights.map((w) => w / total);
}

function frequencies(sampler: Sampler, logits: Float32Array, draws: number, history: number[] = []): number[] {
  const counts = new Array<number>(logits.length).fill(0);
  for (let i = 0; i < draws; i++) counts[sampler.sample(logits, history)]++;
  return counts.map((c) => c / draws);
}

/** Deterministic pseudo-random logits in [-4, 4), with some exact ties when `ties` is set. */
function testLogits(vocabSize: number, salt: number, ties = false): Float32Array {
  const logits = new Float32Array(vocabSize);
  let state = salt;
  for (let i = 0; i < vocabSize; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    const value = (state / 2 ** 32) * 8 - 4;
    logits[i] = ties ? Math.round(value) : value;
  }
  return logits;
}

function sequence(options: SamplingOptions, logits: Float32Array, draws: number): number[] {
  const sampler = new Sampler(options);
  return Array.from({ length: draws }, () => sampler.sample(logits, []));
}

describe('Sampler', () => {
  test('temperature 0 is argmax with the lowest id winning ties', () => {
    const sampler = new Sampler({ temperature: 0 });
    expect(sampler.sample(Float32Array.of(0.1, 3, -2, 2.9), [])).toBe(1);
    expect(sampler.sample(Float32Array.of(1, 5, 5, 5), [])).toBe(1);
    expect(sampler.sample(Float32Array.of(-Infinity, -Infinity, -7), [])).toBe(2);
    expect(sampler.sample(Float32Array.of(42), [])).toBe(0);
  });

  test('the same seed gives the same sequence, a different seed a different one', () => {
    const logits = testLogits(50, 1);
    const a = sequence({ seed: 123 }, logits, 200);
    expect(sequence({ seed: 123 }, logits, 200)).toEqual(a);
    expect(sequence({ seed: 124 }, logits, 200)).not.toEqual(a);
    // Seeds that differ only above bit 32 still differ.
    expect(sequence({ seed: 2 ** 32 }, logits, 200)).not.toEqual(sequence({ seed: 0 }, logits, 200));
    expect(sequence({ seed: -5 }, logits, 200)).not.toEqual(sequence({ seed: 5 }, logits, 200));
  });

  test('without a seed one is drawn at random and exposed for reproduction', () => {
    const logits = testLogits(50, 2);
    const first = new Sampler({});
    const second = new Sampler({});
    expect(Number.isSafeInteger(first.seed)).toBe(true);
    expect(first.seed).not.toBe(second.seed);
    const drawn = Array.from({ length: 100 }, () => first.sample(logits, []));
    expect(sequence({ seed: first.seed }, logits, 100)).toEqual(drawn);
  });

  test('topK = 1 and a tiny topP are greedy', () => {
    for (let salt = 0; salt < 20; salt++) {
      const logits = testLogits(1000, salt, salt % 2 === 0);
      const greedy = new Sampler({ temperature: 0 }).sample(logits, []);
      expect(new Sampler({ topK: 1, temperature: 5, seed: salt }).sample(logits, [])).toBe(greedy);
      expect(new Sampler({ topP: 1e-9, temperature: 5, seed: salt }).sample(logits, [])).toBe(greedy);
    }
  });

  test('sample frequencies follow softmax(logits / temperature)', () => {
    const logits = [1, 2, 0.5, 3, -1];
    for (const temperature of [0.5, 1, 2]) {
      const observed = frequencies(new Sampler({ temperature, seed: 7 }), Float32Array.from(logits), 4000);
      const expected = softmax(logits, temperature);
      observed.forEach((p, i) => expect(Math.abs(p - expected[i])).toBeLessThan(0.03));
    }
  });

  test('topK keeps the k best ids (lowest ids among ties) and renormalises', () => {
    const uniform = new Float32Array(10);
    const observedTies = frequencies(new Sampler({ topK: 3, seed: 1 }), uniform, 3000);
    observedTies.forEach((p, i) => expect(Math.abs(p - (i < 3 ? 1 / 3 : 0))).toBeLessThan(0.03));

    const logits = [0, 2, 1, 3, -1];
    const observed = frequencies(new Sampler({ topK: 2, seed: 2 }), Float32Array.from(logits), 4000);
    const expectedTop2 = softmax([3, 2]);
    expect(observed[3]).toBeCloseTo(expectedTop2[0], 1);
    expect(observed[1]).toBeCloseTo(expectedTop2[1], 1);
    expect(observed[0] + observed[2] + observed[4]).toBe(0);
  });

  test('topK selection matches a full sort on a large vocabulary', () => {
    const logits = testLogits(32000, 99, true);
    const k = 40;
    const expected = Array.from(logits.keys())
      .sort((a, b) => logits[b] - logits[a] || a - b)
      .slice(0, k);
    // A huge temperature makes every kept id likely enough to show up.
    const sampler = new Sampler({ topK: k, temperature: 1e6, seed: 3 });
    const seen = new Set<number>();
    for (let i = 0; i < 1000; i++) seen.add(sampler.sample(logits, []));
    expect([...seen].sort((a, b) => a - b)).toEqual(expected.sort((a, b) => a - b));
  });

  test('topP keeps the smallest most-likely set reaching the mass, then renormalises', () => {
    const logits = Float32Array.from([0.5, 0.3, 0.15, 0.05].map(Math.log));
    const nucleus2 = frequencies(new Sampler({ topP: 0.7, seed: 4 }), logits, 4000);
    expect(nucleus2[0]).toBeCloseTo(0.625, 1);
    expect(nucleus2[1]).toBeCloseTo(0.375, 1);
    expect(nucleus2[2] + nucleus2[3]).toBe(0);

    const nucleus3 = frequencies(new Sampler({ topP: 0.85, seed: 5 }), logits, 4000);
    expect(nucleus3[2]).toBeGreaterThan(0.1);
    expect(nucleus3[3]).toBe(0);

    // topK first: {0, 1, 2} has mass 0.95, of which ids 0 and 1 reach 0.6.
    const combined = frequencies(new Sampler({ topK: 3, topP: 0.6, seed: 6 }), logits, 2000);
    expect(combined[2] + combined[3]).toBe(0);
    expect(combined[0]).toBeCloseTo(0.625, 1);
  });

  test('topP keeps the same ids as a reference full sort, on large, flat and tied vocabularies', () => {
    /** Ids of the nucleus (heaviest first, lower id first among ties), with the margins around topP. */
    function referenceNucleus(logits: Float32Array, topP: number, temperature: number): { ids: number[]; minProb: number } {
      const probs = softmax(Array.from(logits), temperature);
      const order = Array.from(logits.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
      const ids: number[] = [];
      let mass = 0;
      for (const id of order) {
        // Keep clear of topP so float rounding in the sampler cannot decide the boundary.
        expect(Math.abs(mass - topP)).toBeGreaterThan(1e-9);
        ids.push(id);
        mass += probs[id];
        if (mass >= topP) break;
      }
      return { ids: ids.sort((a, b) => a - b), minProb: Math.min(...ids.map((id) => probs[id] / mass)) };
    }
    const large = testLogits(32000, 5); // 25 peaks, most of the vocabulary far below them
    for (let i = 0; i < 25; i++) large[(i * 7919) % 32000] = 10 + (i % 5) * 0.3;
    const tied = testLogits(40, 6, true); // integer logits: many exact ties at the cutoff
    // A smooth ramp, at temperature 4: hundreds of ids in the nucleus, dozens per weight bucket,
    // the cutoff inside one.
    const ramp = Float32Array.from({ length: 3000 }, (_, i) => -i * 0.008);
    const cases: Array<[Float32Array, number, number]> = [
      [large, 0.3, 1],
      [large, 0.6, 1],
      [tied, 0.5, 1],
      [tied, 0.77, 1],
      [ramp, 0.5, 4],
      [ramp, 0.2, 4],
    ];
    for (const [logits, topP, temperature] of cases) {
      const { ids, minProb } = referenceNucleus(logits, topP, temperature);
      expect(ids.length).toBeGreaterThan(1);
      expect(minProb).toBeGreaterThan(0.001);
      // Enough draws that missing any kept id has probability below ids.length * e^-15.
      const draws = Math.ceil(15 / minProb);
      const sampler = new Sampler({ topP, temperature, seed: 10 });
      const seen = new Set<number>();
      for (let i = 0; i < draws; i++) seen.add(sampler.sample(logits, []));
      expect([...seen].sort((a, b) => a - b)).toEqual(ids);
    }
  });

  test('topP reaches into the long tail when the head alone is not enough mass', () => {
    // One peak of weight 1 and 7999 ids of equal weight w = e^-10: the nucleus is the peak plus the
    // lowest-id tail ids needed to reach the mass.
    const logits = new Float32Array(8000);
    const peak = 7000;
    logits[peak] = 10;
    const w = Math.exp(-Math.fround(10));
    const topP = 0.9;
    const total = 1 + 7999 * w;
    const tailKept = Math.ceil((topP * total - 1) / w);
    const sampler = new Sampler({ topP, seed: 12 });
    let peakCount = 0;
    let highestTailId = -1;
    const draws = 500;
    for (let i = 0; i < draws; i++) {
      const id = sampler.sample(logits, []);
      if (id === peak) peakCount++;
      else highestTailId = Math.max(highestTailId, id);
    }
    expect(peakCount / draws).toBeCloseTo(1 / (1 + tailKept * w), 1);
    expect(highestTailId).toBeLessThan(tailKept);
    expect(highestTailId).toBeGreaterThan(tailKept * 0.95);
  });

  test('topP on ties keeps the lowest ids, also after topK', () => {
    const observed = frequencies(new Sampler({ topK: 5, topP: 0.5, seed: 13 }), new Float32Array(10), 3000);
    observed.forEach((p, i) => expect(Math.abs(p - (i < 3 ? 1 / 3 : 0))).toBeLessThan(0.03));
    // Mass exactly equal to topP is enough.
    const exact = frequencies(new Sampler({ topP: 0.5, seed: 14 }), new Float32Array(4), 2000);
    expect(exact[2] + exact[3]).toBe(0);
    expect(exact[0]).toBeCloseTo(0.5, 1);
  });

  test('repetition penalty divides positive and multiplies negative logits of seen ids, once each', () => {
    const greedy = new Sampler({ temperature: 0, repetitionPenalty: 2 });
    expect(greedy.sample(Float32Array.of(2, 1.9, -1), [])).toBe(0);
    expect(greedy.sample(Float32Array.of(2, 1.9, -1), [0])).toBe(1); // 2 / 2 = 1 < 1.9
    expect(greedy.sample(Float32Array.of(-1, -1.5), [0])).toBe(1); // -1 * 2 = -2 < -1.5
    expect(greedy.sample(Float32Array.of(4, 1.5), [0, 0, 0])).toBe(0); // 4 / 2 = 2, not 4 / 8
    expect(new Sampler({ temperature: 0, repetitionPenalty: 0.5 }).sample(Float32Array.of(1, 1.9), [0])).toBe(0);

    const logits = [1, 0.5, -0.5];
    const observed = frequencies(new Sampler({ repetitionPenalty: 1.5, seed: 8 }), Float32Array.from(logits), 4000, [0, 2, 2]);
    const expected = softmax([1 / 1.5, 0.5, -0.5 * 1.5]);
    observed.forEach((p, i) => expect(Math.abs(p - expected[i])).toBeLessThan(0.03));
  });

  test("never modifies the caller's logits", () => {
    const logits = testLogits(100, 3);
    const copy = logits.slice();
    const sampler = new Sampler({ repetitionPenalty: 1.3, temperature: 0.7, topK: 10, topP: 0.9, seed: 1 });
    sampler.sample(logits, [1, 2, 3, 50]);
    expect(logits).toEqual(copy);
  });

  test('infinite logits: +Infinity wins, -Infinity is never drawn', () => {
    const sampler = new Sampler({ seed: 9, temperature: 1 });
    for (let i = 0; i < 50; i++) expect(sampler.sample(Float32Array.of(0, Infinity, 5), [])).toBe(1);
    for (let i = 0; i < 50; i++) expect(sampler.sample(Float32Array.of(-Infinity, 0, -Infinity), [])).toBe(1);
    const infinityTie = frequencies(sampler, Float32Array.of(Infinity, 0, Infinity), 2000);
    expect(infinityTie[0]).toBeCloseTo(0.5, 1);
    expect(infinityTie[2]).toBeCloseTo(0.5, 1);
    // A tiny temperature must not overflow into a tie.
    for (let i = 0; i < 50; i++) expect(new Sampler({ temperature: 1e-300, seed: i }).sample(Float32Array.of(1, 2), [])).toBe(1);
  });

  test('draws the same tokens as the full-sort reference', () => {
    let state = 17;
    const uniform = (): number => {
      state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
      return state / 2 ** 32;
    };
    const pick = <T>(values: T[]): T => values[Math.floor(uniform() * values.length)];
    let draws = 0;
    for (let c = 0; c < 240; c++) {
      // Vocabularies across the native sampler's 4-lane tails and 256-id draw blocks.
      const vocabSize = c === 0 ? 32000 : 1 + Math.floor(uniform() * (c % 2 ? 40 : 1500));
      const kind = c % 5;
      const logits = new Float32Array(vocabSize);
      for (let i = 0; i < vocabSize; i++) {
        const u = uniform();
        // random, integer ties, a ramp, a few peaks over a flat floor, a wide range
        const value = [u * 8 - 4, Math.round(u * 6), -i * 0.01 * u, u < 0.01 ? 20 : u * 4, u * 200 - 100][kind];
        logits[i] = uniform() < 0.02 ? -Infinity : value;
      }
      if (uniform() < 0.05) logits[Math.floor(uniform() * vocabSize)] = Infinity;
      const history = Array.from({ length: Math.floor(uniform() * 12) }, () => Math.floor(uniform() * vocabSize));
      const options = {
        temperature: pick([0, 0.01, 0.5, 1, 3, 100]),
        topK: uniform() < 0.3 ? 1 + Math.floor(uniform() * 60) : 0,
        topP: pick([1e-9, 0.1, 0.5, 0.9, 0.999999, 1, 1]),
        repetitionPenalty: pick([1, 1, 1.3, 0.7]),
        seed: c,
      };
      const sampler = new Sampler(options);
      const reference = new ReferenceSampler(options);
      for (let d = 0; d < 12; d++, draws++) {
        expect([c, sampler.sample(logits, history)]).toEqual([c, reference.sample(logits, history)]);
      }
    }
    expect(draws).toBe(240 * 12);
  });

  test('rejects bad logits and history', () => {
    const sampler = new Sampler({ repetitionPenalty: 1.2 });
    expect(() => sampler.sample(new Float32Array(0), [])).toThrow(/empty/);
    expect(() => sampler.sample(Float32Array.of(0, NaN), [])).toThrow(/logits\[1\] is NaN/);
    expect(() => sampler.sample(Float32Array.of(0, 1), [0, 5])).toThrow(/history\[1\] = 5/);
    expect(() => sampler.sample(Float32Array.of(0, 1), [1.5])).toThrow(/history\[0\] = 1.5/);
    expect(() => sampler.sample(Float32Array.of(0, 1), [2 ** 32])).toThrow(/history\[0\] = 4294967296/);
    expect(() => sampler.sample([0, 1] as unknown as Float32Array, [])).toThrow(/logits must be a Float32Array/);
  });
});

describe('validateSamplingOptions', () => {
  test('accepts defaults and valid values', () => {
    expect(() => validateSamplingOptions({})).not.toThrow();
    expect(() =>
      validateSamplingOptions({ temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, seed: -3 }),
    ).not.toThrow();
  });

  test.each([
    ['temperature', { temperature: -0.1 }],
    ['temperature', { temperature: NaN }],
    ['temperature', { temperature: Infinity }],
    ['topK', { topK: 1.5 }],
    ['topK', { topK: -1 }],
    ['topP', { topP: 0 }],
    ['topP', { topP: 1.01 }],
    ['topP', { topP: NaN }],
    ['repetitionPenalty', { repetitionPenalty: 0 }],
    ['repetitionPenalty', { repetitionPenalty: -1 }],
    ['repetitionPenalty', { repetitionPenalty: Infinity }],
    ['seed', { seed: 1.5 }],
    ['seed', { seed: 2 ** 53 }],
    ['temperature', { temperature: '1' as unknown as number }],
  ])('rejects bad %s: %p', (field, options) => {
    expect(() => validateSamplingOptions(options)).toThrow(new RegExp(`^invalid sampling option: ${field} must be`));
    expect(() => new Sampler(options)).toThrow(field);
  });
});
