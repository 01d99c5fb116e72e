// The native training path: loss and gradients against torchscale's fixtures (both
// training forms), finite differences of the float64 reference for the options the
// fixtures lack, targets/mask semantics, tied gradients, and trainStep / optimizer state.
import { RetNet } from '../lib';
import { resolveConfig, type RetNetConfig } from '../lib/config';
import { addon, type NativeTrainOptions } from '../lib/native';
import { listFixtures, loadFixture, maxAbs, maxAbsDiff, readGrads } from './helpers/fixtures';
import { mulberry32, randomWeights, refForward } from './reference/retnet_ref';
import { refLossAndGrads } from './reference/retnet_ref_grad';

const TRAIN_MODES = [
  ['parallel', 'grads'],
  ['chunkwise', 'grads_chunkwise'],
] as const;

describe.each(listFixtures())('fixture %s', (name) => {
  const f = loadFixture(name);
  let model: RetNet;
  beforeAll(async () => {
    model = await RetNet.fromStateDict(f.config, f.weights);
  });
  afterAll(() => model.dispose());

  test.each(TRAIN_MODES)('%s loss and gradients match torchscale', async (mode, kind) => {
    const { loss, grads } = await model.lossAndGradients(f.tokens, { mode, chunkSize: f.meta.chunk_size });
    const expectedLoss = mode === 'parallel' ? f.meta.training.loss_value : f.meta.training.loss_chunkwise;
    const expected = readGrads(name, kind);
    expect([...grads.keys()].sort()).toEqual([...expected.keys()].sort());
    let worst = 0;
    let worstName = '';
    for (const [param, want] of expected) {
      const rel = maxAbsDiff(grads.get(param)!, want) / maxAbs(want);
      if (rel > worst) [worst, worstName] = [rel, param];
    }
    const lossErr = Math.abs(loss - expectedLoss);
    console.log(`${name} ${mode}: loss err ${lossErr.toExponential(2)}, max grad rel err ${worst.toExponential(2)} (${worstName})`);
    expect(lossErr).toBeLessThanOrEqual(1e-5);
    expect(worst).toBeLessThanOrEqual(1e-4);
  });

  // bf16 products round each input to 8 significant bits (relative error up to 2^-9): the loss
  // and gradients stay close to torchscale's fp32 ones, and are not the fp32 numbers themselves.
  test.each(TRAIN_MODES)('%s loss and gradients with bf16 products stay near torchscale', async (mode, kind) => {
    const options = { mode, chunkSize: f.meta.chunk_size };
    const { loss, grads } = await model.lossAndGradients(f.tokens, { ...options, precision: 'bf16' });
    const fp32 = await model.lossAndGradients(f.tokens, options);
    const expectedLoss = mode === 'parallel' ? f.meta.training.loss_value : f.meta.training.loss_chunkwise;
    let worst = 0;
    for (const [param, want] of readGrads(name, kind)) worst = Math.max(worst, maxAbsDiff(grads.get(param)!, want) / maxAbs(want));
    const lossErr = Math.abs(loss - expectedLoss) / expectedLoss;
    console.log(`${name} ${mode} bf16: loss rel err ${lossErr.toExponential(2)}, max grad rel err ${worst.toExponential(2)}`);
    expect(lossErr).toBeLessThanOrEqual(2e-3);
    expect(worst).toBeLessThanOrEqual(5e-2);
    expect(loss).not.toBe(fp32.loss);
  });
});

/** Mean next-token cross-entropy of float64 reference logits. */
function refLoss(config: RetNetConfig, weights: Map<string, Float64Array | Float32Array>, tokens: number[][], mode: 'parallel' | 'chunkwise'): number {
  const V = config.vocab_size;
  const T = tokens[0].length;
  const { logits } = refForward(config, weights, tokens, mode);
  let total = 0;
  for (let b = 0; b < tokens.length; b++) {
    for (let t = 0; t + 1 < T; t++) {
      const row = logits.subarray((b * T + t) * V, (b * T + t + 1) * V);
      const max = Math.max(...row);
      const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
      total += lse - row[tokens[b][t + 1]];
    }
  }
  return total / (tokens.length * (T - 1));
}

