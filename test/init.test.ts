import { angleBuffer, decayBuffer, parameterShapes, resolveConfig, RetNetConfig } from '../lib/config';
import { Rng } from '../lib/random';
import { TensorEntry } from '../lib/safetensors';
import { RetNet } from '../lib/model';
import { checkWeights, initWeights } from '../lib/weights';

const D = 64;
const L = 3;
const BASE = {
  vocab_size: 600,
  decoder_embed_dim: D,
  decoder_value_embed_dim: 128,
  decoder_retention_heads: 4,
  decoder_ffn_embed_dim: 96,
  decoder_layers: L,
};

function config(overrides: Partial<RetNetConfig> = {}): RetNetConfig {
  return resolveConfig({ ...BASE, ...overrides });
}

function stats(values: Float32Array): { mean: number; std: number; maxAbs: number } {
  let sum = 0;
  let sumSq = 0;
  let maxAbs = 0;
  for (const v of values) {
    sum += v;
    sumSq += v * v;
    maxAbs = Math.max(maxAbs, Math.abs(v));
  }
  const mean = sum / values.length;
  return { mean, std: Math.sqrt(sumSq / values.length - mean * mean), maxAbs };
}

/** Exact element-wise equality; jest's toEqual is very slow on large typed arrays. */
function sameValues(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function get(weights: Map<string, Float32Array>, name: string): Float32Array {
  const values = weights.get(name);
  if (values === undefined) throw new Error(`missing ${name}`);
  return values;
}

describe('Rng', () => {
  it('is xoshiro128** (reference outputs for state [1, 2, 3, 4])', () => {
    const rng = new Rng(0);
    rng.setState([1, 2, 3, 4]);
    expect(Array.from({ length: 6 }, () => rng.nextUint32())).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
  });

  it('is deterministic by seed and distinct across seeds, including large and negative ones', () => {
    const draw = (seed: number) => {
      const rng = new Rng(seed);
      return Array.from({ length: 4 }, () => rng.nextUint32());
    };
    expect(draw(42)).toEqual(draw(42));
    const seeds = [0, 1, 2, -1, 2 ** 32, 2 ** 32 + 1, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER];
    const streams = new Set(seeds.map((s) => JSON.stringify(draw(s))));
    expect(streams.size).toBe(seeds.length);
  });

  it('resumes exactly from a saved state', () => {
    const rng = new Rng(7);
    for (let i = 0; i < 5; i++) rng.nextNormal();
    const saved = JSON.parse(JSON.stringify(rng.getState()));
    const expected = [rng.nextFloat(), rng.nextNormal(), rng.nextUint32()];
    const resumed = new Rng(999);
    resumed.setState(saved);
    expect([resumed.nextFloat(), resumed.nextNormal(), resumed.nextUint32()]).toEqual(expected);
  });

  it('has uniform and normal draws with the right moments', () => {
    const rng = new Rng(3);
    const n = 100000;
    const uniform = new Float64Array(n).map(() => rng.nextFloat());
    expect(Math.min(...uniform)).toBeGreaterThanOrEqual(0);
    expect(Math.max(...uniform)).toBeLessThan(1);
    const u = stats(new Float32Array(uniform));
    expect(u.mean).toBeCloseTo(0.5, 2);
    expect(u.std).toBeCloseTo(Math.sqrt(1 / 12), 2);
    const normal = stats(new Float32Array(n).map(() => rng.nextNormal()));
    expect(Math.abs(normal.mean)).toBeLessThan(0.015);
    expect(Math.abs(normal.std - 1)).toBeLessThan(0.015);
  });

  it('rejects invalid seeds and states', () => {
    expect(() => new Rng(1.5)).toThrow(/safe integer/);
    expect(() => new Rng(NaN)).toThrow(/safe integer/);
    const rng = new Rng(1);
    expect(() => rng.setState([1, 2, 3])).toThrow(/four uint32/);
    expect(() => rng.setState([1, 2, 3, 2 ** 32])).toThrow(/four uint32/);
    expect(() => rng.setState([1, 2, -3, 4])).toThrow(/four uint32/);
    expect(() => rng.setState([0, 0, 0, 0])).toThrow(/all zero/);
  });
});

describe('initWeights', () => {
  const cfg = config();
  const weights = initWeights(cfg, 1234);

  it('produces every parameter and buffer with the right size, accepted by checkWeights', () => {
    const shapes = parameterShapes(cfg);
    expect([...weights.keys()]).toEqual(shapes.map(([n]) => n));
    const tensors = new Map<string, TensorEntry>();
    for (const [name, shape] of shapes) {
      expect(get(weights, name).length).toBe(shape.reduce((a, b) => a * b, 1));
      tensors.set(name, { dtype: 'F32', shape, data: get(weights, name) });
    }
    expect(() => checkWeights(cfg, tensors, 'init')).not.toThrow();
    expect(get(weights, 'retnet_rel_pos.decay')).toEqual(decayBuffer(4));
    expect(get(weights, 'retnet_rel_pos.angle')).toEqual(angleBuffer(16));
  });

  it('draws embedding and untied output projection from N(0, D^-1/2)', () => {
    for (const name of ['embed_tokens.weight', 'output_projection.weight']) {
      const s = stats(get(weights, name));
      expect(Math.abs(s.mean)).toBeLessThan(0.005);
      expect(s.std / D ** -0.5).toBeGreaterThan(0.98);
      expect(s.std / D ** -0.5).toBeLessThan(1.02);
    }
    expect(sameValues(get(weights, 'output_projection.weight'), get(weights, 'embed_tokens.weight'))).toBe(false);
  });

  it('respects the xavier and nn.Linear uniform bounds', () => {
    const cases: Array<[string, number]> = [
      ['retention.q_proj.weight', 2 ** -2.5 * Math.sqrt(6 / (64 + 64))],
      ['retention.k_proj.weight', 2 ** -2.5 * Math.sqrt(6 / (64 + 64))],
      ['retention.v_proj.weight', 2 ** -2.5 * Math.sqrt(6 / (64 + 128))],
      ['retention.g_proj.weight', 2 ** -2.5 * Math.sqrt(6 / (64 + 128))],
      ['retention.out_proj.weight', 2 ** -1 * Math.sqrt(6 / (128 + 64))],
      ['ffn.fc1.weight', 1 / Math.sqrt(64)],
      ['ffn.gate.weight', 1 / Math.sqrt(64)],
      ['ffn.fc2.weight', 1 / Math.sqrt(96)],
    ];
    for (let l = 0; l < L; l++) {
      for (const [suffix, bound] of cases) {
        const s = stats(get(weights, `layers.${l}.${suffix}`));
        expect(s.maxAbs).toBeLessThanOrEqual(Math.fround(bound));
        expect(s.maxAbs).toBeGreaterThan(0.97 * bound); // the draws actually fill the range
        expect(s.std / (bound / Math.sqrt(3))).toBeGreaterThan(0.93);
        expect(s.std / (bound / Math.sqrt(3))).toBeLessThan(1.07);
      }
    }
  });

  it('sets every RMSNorm weight to 1', () => {
    const withNorms = config({ layernorm_embedding: true });
    const w = initWeights(withNorms, 5);
    const norms = [...w.keys()].filter((n) => /norm/.test(n));
    expect(norms).toEqual(expect.arrayContaining(['layernorm_embedding.weight', 'layer_norm.weight', 'layers.2.final_layer_norm.weight']));
    expect(norms.length).toBe(2 + 2 * L);
    for (const name of norms) expect(sameValues(get(w, name), new Float32Array(get(w, name).length).fill(1))).toBe(true);
  });

  it('is deterministic by seed', () => {
    const again = initWeights(cfg, 1234);
    const other = initWeights(cfg, 1235);
    for (const [name, values] of weights) expect(sameValues(get(again, name), values)).toBe(true);
    expect(sameValues(get(other, 'layers.0.retention.q_proj.weight'), get(weights, 'layers.0.retention.q_proj.weight'))).toBe(false);
  });

  it('divides fc1, fc2, out_proj and v_proj by (8L)^(1/4) under deepnorm and leaves the rest', () => {
    const deep = initWeights(config({ deepnorm: true }), 1234);
    const divisor = (8 * L) ** 0.25;
    for (const [name, values] of weights) {
      const scaled = get(deep, name);
      const expected = /fc1|fc2|out_proj|v_proj/.test(name) ? values.map((v) => v / divisor) : values;
      expect([name, sameValues(scaled, expected)]).toEqual([name, true]);
    }
  });

  it('ties the output projection to the embedding (the same array)', () => {
    const tied = initWeights(config({ share_decoder_input_output_embed: true }), 9);
    expect(get(tied, 'output_projection.weight')).toBe(get(tied, 'embed_tokens.weight'));
    // Same seed: the embedding (drawn first) matches the untied model's; the untied model then
    // spends draws on its own output projection, which the tied one does not.
    const untied = initWeights(cfg, 9);
    expect(sameValues(get(tied, 'embed_tokens.weight'), get(untied, 'embed_tokens.weight'))).toBe(true);
    expect(sameValues(get(tied, 'layers.0.retention.q_proj.weight'), get(untied, 'layers.0.retention.q_proj.weight'))).toBe(false);
  });
});

describe('RetNet.create', () => {
  it('has initWeights values, though it draws large tensors a slice at a time between event-loop turns', async () => {
    // A 4096 x 128 embedding spans two slices, deepnorm rescales some, and the tied output follows the embedding.
    for (const overrides of [{}, { deepnorm: true, share_decoder_input_output_embed: true }]) {
      const cfg = config({ vocab_size: 4096, decoder_embed_dim: 128, ...overrides });
      const model = await RetNet.create(cfg, { seed: 77 });
      try {
        const created = model.stateDict();
        for (const [name, values] of initWeights(cfg, 77)) expect([name, sameValues(created.get(name)!, values)]).toEqual([name, true]);
      } finally {
        model.dispose();
      }
    }
  });
});
