// Compact weights (bf16, int8) and fp32 panels: close to fp32, the same function in every form, still
// batch-invariant, no fp32 copy kept, never trained or saved.
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { RetNet, Trainer } from '../lib';
import { maxAbs, maxAbsDiff } from './helpers/fixtures';
import { mulberry32, randomWeights } from './reference/retnet_ref';
import { resolveConfig } from '../lib/config';

const config = resolveConfig({
  vocab_size: 300,
  decoder_embed_dim: 64,
  decoder_value_embed_dim: 96,
  decoder_retention_heads: 2,
  decoder_ffn_embed_dim: 80,
  decoder_layers: 2,
  activation_fn: 'swish',
});
const weights = randomWeights(config, 3);
const rand = mulberry32(9);
const prompt = Array.from({ length: 20 }, () => Math.floor(rand() * 300));
const next = Array.from({ length: 6 }, () => Math.floor(rand() * 300));

async function decodeLogits(model: RetNet): Promise<Float32Array[]> {
  const session = model.createSession();
  await session.prefill([prompt]);
  const out: Float32Array[] = [];
  for (const id of next) out.push((await session.step([id])).logits);
  session.dispose();
  return out;
}

// A tied output head is the embedding: its compact copy serves the logits, its fp32 rows the
// embedding lookup (dropping them would zero every input).
const tiedConfig = resolveConfig({ ...config, share_decoder_input_output_embed: true });
const tiedWeights = randomWeights(tiedConfig, 6);
test.each([
  ['bf16', 'untied', 2e-2],
  ['int8', 'untied', 6e-2],
  ['bf16', 'tied', 2e-2],
  ['int8', 'tied', 6e-2],
] as const)('%s decode logits stay close to fp32 and differ from it (%s output head)', async (format, head, tolerance) => {
  const [cfg, w] = head === 'tied' ? [tiedConfig, tiedWeights] : [config, weights];
  const f32 = await RetNet.fromStateDict(cfg, w);
  const compact = await RetNet.fromStateDict(cfg, w, { weights: format });
  expect(compact.weights).toBe(format);
  const a = await decodeLogits(f32);
  const b = await decodeLogits(compact);
  for (let i = 0; i < a.length; i++) {
    const rel = maxAbsDiff(a[i], b[i]) / maxAbs(a[i]);
    expect(rel).toBeLessThan(tolerance);
    expect(rel).toBeGreaterThan(0); // the compact copy is really what the step reads
  }
  // A full-sequence forward reads the compact weights too.
  const fa = await f32.forward([prompt]);
  const fb = await compact.forward([prompt]);
  const rel = maxAbsDiff(fa.logits, fb.logits) / maxAbs(fa.logits);
  expect(rel).toBeLessThan(tolerance);
  expect(rel).toBeGreaterThan(0);
  f32.dispose();
  compact.dispose();
});

// One set of weights, three forms: the compact model's parallel and chunkwise forwards, and
// its prefills of every length (each product path: dot products up to 256 rows, the packed
// path past that), agree with its own recurrent steps: an fp32 weight read anywhere would
// show (against the fp32 model the gap is 1e-2). Both formats round the activations in every
// form, int8 to a 16-bit grid (2^-15 of the row's largest value; quant.h), bf16 to bf16 where
// the CPU has its dot product, and there a 1e-6 difference between forms now and then moves
// an activation by one step: up to 2.5e-4 of the largest logit for int8 (three seeds, every
// position), 1e-3 for bf16 (6e-3 against the fp32 model).
// A feed-forward width of 600 gives fc2 products several K blocks.
const wideConfig = resolveConfig({ ...config, decoder_ffn_embed_dim: 600 });
const long = Array.from({ length: 300 }, () => Math.floor(rand() * 300));
test.each([
  ['bf16', 5e-3],
  ['int8', 5e-4],
] as const)('%s: every form computes the same function', async (format, tolerance) => {
  const model = await RetNet.fromStateDict(wideConfig, randomWeights(wideConfig, 5), { weights: format });
  const V = config.vocab_size;
  const steps = model.createSession();
  const stepped: Float32Array[] = [];
  for (const id of long) stepped.push((await steps.step([id])).logits);
  steps.dispose();
  const scale = maxAbs(stepped[stepped.length - 1]);
  for (const mode of ['parallel', 'chunkwise'] as const) {
    const { logits } = await model.forward([long], { mode, chunkSize: 16 });
    for (const t of [0, 3, 4, 10, 63, 64, 255, 256, 299]) {
      expect(maxAbsDiff(logits.subarray(t * V, (t + 1) * V), stepped[t]) / scale).toBeLessThan(tolerance);
    }
  }
  for (const length of [1, 4, 5, 30, 64, 65, 256, 257, 300]) {
    const session = model.createSession();
    const { logits } = await session.prefill([long.slice(0, length)], { mode: 'chunkwise', chunkSize: 16 });
    expect(maxAbsDiff(logits, stepped[length - 1]) / scale).toBeLessThan(tolerance);
    session.dispose();
  }
  model.dispose();
});