function randomTokens(seed: number, B: number, T: number, V: number): number[][] {
  const rand = mulberry32(seed);
  return Array.from({ length: B }, () => Array.from({ length: T }, () => Math.floor(rand() * V)));
}

function smallConfig(overrides: Partial<RetNetConfig>): RetNetConfig {
  return resolveConfig({
    vocab_size: 24,
    decoder_embed_dim: 12,
    decoder_value_embed_dim: 18,
    decoder_retention_heads: 3,
    decoder_ffn_embed_dim: 20,
    decoder_layers: 2,
    // ε ~ 0 makes the group norm exactly scale-invariant, so the detached normalisers
    // have no effect and finite differences of the full function are the reference.
    layernorm_eps: 1e-30,
    recurrent_chunk_size: 4,
    ...overrides,
  });
}

// The options the fixtures do not cover, each checked by per-tensor directional
// derivatives of the float64 reference loss (central differences).
const FD_CASES: Array<[string, Partial<RetNetConfig>]> = [
  ['post-norm relu deepnorm', { decoder_normalize_before: false, activation_fn: 'relu', deepnorm: true }],
  ['post-norm layernorm_embedding tied swish', { decoder_normalize_before: false, layernorm_embedding: true, share_decoder_input_output_embed: true, activation_fn: 'swish' }],
  ['pre-norm deepnorm gelu embed scale', { deepnorm: true, activation_fn: 'gelu', no_scale_embedding: false }],
];

describe.each(FD_CASES)('finite differences: %s', (label, overrides) => {
  test.each(['parallel', 'chunkwise'] as const)('%s gradients', async (mode) => {
    const config = smallConfig(overrides);
    const weights = randomWeights(config, 7, 0.7);
    const tokens = randomTokens(3, 2, 10, config.vocab_size); // chunk 4: a partial last chunk
    const model = await RetNet.fromStateDict(config, weights);
    const { grads } = await model.lossAndGradients(tokens, { mode, chunkSize: 4 });
    model.dispose();
    const tied = config.share_decoder_input_output_embed;
    const rand = mulberry32(11);
    const h = 1e-4;
    let worst = 0;
    for (const [param, g] of grads) {
      const direction = Float64Array.from(g, () => rand() - 0.5);
      const shifted = (sign: number) => {
        const w = new Map<string, Float64Array>();
        for (const [n, data] of weights) w.set(n, Float64Array.from(data));
        const targets = tied && param === 'embed_tokens.weight' ? ['embed_tokens.weight', 'output_projection.weight'] : [param];
        for (const n of targets) w.get(n)!.forEach((x, i, arr) => (arr[i] = x + sign * h * direction[i]));
        return w;
      };
      const fd = (refLoss(config, shifted(1), tokens, mode) - refLoss(config, shifted(-1), tokens, mode)) / (2 * h);
      const analytic = g.reduce((s, gi, i) => s + gi * direction[i], 0);
      const rel = Math.abs(fd - analytic) / Math.max(Math.abs(fd), 1e-3);
      worst = Math.max(worst, rel);
    }
    console.log(`finite differences ${label} ${mode}: max rel err ${worst.toExponential(2)} over ${grads.size} tensors`);
    expect(worst).toBeLessThanOrEqual(2e-3);
  });
});

