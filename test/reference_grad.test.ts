// The float64 loss-and-gradient reference (test/reference/retnet_ref_grad.ts): its loss against the
// forward reference, its gradient against central differences and against torchscale's fixtures.
import { BUFFER_NAMES, parameterShapes, type RetNetConfig } from '../lib/config';
import { listFixtures, loadFixture, maxAbs, maxAbsDiff, readGrads } from './helpers/fixtures';
import { mulberry32, randomConfig, randomWeights, refForward, type Weights } from './reference/retnet_ref';
import { refLoss, refLossAndGrads, type LossMode, type LossOptions } from './reference/retnet_ref_grad';

const MODES: LossMode[] = ['parallel', 'chunkwise'];
const FD_STEP = 1e-4; // with the fourth-order stencil: truncation ~h⁴, rounding ~1e-16/h
const FD_REL_TOL = 1e-6;
const FD_ENTRIES_PER_TENSOR = 4;
const FIXTURE_LOSS_TOL = 1e-5; // spec §13
const FIXTURE_GRAD_REL_TOL = 1e-4; // max-abs difference / max |g|, spec §13

/**
 * Tiny configs that between them cover every option of spec §1 and full, partial and oversized
 * chunks (T = 9). Value heads are at least 2 wide: a 1-wide group norm is nearly sign(o), which
 * leaves the retention gradients so small that finite differences only see rounding noise.
 */
const SMALL_CASES: Array<{ seed: number; overrides: Partial<RetNetConfig> }> = [
  {
    seed: 1,
    overrides: {
      vocab_size: 7,
      decoder_embed_dim: 4,
      decoder_value_embed_dim: 6,
      decoder_retention_heads: 2,
      decoder_ffn_embed_dim: 5,
      decoder_layers: 1,
      decoder_normalize_before: true,
      activation_fn: 'gelu',
      layernorm_embedding: false,
      share_decoder_input_output_embed: false,
      deepnorm: false,
      no_scale_embedding: true,
      layernorm_eps: 1e-6,
      recurrent_chunk_size: 4,
    },
  },
  {
    seed: 2,
    overrides: {
      vocab_size: 12,
      decoder_embed_dim: 8,
      decoder_value_embed_dim: 4,
      decoder_retention_heads: 2,
      decoder_ffn_embed_dim: 6,
      decoder_layers: 2,
      decoder_normalize_before: false,
      activation_fn: 'swish',
      layernorm_embedding: true,
      share_decoder_input_output_embed: true,
      deepnorm: false,
      no_scale_embedding: false,
      layernorm_eps: 1e-5,
      recurrent_chunk_size: 2,
    },
  },
  {
    seed: 3,
    overrides: {
      vocab_size: 9,
      decoder_embed_dim: 6,
      decoder_value_embed_dim: 9,
      decoder_retention_heads: 3,
      decoder_ffn_embed_dim: 4,
      decoder_layers: 2,
      decoder_normalize_before: true,
      activation_fn: 'relu',
      layernorm_embedding: true,
      share_decoder_input_output_embed: false,
      deepnorm: true,
      no_scale_embedding: true,
      layernorm_eps: 1e-6,
      recurrent_chunk_size: 3,
    },
  },
  {
    seed: 4,
    overrides: {
      vocab_size: 10,
      decoder_embed_dim: 8,
      decoder_value_embed_dim: 2,
      decoder_retention_heads: 1,
      decoder_ffn_embed_dim: 3,
      decoder_layers: 2,
      decoder_normalize_before: false,
      activation_fn: 'gelu',
      layernorm_embedding: false,
      share_decoder_input_output_embed: true,
      deepnorm: true,
      no_scale_embedding: true,
      layernorm_eps: 1e-30,
      recurrent_chunk_size: 5,
    },
  },
  {
    seed: 5,
    overrides: {
      vocab_size: 5,
      decoder_embed_dim: 4,
      decoder_value_embed_dim: 4,
      decoder_retention_heads: 2,
      decoder_ffn_embed_dim: 2,
      decoder_layers: 1,
      decoder_normalize_before: true,
      activation_fn: 'swish',
      layernorm_embedding: false,
      share_decoder_input_output_embed: true,
      deepnorm: false,
      no_scale_embedding: false,
      layernorm_eps: 1e-6,
      recurrent_chunk_size: 12,
    },
  },
];
const SMALL_BATCH = 2;
const SMALL_SEQ = 9;

interface SmallCase {
  config: RetNetConfig;
  weights: Map<string, Float64Array>;
  tokens: number[][];
}

function makeCase({ seed, overrides }: (typeof SMALL_CASES)[number]): SmallCase {
  const config = randomConfig(seed, overrides);
  const weights = new Map<string, Float64Array>();
  for (const [name, w] of randomWeights(config, seed)) weights.set(name, Float64Array.from(w));
  const rand = mulberry32(seed + 1000);
  const tokens = Array.from({ length: SMALL_BATCH }, () =>
    Array.from({ length: SMALL_SEQ }, () => Math.floor(rand() * config.vocab_size)),
  );
  return { config, weights, tokens };
}