test.each(['bf16', 'int8'] as const)('%s: the model keeps only the compact weights, and stateDict gives them back', async (format) => {
  const model = await RetNet.fromStateDict(config, weights, { weights: format });
  const dict = model.stateDict();
  for (const name of ['layers.0.retention.q_proj.weight', 'layers.1.ffn.fc2.weight', 'output_projection.weight']) {
    const original = weights.get(name)!;
    const held = dict.get(name)!;
    expect(held.length).toBe(original.length);
    expect(maxAbsDiff(held, original)).toBeGreaterThan(0);
    const K = name.endsWith('fc2.weight') ? config.decoder_ffn_embed_dim : config.decoder_embed_dim;
    for (let row = 0; row < original.length / K; row++) {
      const values = held.subarray(row * K, (row + 1) * K);
      if (format === 'bf16') {
        // Every value is a bf16 number: its low 16 bits are zero.
        const bits = new Uint32Array(Float32Array.from(values).buffer);
        expect(bits.every((b) => (b & 0xffff) === 0)).toBe(true);
      } else {
        // Every value is an integer in [-127, 127] times the row's scale, max |w| / 127.
        const scale = maxAbs(original.subarray(row * K, (row + 1) * K)) / 127;
        const worst = values.reduce((m, v) => Math.max(m, Math.abs(v / scale - Math.round(v / scale))), 0);
        expect(worst).toBeLessThan(1e-3);
      }
    }
  }
  // The norms and the embedding stay fp32.
  for (const name of ['embed_tokens.weight', 'layers.0.retention_layer_norm.weight']) {
    expect(maxAbsDiff(dict.get(name)!, weights.get(name)!)).toBe(0);
  }
  model.dispose();
});

/** Steps 11 states of `model`, prefilled alike, in one batch and one alone: the same bits. */
async function expectBatchInvariantStep(model: RetNet): Promise<void> {
  const native = model.native();
  const rows = 11;
  const states = Array.from({ length: rows }, () => native.createState(1));
  const alone = native.createState(1);
  for (const s of [...states, alone]) await native.prefill(s, Int32Array.from(prompt), prompt.length, 'chunkwise', 8);
  const batched = await native.stepBatch(states, new Int32Array(rows).fill(7));
  const single = Array.from(await native.step(alone, Int32Array.from([7])));
  const V = model.config.vocab_size;
  for (let r = 0; r < rows; r++) expect(Array.from(batched.subarray(r * V, (r + 1) * V))).toEqual(single);
  for (const s of [...states, alone]) s.dispose();
}

// 11 rows: with AVX-512, blocks of 4 weight rows by 6 and 5 activation rows, and the single
// weight rows left of a 300-row output; with AVX2, 4-row passes and a tail. The second config's
// widths are not multiples of 16, so every sum also has a scalar tail.
const oddConfig = resolveConfig({ ...config, decoder_embed_dim: 40, decoder_value_embed_dim: 56, decoder_ffn_embed_dim: 88 });
test.each([
  ['bf16', 'widths in 16s', config],
  ['int8', 'widths in 16s', config],
  ['bf16', 'odd widths', oddConfig],
  ['int8', 'odd widths', oddConfig],
] as const)('%s decode is batch-invariant too (%s)', async (format, _widths, cfg) => {
  const model = await RetNet.fromStateDict(cfg, cfg === config ? weights : randomWeights(cfg, 4), { weights: format });
  await expectBatchInvariantStep(model);
  model.dispose();
});