describe('targets and mask', () => {
  const config = smallConfig({ layernorm_eps: 1e-6 });
  let model: RetNet;
  const tokens = randomTokens(5, 2, 9, 24);
  beforeAll(async () => {
    model = await RetNet.fromStateDict(config, randomWeights(config, 1));
  });
  afterAll(() => model.dispose());

  test('explicit shifted targets equal the default', async () => {
    const targets = new Int32Array(tokens.flatMap((row) => row.map((_, t) => (t + 1 < row.length ? row[t + 1] : -1))));
    const a = await model.lossAndGradients(tokens);
    const b = await model.lossAndGradients(tokens, { targets, mask: new Float32Array(targets.length).fill(3) });
    expect(b.loss).toBeCloseTo(a.loss, 6);
    for (const [n, g] of a.grads) expect(maxAbsDiff(b.grads.get(n)!, g)).toBeLessThanOrEqual(1e-6 * Math.max(1, maxAbs(g)));
  });

  test.each(['parallel', 'chunkwise'] as const)('%s: masking a row equals the sub-batch without it', async (mode) => {
    const mask = new Float32Array(2 * 9);
    mask.fill(1, 0, 9);
    const masked = await model.lossAndGradients(tokens, { mode, mask });
    const alone = await model.lossAndGradients([tokens[0]], { mode });
    expect(Math.abs(masked.loss - alone.loss)).toBeLessThanOrEqual(1e-6);
    for (const [n, g] of alone.grads) expect(maxAbsDiff(masked.grads.get(n)!, g)).toBeLessThanOrEqual(1e-5 * Math.max(1e-3, maxAbs(g)));
  });

  test('ignored targets (-1) drop positions', async () => {
    // Only position 3 of row 1 counts: the loss is that one position's cross-entropy.
    const targets = new Int32Array(18).fill(-1);
    targets[9 + 3] = 5;
    const one = await model.lossAndGradients(tokens, { targets });
    const { logits } = await model.forward(tokens);
    const row = logits.subarray((9 + 3) * 24, (9 + 4) * 24);
    const max = Math.max(...row);
    const ce = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0)) - row[5];
    expect(Math.abs(one.loss - ce)).toBeLessThanOrEqual(1e-5);
  });

  test('bad targets and masks fail with clear errors', async () => {
    await expect(model.lossAndGradients(tokens, { targets: new Int32Array(5) })).rejects.toThrow(/targets has 5 entries/);
    await expect(model.lossAndGradients(tokens, { targets: new Int32Array(18).fill(24) })).rejects.toThrow(/targets\[0\] = 24 is outside/);
    await expect(model.lossAndGradients(tokens, { targets: new Int32Array(18).fill(-2) })).rejects.toThrow(/outside \[-1, 24\)/);
    const nan = new Float32Array(18).fill(1);
    nan[4] = NaN;
    await expect(model.lossAndGradients(tokens, { mask: nan })).rejects.toThrow(/mask\[4\] = NaN/);
    await expect(model.lossAndGradients(tokens, { mask: new Float32Array(18).fill(-1) })).rejects.toThrow(/finite and >= 0/);
    await expect(model.lossAndGradients(tokens, { mask: new Float32Array(18) })).rejects.toThrow(/no position has a target/);
    await expect(model.lossAndGradients(tokens, { mask: new Float64Array(18) as unknown as Float32Array })).rejects.toThrow(/Float32Array/);
    // The native layer checks too (synchronously, before any work is queued).
    expect(() =>
      model.native().lossAndGradients(new Int32Array(18), 2, 9, 'parallel', 4, new Int32Array(18).fill(99), null, 0, false, 'fp32'),
    ).toThrow(/target 99 at index 0/);
  });
});