function trainableNames(config: RetNetConfig): string[] {
  return parameterShapes(config)
    .map(([name]) => name)
    .filter(
      (name) =>
        !(BUFFER_NAMES as readonly string[]).includes(name) &&
        !(name === 'output_projection.weight' && config.share_decoder_input_output_embed),
    );
}

/** Σ mask·CE / Σ mask over positions with a target, from the forward reference's logits. */
function lossFromForward(
  config: RetNetConfig,
  weights: Weights,
  tokens: number[][],
  mode: LossMode,
  targets: number[][],
  mask: number[][],
): number {
  const V = config.vocab_size;
  const { logits } = refForward(config, weights, tokens, mode);
  const T = tokens[0].length;
  let total = 0;
  let weightSum = 0;
  tokens.forEach((_, b) => {
    for (let t = 0; t < T; t++) {
      const target = targets[b][t];
      if (target === -1) continue;
      const row = logits.subarray((b * T + t) * V, (b * T + t + 1) * V);
      let max = -Infinity;
      for (let v = 0; v < V; v++) max = Math.max(max, row[v]);
      let sumExp = 0;
      for (let v = 0; v < V; v++) sumExp += Math.exp(row[v] - max);
      total += mask[b][t] * (max + Math.log(sumExp) - row[target]);
      weightSum += mask[b][t];
    }
  });
  return total / weightSum;
}

const nextTokenTargets = (tokens: number[][]) =>
  tokens.map((row) => row.map((_, t) => (t + 1 < row.length ? row[t + 1] : -1)));
const onesLike = (tokens: number[][]) => tokens.map((row) => row.map(() => 1));

/**
 * Fourth-order central differences (8(f(h) − f(−h)) − (f(2h) − f(−2h))) / 12h of refLoss with the
 * normalisers frozen at the run's values, on a seeded random subset of each tensor's entries.
 * Returns per tensor the worst |fd − g| / max(|g|, |fd|, 1e-3·max|g_tensor|): relative per entry,
 * with a floor so that entries far below the tensor's scale (where rounding dominates) don't decide.
 */
function finiteDifferenceErrors(c: SmallCase, mode: LossMode, opts: LossOptions = {}): Map<string, number> {
  const run = refLossAndGrads(c.config, c.weights, c.tokens, mode, c.config.recurrent_chunk_size, opts);
  const frozen = { ...opts, frozenNormalisers: run.normalisers };
  const loss = () => refLoss(c.config, c.weights, c.tokens, mode, c.config.recurrent_chunk_size, frozen);
  const rand = mulberry32(run.grads.size);
  const errors = new Map<string, number>();
  for (const [name, grad] of run.grads) {
    const w = c.weights.get(name)!;
    const floor = 1e-3 * maxAbs(grad);
    let worst = 0;
    for (let s = 0; s < Math.min(FD_ENTRIES_PER_TENSOR, w.length); s++) {
      const i = Math.floor(rand() * w.length);
      const saved = w[i];
      const lossAt = (offset: number) => {
        w[i] = saved + offset;
        return loss();
      };
      const near = lossAt(FD_STEP) - lossAt(-FD_STEP);
      const far = lossAt(2 * FD_STEP) - lossAt(-2 * FD_STEP);
      w[i] = saved;
      const fd = (8 * near - far) / (12 * FD_STEP);
      worst = Math.max(worst, Math.abs(fd - grad[i]) / Math.max(Math.abs(grad[i]), Math.abs(fd), floor));
    }
    errors.set(name, worst);
  }
  return errors;
}

describe.each(SMALL_CASES.map((entry) => [entry.seed, entry] as const))('small case %i', (_seed, entry) => {
  const c = makeCase(entry);

  it.each(MODES)('%s loss equals the mean next-token CE of the forward reference logits', (mode) => {
    const { config, weights, tokens } = c;
    const expected = lossFromForward(config, weights, tokens, mode, nextTokenTargets(tokens), onesLike(tokens));
    expect(Math.abs(refLoss(c.config, c.weights, c.tokens, mode) - expected)).toBeLessThanOrEqual(1e-12 * expected);
  });

  it.each(MODES)('%s gradient matches central differences (normalisers frozen)', (mode) => {
    const errors = finiteDifferenceErrors(c, mode);
    expect([...errors.keys()].sort()).toEqual(trainableNames(c.config).sort());
    const worst = Math.max(...errors.values());
    console.log(`small case ${entry.seed} ${mode}: FD max rel err ${worst.toExponential(2)}`);
    expect(worst).toBeLessThanOrEqual(FD_REL_TOL);
  });
});

