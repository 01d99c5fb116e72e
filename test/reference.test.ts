// The float64 reference (test/reference/retnet_ref.ts) against torchscale's fixtures, and its
// three modes against each other: identical when the group-norm ε is negligible (spec §10).
import type { RetNetConfig } from '../lib/config';
import { listFixtures, loadFixture, maxAbs, maxAbsDiff, type Fixture } from './helpers/fixtures';
import {
  erf,
  mulberry32,
  randomConfig,
  randomWeights,
  refForward,
  refRecurrentState,
  type Mode,
  type RefState,
  type Weights,
} from './reference/retnet_ref';

const MODES: Mode[] = ['parallel', 'recurrent', 'chunkwise'];
const LOGITS_TOL = 2e-5; // same-mode fixture file, spec §13
const STATE_KV_TOL = 1e-5;
const STATE_SCALE_REL_TOL = 1e-6;
const FLOAT64_AGREEMENT_TOL = 1e-9;

/** Either a reference state or a fixture's float32 one. */
type AnyState = { kv: ArrayLike<number>[]; scale: ArrayLike<number>[] };

function stateDiff(a: AnyState, b: AnyState): { kv: number; scaleRel: number } {
  let kv = 0;
  let scaleRel = 0;
  a.kv.forEach((layerKv, l) => {
    kv = Math.max(kv, maxAbsDiff(layerKv, b.kv[l]));
    scaleRel = Math.max(scaleRel, maxAbsDiff(a.scale[l], b.scale[l]) / maxAbs(b.scale[l]));
  });
  return { kv, scaleRel };
}

describe('erf', () => {
  // Values from the defining integral (Abramowitz & Stegun table 7.1 / high-precision tables).
  it.each([
    [0, 0],
    [0.1, 0.1124629160182849],
    [0.5, 0.5204998778130465],
    [1, 0.8427007929497149],
    [2, 0.9953222650189527],
    [3, 0.9999779095030014],
    [4, 0.9999999845827421],
    [-1.5, -0.9661051464753108],
  ])('erf(%p)', (x, expected) => {
    expect(Math.abs(erf(x) - expected)).toBeLessThan(1e-14);
  });
});

describe.each(listFixtures())('fixture %s', (name) => {
  let fixture: Fixture;
  const ref = new Map<Mode, { logits: Float64Array; state?: RefState }>();

  beforeAll(() => {
    fixture = loadFixture(name);
    for (const mode of MODES) ref.set(mode, refForward(fixture.config, fixture.weights, fixture.tokens, mode));
  });

  it.each(MODES)('%s logits match the same-mode torchscale file', (mode) => {
    const err = maxAbsDiff(ref.get(mode)!.logits, fixture.logits[mode]);
    console.log(`${name} ${mode}: logits max abs err ${err.toExponential(2)}`);
    expect(err).toBeLessThanOrEqual(LOGITS_TOL);
  });

  it('cross-mode logit gaps match torchscale’s own (the ε effect is reproduced, not hidden)', () => {
    const gap = (a: Mode, b: Mode) => maxAbsDiff(ref.get(a)!.logits, ref.get(b)!.logits);
    const expected = fixture.meta.max_abs_diff;
    const measured = {
      parallel_vs_recurrent: gap('parallel', 'recurrent'),
      parallel_vs_chunkwise: gap('parallel', 'chunkwise'),
      recurrent_vs_chunkwise: gap('recurrent', 'chunkwise'),
    };
    for (const key of Object.keys(expected) as Array<keyof typeof expected>) {
      expect(Math.abs(measured[key] - expected[key])).toBeLessThanOrEqual(2 * LOGITS_TOL);
    }
  });

  it('recurrent state after the last token matches state/', () => {
    const { kv, scaleRel } = stateDiff(ref.get('recurrent')!.state!, fixture.state);
    console.log(`${name} state: kv max abs err ${kv.toExponential(2)}, scale max rel err ${scaleRel.toExponential(2)}`);
    expect(kv).toBeLessThanOrEqual(STATE_KV_TOL);
    expect(scaleRel).toBeLessThanOrEqual(STATE_SCALE_REL_TOL);
  });

  it('closed-form state (recurrent prefill) equals the state the recurrence reaches', () => {
    const closed = refRecurrentState(fixture.config, fixture.weights, fixture.tokens, 'recurrent');
    const { kv, scaleRel } = stateDiff(closed, ref.get('recurrent')!.state!);
    expect(kv).toBeLessThanOrEqual(1e-12);
    expect(scaleRel).toBeLessThanOrEqual(1e-14);
  });
});