test('a tied embedding gets the sum of its lookup and output-projection gradients', async () => {
  const tiedConfig = smallConfig({ share_decoder_input_output_embed: true, layernorm_eps: 1e-6 });
  const untiedConfig = smallConfig({ share_decoder_input_output_embed: false, layernorm_eps: 1e-6 });
  const weights = randomWeights(tiedConfig, 2);
  const tokens = randomTokens(9, 2, 11, 24);
  const tied = await RetNet.fromStateDict(tiedConfig, weights);
  const untied = await RetNet.fromStateDict(untiedConfig, weights);
  for (const mode of ['parallel', 'chunkwise'] as const) {
    const a = await tied.lossAndGradients(tokens, { mode });
    const b = await untied.lossAndGradients(tokens, { mode });
    expect(a.grads.has('output_projection.weight')).toBe(false);
    const sum = b.grads.get('embed_tokens.weight')!.map((x, i) => x + b.grads.get('output_projection.weight')![i]);
    expect(maxAbsDiff(a.grads.get('embed_tokens.weight')!, sum)).toBeLessThanOrEqual(1e-6 * maxAbs(sum));
    expect(a.loss).toBe(b.loss);
  }
  tied.dispose();
  untied.dispose();
});

describe('dropout, activation dropout and drop path', () => {
  const config = smallConfig({ dropout: 0.2, activation_dropout: 0.3, drop_path_rate: 0.5, decoder_layers: 3 });
  const tokens = randomTokens(21, 4, 10, 24);

  test('masks follow the seed; p = 0 is the plain loss', async () => {
    const weights = randomWeights(config, 8, 0.7);
    const model = await RetNet.fromStateDict(config, weights);
    const plain = await RetNet.fromStateDict({ ...config, dropout: 0, activation_dropout: 0, drop_path_rate: 0 }, weights);
    const a = await model.lossAndGradients(tokens, { seed: 1 });
    const b = await model.lossAndGradients(tokens, { seed: 1 });
    const other = await model.lossAndGradients(tokens, { seed: 2 });
    const ref = await plain.lossAndGradients(tokens);
    expect(b.loss).toBe(a.loss);
    expect(other.loss).not.toBe(a.loss);
    expect(a.loss).not.toBe(ref.loss);
    expect(ref.loss).toBeCloseTo(refLoss(config, weights, tokens, 'parallel'), 5);
    model.dispose();
    plain.dispose();
  });

  test.each(['parallel', 'chunkwise'] as const)('%s gradients match finite differences with fixed masks', async (mode) => {
    const weights = randomWeights(config, 9, 0.7);
    const model = await RetNet.fromStateDict(config, weights);
    const native = model.native();
    const { grads } = await model.lossAndGradients(tokens, { mode, seed: 5 });
    const rand = mulberry32(12);
    const h = 2e-3;
    let worst = 0;
    for (const param of ['embed_tokens.weight', 'layers.0.retention.q_proj.weight', 'layers.1.ffn.fc1.weight', 'layers.2.retention.out_proj.weight', 'layers.0.ffn.fc2.weight']) {
      const w0 = weights.get(param)!;
      const direction = Float32Array.from(w0, () => rand() - 0.5);
      const lossAt = async (sign: number) => {
        native.setParam(param, w0.map((x, i) => x + sign * h * direction[i]));
        return (await model.lossAndGradients(tokens, { mode, seed: 5 })).loss;
      };
      const fd = ((await lossAt(1)) - (await lossAt(-1))) / (2 * h);
      native.setParam(param, w0);
      const analytic = grads.get(param)!.reduce((s, g, i) => s + g * direction[i], 0);
      worst = Math.max(worst, Math.abs(fd - analytic) / Math.max(Math.abs(fd), 1e-2));
    }
    console.log(`dropout ${mode}: finite-difference max rel err ${worst.toExponential(2)}`);
    expect(worst).toBeLessThanOrEqual(1e-2);
    model.dispose();
  });
});