it('the detached normalisers are not all 1 in the small cases (so the stop-gradient is exercised)', () => {
  for (const mode of MODES) {
    const divisors = SMALL_CASES.flatMap((entry) => {
      const c = makeCase(entry);
      return refLossAndGrads(c.config, c.weights, c.tokens, mode).normalisers.flatMap((rows) => [...rows]);
    });
    expect(divisors.filter((d) => d > 1).length).toBeGreaterThan(divisors.length / 10);
  }
});

describe('targets and mask', () => {
  const c = makeCase(SMALL_CASES[1]);
  const rand = mulberry32(77);
  // Random targets with some −1, and a mask of zeros, ones and fractions.
  const targets = c.tokens.map((row) => row.map(() => (rand() < 0.2 ? -1 : Math.floor(rand() * c.config.vocab_size))));
  const mask = c.tokens.map((row) => row.map(() => [0, 1, 0.25, 2][Math.floor(rand() * 4)]));

  it.each(MODES)('%s loss is Σ mask·CE / Σ mask over positions with a target', (mode) => {
    const expected = lossFromForward(c.config, c.weights, c.tokens, mode, targets, mask);
    const { loss } = refLossAndGrads(c.config, c.weights, c.tokens, mode, undefined, { targets, mask });
    expect(Math.abs(loss - expected)).toBeLessThanOrEqual(1e-12 * expected);
  });

  it.each(MODES)('%s: explicit next-token targets and a mask of ones give the default loss and grads', (mode) => {
    const plain = refLossAndGrads(c.config, c.weights, c.tokens, mode);
    const explicit = refLossAndGrads(c.config, c.weights, c.tokens, mode, undefined, {
      targets: nextTokenTargets(c.tokens),
      mask: onesLike(c.tokens),
    });
    expect(explicit.loss).toBe(plain.loss);
    for (const [name, grad] of plain.grads) expect(maxAbsDiff(explicit.grads.get(name)!, grad)).toBe(0);
  });

  it.each(MODES)('%s: positions with mask 0 or target −1 do not count', (mode) => {
    const base = refLossAndGrads(c.config, c.weights, c.tokens, mode, undefined, { targets, mask });
    const ignored = targets.flat().filter((target) => target === -1).length;
    const unweighted = mask.flat().filter((m, n) => m === 0 && targets.flat()[n] !== -1).length;
    expect(Math.min(ignored, unweighted)).toBeGreaterThan(0);
    // A new target where the mask is 0 and a large mask where the target is −1: nothing may change.
    const V = c.config.vocab_size;
    const other = refLossAndGrads(c.config, c.weights, c.tokens, mode, undefined, {
      targets: targets.map((row, b) =>
        row.map((target, t) => (mask[b][t] === 0 && target !== -1 ? (target + 1) % V : target)),
      ),
      mask: mask.map((row, b) => row.map((m, t) => (targets[b][t] === -1 ? 3 : m))),
    });
    expect(other.loss).toBe(base.loss);
    for (const [name, grad] of base.grads) expect(maxAbsDiff(other.grads.get(name)!, grad)).toBe(0);
  });

  it.each(MODES)('%s gradient with targets and mask matches central differences', (mode) => {
    const worst = Math.max(...finiteDifferenceErrors(c, mode, { targets, mask }).values());
    expect(worst).toBeLessThanOrEqual(FD_REL_TOL);
  });
});

describe.each(listFixtures())('fixture %s', (name) => {
  const fixture = loadFixture(name);
  const expectedLoss = { parallel: fixture.meta.training.loss_value, chunkwise: fixture.meta.training.loss_chunkwise };
  const gradsKind = { parallel: 'grads', chunkwise: 'grads_chunkwise' } as const;

  it.each(MODES)('%s loss and grads match torchscale', (mode) => {
    const { config, weights, tokens, meta } = fixture;
    const { loss, grads } = refLossAndGrads(config, weights, tokens, mode, meta.chunk_size);
    const expected = readGrads(name, gradsKind[mode]);
    expect([...grads.keys()].sort()).toEqual([...expected.keys()].sort());
    let worst = 0;
    let worstName = '';
    for (const [param, g] of expected) {
      const rel = maxAbsDiff(grads.get(param)!, g) / maxAbs(g);
      if (rel >= worst) [worst, worstName] = [rel, param];
    }
    const lossErr = Math.abs(loss - expectedLoss[mode]);
    const gradErr = `grads max rel err ${worst.toExponential(2)} (${worstName})`;
    console.log(`${name} ${mode}: loss err ${lossErr.toExponential(2)}, ${gradErr}`);
    expect(lossErr).toBeLessThanOrEqual(FIXTURE_LOSS_TOL);
    expect(worst).toBeLessThanOrEqual(FIXTURE_GRAD_REL_TOL);
  });
});