test('a model with compact weights cannot be trained or saved, stores what is set in its format; bad formats are errors', async () => {
  const model = await RetNet.fromStateDict(config, weights, { weights: 'bf16' });
  const opts = { mode: 'parallel' as const, chunkSize: 8, lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0, clipNorm: 0, noDecay: [], seed: 0 };
  expect(() => model.native().trainStep([{ tokens: Int32Array.from(prompt), batch: 1, length: prompt.length, targets: null, mask: null }], opts)).toThrow(
    /fp32 weights/,
  );
  await expect(model.lossAndGradients([prompt])).rejects.toThrow(/lossAndGradients needs a model with fp32 weights/);
  const q = Float32Array.from({ length: 64 * 64 }, () => rand() - 0.5);
  model.native().setParam('layers.0.retention.q_proj.weight', q);
  const held = model.native().getParam('layers.0.retention.q_proj.weight');
  const rounded = new Float32Array(new Uint32Array(Float32Array.from(q).buffer).map((b) => (b + 0x7fff + ((b >>> 16) & 1)) & 0xffff0000).buffer);
  expect(Array.from(held)).toEqual(Array.from(rounded));
  await expect(model.save('/nonexistent/never-written')).rejects.toThrow(/holds bf16 weights.*load it with weights 'f32' to save/);
  await expect(model.native().setWeightFormat('int8')).rejects.toThrow(/already compact/);
  await expect(RetNet.fromStateDict(config, weights, { weights: 'fp8' as 'int8' })).rejects.toThrow(/weights must be/);
  // A finite weight bf16 cannot hold is an error naming it, not an infinity that turns logits to NaN.
  const huge = new Map(weights);
  const fc2 = Float32Array.from(weights.get('layers.0.ffn.fc2.weight')!);
  fc2[5] = 3.4028234663852886e38;
  huge.set('layers.0.ffn.fc2.weight', fc2);
  await expect(RetNet.fromStateDict(config, huge, { weights: 'bf16' })).rejects.toThrow(
    /parameter layers\.0\.ffn\.fc2\.weight: value 3\.40282347e\+38 at index 5 is beyond bf16's range/,
  );
  expect(() => model.native().setParam('layers.0.ffn.fc2.weight', fc2)).toThrow(/beyond bf16's range/);
  // Refused in its last value, new values leave the weight held as it was.
  const held2 = model.native().getParam('layers.0.ffn.fc2.weight');
  const fresh = Float32Array.from(fc2, () => rand() - 0.5);
  fresh[fresh.length - 1] = 3.4028234663852886e38;
  expect(() => model.native().setParam('layers.0.ffn.fc2.weight', fresh)).toThrow(/beyond bf16's range/);
  expect(Array.from(model.native().getParam('layers.0.ffn.fc2.weight'))).toEqual(Array.from(held2));
  fc2[5] = 3.38e38; // still a finite bf16
  await RetNet.fromStateDict(config, huge, { weights: 'bf16' }).then((m) => m.dispose());
  model.dispose();
});

test('int8: a projection set later is stored in int8 with its new row scales', async () => {
  const model = await RetNet.fromStateDict(config, weights, { weights: 'int8' });
  const q = Float32Array.from({ length: 64 * 64 }, () => rand() - 0.5);
  model.native().setParam('layers.0.retention.q_proj.weight', q);
  const held = model.native().getParam('layers.0.retention.q_proj.weight');
  for (let row = 0; row < 64; row++) {
    const values = q.subarray(row * 64, (row + 1) * 64);
    const scale = maxAbs(values) / 127;
    for (let k = 0; k < 64; k++) expect(held[row * 64 + k]).toBeCloseTo(Math.round(values[k] / scale) * scale, 6);
  }
  model.dispose();
});

test('weights-loss: the recurrent loss equals the parallel forward cross-entropy (f32), and compact formats stay close', async () => {
  const { recurrentLoss, spreadWindows } = await import('../scripts/weights-loss');
  const stream = Int32Array.from({ length: 400 }, () => Math.floor(rand() * 300));
  const windows = spreadWindows(stream, 3, 17);
  expect(windows.map((w) => w[0])).toEqual([stream[0], stream[191], stream[383]]);
  const f32 = await RetNet.fromStateDict(config, weights);
  const { logits } = await f32.forward(windows.map((w) => Array.from(w)), { mode: 'parallel' });
  const V = config.vocab_size;
  let expected = 0;
  windows.forEach((w, b) => {
    for (let t = 0; t + 1 < w.length; t++) {
      const row = logits.subarray((b * w.length + t) * V, (b * w.length + t + 1) * V);
      const max = row.reduce((m, x) => Math.max(m, x), -Infinity);
      const lse = max + Math.log(row.reduce((s, x) => s + Math.exp(x - max), 0));
      expected += lse - row[w[t + 1]];
    }
  });
  expected /= 3 * 16;
  const loss = await recurrentLoss(f32, windows);
  expect(Math.abs(loss - expected)).toBeLessThan(1e-5 * expected);
  for (const format of ['bf16', 'int8'] as const) {
    const compact = await RetNet.fromStateDict(config, weights, { weights: format });
    const compactLoss = await recurrentLoss(compact, windows);
    expect(compactLoss).not.toBe(loss);
    expect(Math.abs(compactLoss - loss)).toBeLessThan(2e-2 * loss);
    compact.dispose();
  }
  await expect(recurrentLoss(f32, [windows[0], windows[1].subarray(1)])).rejects.toThrow('same length');
  expect(() => spreadWindows(stream, 2, 500)).toThrow('fewer than one window');
  f32.dispose();
});

// fp32 weights, which the CPU keeps in panels of 64 output rows. Its decode products sum each
// output in k order (test/panels.test.ts): batch-invariant on every kernel set, and every form
// computes the same function; the weights go in and come back exact, and it trains.
describe('fp32 weights in panels', () => {
  test.each([
    ['untied', config, weights],
    ['tied', tiedConfig, tiedWeights],
    ['odd widths', oddConfig, randomWeights(oddConfig, 4)],
  ] as const)('decode batched or alone bit for bit, every form the same function (%s)', async (_name, cfg, w) => {
    const model = await RetNet.fromStateDict(cfg, w);
    expect(model.weights).toBe('f32');
    await expectBatchInvariantStep(model);
    const { logits } = await model.forward([prompt], { mode: 'chunkwise', chunkSize: 8 });
    const last = logits.subarray((prompt.length - 1) * 300);
    const session = model.createSession();
    const stepped = (await session.prefill([prompt])).logits;
    expect(maxAbsDiff(last, stepped) / maxAbs(stepped)).toBeLessThan(1e-5);
    session.dispose();
    model.dispose();
  });

  test('the weights go in and out in rows, exactly; the optimizer moments come out in rows', async () => {
    const model = await RetNet.fromStateDict(oddConfig, randomWeights(oddConfig, 5));
    const held = model.stateDict();
    const name = 'layers.0.ffn.fc1.weight';
    // [88, 40]: a full panel of 64 rows and a partial one of 24.
    const fc1 = Float32Array.from({ length: held.get(name)!.length }, (_, i) => (i % 97) / 97 - 0.5);
    model.native().setParam(name, fc1);
    expect(Array.from(model.native().getParam(name))).toEqual(Array.from(fc1));
    // After AdamW's first step from zero moments, m = (1 - beta1) g: the moments come out in the
    // gradients' layout, which lossAndGradients gives by name in rows.
    const tokens = [prompt.slice(0, 12)];
    const { grads } = await model.lossAndGradients(tokens);
    const trainer = new Trainer(model, { lr: 1e-3, totalSteps: 1, clipNorm: 0, beta1: 0.5 });
    await trainer.step(tokens);
    const { m } = await trainer.optimizerState();
    let offset = 0; // the moments are flat, parameter after parameter in the native order
    for (const n of model.native().paramNames()) {
      if (n === name) break;
      offset += model.native().getParam(n).length;
    }
    const g = grads.get(name)!;
    const moment = m.subarray(offset, offset + g.length);
    expect(maxAbsDiff(moment.map((v) => v * 2), g) / maxAbs(g)).toBeLessThan(1e-6);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-panels-'));
    try {
      await model.save(dir);
      const loaded = await RetNet.load(dir);
      for (const [n, value] of loaded.stateDict()) expect(maxAbsDiff(value, model.stateDict().get(n)!)).toBe(0);
      loaded.dispose();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    model.dispose();
  });

  test('converting a model whose weight bf16 cannot hold changes nothing', async () => {
    const w = randomWeights(config, 7);
    const fc2 = Float32Array.from(w.get('layers.1.ffn.fc2.weight')!);
    fc2[fc2.length - 1] = 3.4028234663852886e38;
    w.set('layers.1.ffn.fc2.weight', fc2);
    const model = await RetNet.fromStateDict(config, w);
    const before = await model.forward([prompt], { mode: 'parallel' });
    await expect(model.native().setWeightFormat('bf16')).rejects.toThrow(
      /parameter layers\.1\.ffn\.fc2\.weight: value 3\.40282347e\+38 at index \d+ is beyond bf16's range/,
    );
    // Still the fp32 model, every weight as it was, and still convertible to int8.
    const after = await model.forward([prompt], { mode: 'parallel' });
    expect(Array.from(after.logits)).toEqual(Array.from(before.logits));
    expect(Array.from(model.native().getParam('layers.0.retention.q_proj.weight'))).toEqual(Array.from(w.get('layers.0.retention.q_proj.weight')!));
    await model.native().setWeightFormat('int8');
    model.dispose();
  });

  test('converting a model that holds weights to bf16 reads the panels as rows', async () => {
    const w = randomWeights(oddConfig, 6);
    const model = await RetNet.fromStateDict(oddConfig, w);
    await model.native().setWeightFormat('bf16');
    const toBf16 = (a: Float32Array) =>
      new Float32Array(new Uint32Array(Float32Array.from(a).buffer).map((b) => (b + 0x7fff + ((b >>> 16) & 1)) & 0xffff0000).buffer);
    for (const name of ['layers.0.ffn.fc1.weight', 'layers.1.retention.out_proj.weight', 'output_projection.weight']) {
      expect(Array.from(model.native().getParam(name))).toEqual(Array.from(toBf16(w.get(name)!)));
    }
    model.dispose();
  });
});