describe('activation checkpointing', () => {
  const sameBits = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
  const CASES: Array<[string, Partial<RetNetConfig>]> = [
    ['pre-norm with dropout and drop path', { dropout: 0.2, activation_dropout: 0.3, drop_path_rate: 0.5, decoder_layers: 3 }],
    ['post-norm layernorm_embedding tied', { decoder_normalize_before: false, layernorm_embedding: true, share_decoder_input_output_embed: true }],
  ];
  test.each(CASES)('%s: the same loss and gradients, bit for bit, in both forms', async (_label, overrides) => {
    const config = smallConfig({ layernorm_eps: 1e-6, ...overrides });
    const model = await RetNet.fromStateDict(config, randomWeights(config, 13, 0.7));
    const tokens = randomTokens(22, 3, 10, config.vocab_size);
    for (const mode of ['parallel', 'chunkwise'] as const) {
      // Kept, recomputed, then kept again: the activation buffers change shape in between.
      const kept = await model.lossAndGradients(tokens, { mode, chunkSize: 4, seed: 3 });
      const recomputed = await model.lossAndGradients(tokens, { mode, chunkSize: 4, seed: 3, checkpointActivations: true });
      const keptAgain = await model.lossAndGradients(tokens, { mode, chunkSize: 4, seed: 3 });
      expect(recomputed.loss).toBe(kept.loss);
      expect(keptAgain.loss).toBe(kept.loss);
      expect([...recomputed.grads.keys()]).toEqual([...kept.grads.keys()]);
      for (const [name, g] of kept.grads) {
        expect(maxAbs(g)).toBeGreaterThan(0);
        expect({ name, same: sameBits(recomputed.grads.get(name)!, g) }).toEqual({ name, same: true });
        expect(sameBits(keptAgain.grads.get(name)!, g)).toBe(true);
      }
    }
    await expect(model.lossAndGradients(tokens, { checkpointActivations: 1 as unknown as boolean })).rejects.toThrow(/checkpointActivations must be a boolean/);
    model.dispose();
  });

  test('trainStep with checkpointing takes the same steps', async () => {
    const config = smallConfig({ layernorm_eps: 1e-6, dropout: 0.1 });
    const weights = randomWeights(config, 14, 0.7);
    const [a, b] = await Promise.all([RetNet.fromStateDict(config, weights), RetNet.fromStateDict(config, weights)]);
    const tokens = Int32Array.from(randomTokens(23, 2, 12, config.vocab_size).flat());
    const micro = [{ tokens, batch: 2, length: 12, targets: null, mask: null }];
    const opts: NativeTrainOptions = { mode: 'parallel', chunkSize: 4, lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.01, clipNorm: 1, noDecay: [], seed: 7 };
    for (let step = 0; step < 3; step++) {
      const kept = await a.native().trainStep(micro, opts);
      const recomputed = await b.native().trainStep(micro, { ...opts, checkpointActivations: true });
      expect(recomputed.loss).toBe(kept.loss);
      expect(recomputed.gradNorm).toBe(kept.gradNorm);
    }
    for (const [n, w] of a.stateDict()) expect(sameBits(b.stateDict().get(n)!, w)).toBe(true);
    a.dispose();
    b.dispose();
  });
});