describe('fixture eps_tiny_s64_c16 prefill hand-off', () => {
  it.each(['parallel', 'chunkwise'] as Mode[])('closed-form state from a %s prefill matches state/', (mode) => {
    const fixture = loadFixture('eps_tiny_s64_c16');
    const closed = refRecurrentState(fixture.config, fixture.weights, fixture.tokens, mode);
    const { kv, scaleRel } = stateDiff(closed, fixture.state);
    console.log(`eps_tiny_s64_c16 ${mode} prefill: state kv max abs err ${kv.toExponential(2)}`);
    expect(kv).toBeLessThanOrEqual(STATE_KV_TOL);
    expect(scaleRel).toBeLessThanOrEqual(STATE_SCALE_REL_TOL);
  });
});

function randomTokens(config: RetNetConfig, seed: number, B: number, T: number): number[][] {
  const rand = mulberry32(seed);
  return Array.from({ length: B }, () => Array.from({ length: T }, () => Math.floor(rand() * config.vocab_size)));
}

/** Largest logit gap between any two modes (chunkwise at chunk size C), relative to the logits' size. */
function modeSpread(config: RetNetConfig, weights: Weights, tokens: number[][], C: number): number {
  const [parallel, recurrent, chunkwise] = [
    refForward(config, weights, tokens, 'parallel').logits,
    refForward(config, weights, tokens, 'recurrent').logits,
    refForward(config, weights, tokens, 'chunkwise', C).logits,
  ];
  const spread = Math.max(
    maxAbsDiff(parallel, recurrent),
    maxAbsDiff(parallel, chunkwise),
    maxAbsDiff(recurrent, chunkwise),
  );
  return spread / Math.max(maxAbs(parallel), 1);
}

describe('random configs with ε = 1e-30: the three modes agree in float64', () => {
  const seeds = Array.from({ length: 16 }, (_, i) => 100 + i);
  it.each(seeds)('seed %i', (seed) => {
    const config = randomConfig(seed, { layernorm_eps: 1e-30 });
    const rand = mulberry32(seed);
    const B = 1 + Math.floor(rand() * 2);
    const T = 1 + Math.floor(rand() * 20);
    const weights = randomWeights(config, seed);
    const tokens = randomTokens(config, seed, B, T);
    // The config's chunk size, one-token chunks and one chunk holding everything.
    for (const C of [config.recurrent_chunk_size, 1, T + 3]) {
      expect(modeSpread(config, weights, tokens, C)).toBeLessThanOrEqual(FLOAT64_AGREEMENT_TOL);
    }
    const recurrentState = refForward(config, weights, tokens, 'recurrent').state!;
    for (const prefill of ['parallel', 'chunkwise'] as Mode[]) {
      const { kv, scaleRel } = stateDiff(refRecurrentState(config, weights, tokens, prefill), recurrentState);
      expect(kv).toBeLessThanOrEqual(FLOAT64_AGREEMENT_TOL);
      expect(scaleRel).toBeLessThanOrEqual(1e-14);
    }
  });

  it('heads ≥ 20 (γ = 1 in float32, no decay) still agree', () => {
    const config = randomConfig(7, {
      layernorm_eps: 1e-30,
      decoder_retention_heads: 22,
      decoder_embed_dim: 44,
      decoder_value_embed_dim: 22,
      recurrent_chunk_size: 5,
    });
    const weights = randomWeights(config, 7);
    expect(weights.get('retnet_rel_pos.decay')![21]).toBe(0);
    expect(modeSpread(config, weights, randomTokens(config, 7, 2, 13), 5)).toBeLessThanOrEqual(FLOAT64_AGREEMENT_TOL);
  });
});

describe('ε > 0 separates the modes (the agreement check can fail)', () => {
  it('q/k/v weights scaled by 0.1: ε dominates the group norm and chunkwise departs', () => {
    const config = randomConfig(3, { layernorm_eps: 1e-6, recurrent_chunk_size: 4 });
    const weights = randomWeights(config, 3);
    for (const [name, w] of weights) {
      if (/retention\.[qkv]_proj/.test(name)) w.forEach((value, i) => (w[i] = value * 0.1));
    }
    const spread = modeSpread(config, weights, randomTokens(config, 3, 2, 16), 4);
    console.log(`q/k/v × 0.1, ε = 1e-6: relative mode spread ${spread.toExponential(2)}`);
    expect(spread).toBeGreaterThan(1e-3);
  });
});