describe('trainStep and optimizer state', () => {
  const config = smallConfig({ layernorm_eps: 1e-6, vocab_size: 16 });
  const opts: NativeTrainOptions = {
    mode: 'chunkwise',
    chunkSize: 4,
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.99,
    eps: 1e-8,
    weightDecay: 0.01,
    clipNorm: 1,
    noDecay: ['layer_norm.weight'],
    seed: 0,
  };
  // A learnable pattern: each row counts up modulo V from a random start.
  const micro = [0, 1].map((k) => {
    const rand = mulberry32(100 + k);
    const tokens = new Int32Array(2 * 12);
    for (let b = 0; b < 2; b++) {
      const s = Math.floor(rand() * 16);
      for (let t = 0; t < 12; t++) tokens[b * 12 + t] = (s + t) % 16;
    }
    return { tokens, batch: 2, length: 12, targets: null, mask: null };
  });

  test('loss falls over 30 steps; optimizer state round-trips and resumes bit-identically', async () => {
    const model = await RetNet.create(config, { seed: 4 });
    const native = model.native();
    const first = await native.trainStep(micro, opts);
    expect(first.tokens).toBe(48);
    expect(first.gradNorm).toBeGreaterThan(0);
    let last = first;
    for (let i = 1; i < 30; i++) last = await native.trainStep(micro, opts);
    console.log(`trainStep: loss ${first.loss.toFixed(4)} -> ${last.loss.toFixed(4)}`);
    expect(last.loss).toBeLessThan(first.loss * 0.7);

    // Resume: a copy of the weights plus the optimizer state continues exactly like the original.
    const state = await native.readOptimizerState();
    expect(state.step).toBe(30);
    // (Copies: arrays made by the addon belong to another realm than jest's Float32Array.)
    const weights = new Map([...model.stateDict()].map(([n, w]) => [n, Float32Array.from(w)]));
    const copy = await RetNet.fromStateDict(config, weights);
    await copy.native().setOptimizerState(state.step, state.m, state.v);
    const again = await copy.native().readOptimizerState();
    expect(again.step).toBe(30);
    expect(Buffer.from(again.m.buffer).equals(Buffer.from(state.m.buffer))).toBe(true);
    expect(Buffer.from(again.v.buffer).equals(Buffer.from(state.v.buffer))).toBe(true);
    const a = await native.trainStep(micro, opts);
    const b = await copy.native().trainStep(micro, opts);
    expect(b.loss).toBe(a.loss);
    expect(b.gradNorm).toBe(a.gradNorm);
    for (const [n, w] of model.stateDict()) expect(Buffer.from(copy.stateDict().get(n)!.buffer).equals(Buffer.from(w.buffer))).toBe(true);

    expect(() => copy.native().setOptimizerState(1, new Float32Array(3), state.v)).toThrow(/optimizer state must hold/);
    expect(() => copy.native().trainStep(micro, { ...opts, precision: 'fp8' as never })).toThrow(/precision must be 'fp32' or 'bf16'/);
    const badV = Float32Array.from(state.v);
    badV[0] = -1;
    await expect(copy.native().setOptimizerState(1, state.m, badV)).rejects.toThrow(/negative second moment/);
    model.dispose();
    copy.dispose();
  });

  test('bf16 products: the loss falls as it does with fp32 products, from the same weights', async () => {
    const [a, b] = await Promise.all([RetNet.create(config, { seed: 4 }), RetNet.create(config, { seed: 4 })]);
    const losses: Array<[number, number]> = [];
    for (let i = 0; i < 30; i++) {
      const fp32 = await a.native().trainStep(micro, opts);
      const bf16 = await b.native().trainStep(micro, { ...opts, precision: 'bf16' });
      losses.push([fp32.loss, bf16.loss]);
    }
    console.log(`trainStep fp32 / bf16: ${losses.filter((_, i) => i % 10 === 0 || i === 29).map(([x, y]) => `${x.toFixed(4)}/${y.toFixed(4)}`).join(' ')}`);
    expect(losses[29][1]).toBeLessThan(losses[0][1] * 0.7);
    for (const [fp32, bf16] of losses) expect(Math.abs(bf16 - fp32) / fp32).toBeLessThan(0.02);
    expect(losses[29][1]).not.toBe(losses[29][0]);
    a.dispose();
    b.dispose();
  });

  test('a training step excludes other calls on the model while it runs', async () => {
    const model = await RetNet.create(config, { seed: 5 });
    const native = model.native();
    // Large enough that the step is still running when the next statements execute.
    const big = Array.from({ length: 8 }, () => ({ tokens: new Int32Array(4 * 128).fill(3), batch: 4, length: 128, targets: null, mask: null }));
    const running = native.trainStep(big, opts);
    expect(() => native.setParam('layer_norm.weight', new Float32Array(12))).toThrow(/busy/);
    expect(() => native.getParam('layer_norm.weight')).toThrow(/busy/);
    expect(() => native.readParam('layer_norm.weight')).toThrow(/busy/);
    const forward = model.forward([[1, 2, 3]]);
    await expect(forward).rejects.toThrow(/busy/);
    await running;
    await expect(model.forward([[1, 2, 3]])).resolves.toBeDefined();
    model.dispose();
  });

  test('setParam checks names, sizes and values; getParam and readParam give them back', async () => {
    const model = await RetNet.create(config, { seed: 6 });
    const native = model.native();
    native.setParam('layer_norm.weight', new Float32Array(12).fill(2));
    expect(Array.from(native.getParam('layer_norm.weight'))).toEqual(new Array(12).fill(2));
    expect(Array.from(await native.readParam('layer_norm.weight'))).toEqual(new Array(12).fill(2));
    expect(() => native.readParam('nope')).toThrow(/unknown parameter nope/);
    expect(() => native.readParam(3 as never)).toThrow('parameter name must be a string');
    expect(() => native.setParam('nope', new Float32Array(12))).toThrow(/unknown parameter nope/);
    expect(() => native.setParam('layer_norm.weight', new Float32Array(5))).toThrow(/has 12 values, got 5/);
    expect(() => native.setParam('layer_norm.weight', new Float32Array(12).fill(NaN))).toThrow(/non-finite/);
    await expect(native.trainStep(micro, { ...opts, noDecay: ['nope'] })).rejects.toThrow(/unknown parameter nope/);
    model.dispose();
  });
});

test('repeated gradient calls on one model reuse their buffers without changing results', async () => {
  const f = loadFixture('swish_tied_embscale_s200_c23');
  const model = await RetNet.fromStateDict(f.config, f.weights);
  const short = f.tokens.map((row) => row.slice(0, 50));
  const first = await model.lossAndGradients(f.tokens, { mode: 'chunkwise', chunkSize: 23 });
  await model.lossAndGradients(short, { mode: 'parallel' }); // another shape in between
  const again = await model.lossAndGradients(f.tokens, { mode: 'chunkwise', chunkSize: 23 });
  const twice = await model.lossAndGradients(f.tokens, { mode: 'chunkwise', chunkSize: 23 });
  expect(again.loss).toBe(first.loss);
  expect(twice.loss).toBe(first.loss);
  for (const [name, g] of first.grads) {
    expect(maxAbsDiff(again.grads.get(name)!, g)).toBe(0);
    expect(maxAbsDiff(twice.grads.get(name)!, g)).toBe(0);
  }
  model.dispose();
});

describe('large vocabulary', () => {
  // The cross-entropy's vectorized exp over thousands of logits per row, against float64.
  test('loss and gradients of a 5000-token vocabulary match the float64 reference', async () => {
    const config = smallConfig({ vocab_size: 5000, decoder_layers: 1 });
    const weights = randomWeights(config, 14, 0.7);
    const tokens = randomTokens(15, 2, 7, config.vocab_size);
    const model = await RetNet.fromStateDict(config, weights);
    const { loss, grads } = await model.lossAndGradients(tokens, { mode: 'parallel' });
    model.dispose();
    const ref = refLossAndGrads(config, weights, tokens, 'parallel');
    expect(Math.abs(loss - ref.loss)).toBeLessThan(1e-5 * ref.loss);
    let worst = 0;
    for (const [name, g] of grads) worst = Math.max(worst, maxAbsDiff(g, ref.grads.get(name)!) / Math.max(maxAbs(ref.grads.get(name)!), 1e-30));
    expect(worst).toBeLessThan(1e-4);
  });

  // The trainer's output head runs in blocks of at most 64 MiB of logits: 239 rows at 70000
  // logits per row, and whole 256s where that is 256 or more (512 rows at 32000). So 2 x 150
  // and 2 x 300 rows take two blocks, the first ending inside the second sequence. Each
  // sequence alone fits one block: the batch must equal their average.
  test.each([
    [70000, 150],
    [32000, 300],
  ])('the output head in row blocks gives the loss and gradients of whole-batch rows (vocabulary %d, 2 x %d rows)', async (vocab, length) => {
    const config = smallConfig({ vocab_size: vocab, decoder_embed_dim: 4, decoder_value_embed_dim: 4, decoder_retention_heads: 1, decoder_ffn_embed_dim: 4, decoder_layers: 1 });
    const model = await RetNet.fromStateDict(config, randomWeights(config, 12, 0.7));
    const tokens = randomTokens(13, 2, length, config.vocab_size);
    const both = await model.lossAndGradients(tokens, { mode: 'parallel' });
    const first = await model.lossAndGradients([tokens[0]], { mode: 'parallel' });
    const second = await model.lossAndGradients([tokens[1]], { mode: 'parallel' });
    model.dispose();
    expect(Math.abs(both.loss - (first.loss + second.loss) / 2)).toBeLessThan(1e-6 * both.loss);
    let worst = 0;
    for (const [name, g] of both.grads) {
      const a = first.grads.get(name)!;
      const b = second.grads.get(name)!;
      const mean = Float32Array.from(a, (x, i) => (x + b[i]) / 2);
      worst = Math.max(worst, maxAbsDiff(g, mean) / Math.max(maxAbs(mean), 1e-30));
    }
    expect(worst).toBeLessThan(1e-5);
  });
});

// Buffers of several MiB, so the gradient arena and the activations really hand whole 2 MiB
// pages back between uses (small ones are only zeroed).
describe('memory handed back between steps', () => {
  const config = smallConfig({ layernorm_eps: 1e-6, vocab_size: 1024, decoder_embed_dim: 256, decoder_value_embed_dim: 256, decoder_retention_heads: 2, decoder_ffn_embed_dim: 256, decoder_layers: 2 });
  const tokens = Int32Array.from({ length: 2 * 2048 }, (_, i) => (i * 7919) % config.vocab_size);
  const micro = [{ tokens, batch: 2, length: 2048, targets: null, mask: null }];
  const rows = [0, 1].map((b) => Array.from(tokens.subarray(b * 2048, (b + 1) * 2048)));
  const opts: NativeTrainOptions = { mode: 'chunkwise', chunkSize: 64, lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.01, clipNorm: 1, noDecay: [], seed: 1 };

  test('after training steps, gradients start from zero and activations are made anew', async () => {
    const model = await RetNet.create(config, { seed: 3 });
    await model.native().trainStep(micro, opts);
    await model.native().trainStep(micro, { ...opts, checkpointActivations: true });
    const fresh = await RetNet.fromStateDict(config, new Map([...model.stateDict()].map(([n, w]) => [n, Float32Array.from(w)])));
    const trained = await model.lossAndGradients(rows, { mode: 'chunkwise', chunkSize: 64 });
    const first = await fresh.lossAndGradients(rows, { mode: 'chunkwise', chunkSize: 64 });
    expect(trained.loss).toBe(first.loss);
    for (const [name, g] of first.grads) {
      expect(maxAbs(g)).toBeGreaterThan(0);
      expect({ name, diff: maxAbsDiff(trained.grads.get(name)!, g) }).toEqual({ name, diff: 0 });
    }
    model.dispose();
    fresh.dispose();
  });

  test('discardMemory zeroes exactly the array it is given', () => {
    const whole = new Float32Array(3 << 20).fill(1); // 12 MiB
    const inner = whole.subarray(1001, whole.length - 999);
    addon().discardMemory(inner);
    expect(whole[1000]).toBe(1);
    expect(whole[whole.length - 999]).toBe(1);
    expect(inner.every((x) => x === 0)).toBe(true);
    const small = new Float32Array(100).fill(2);
    addon().discardMemory(small);
    expect(small.every((x) => x === 0)).toBe(true);
    expect(() => addon().discardMemory(new Float64Array(4) as unknown as Float32Array)).toThrow(/one Float32Array/);
  });
});
