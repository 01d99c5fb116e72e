// Compact decode weights (bf16, int8): close to fp32, still batch-invariant, never trained.
import { RetNet } from '../lib';
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

test.each([
  ['bf16', 2e-2],
  ['int8', 6e-2],
] as const)('%s decode logits stay close to fp32 and differ from it', async (format, tolerance) => {
  const f32 = await RetNet.fromStateDict(config, weights);
  const compact = await RetNet.fromStateDict(config, weights, { weights: format });
  expect(compact.weights).toBe(format);
  const a = await decodeLogits(f32);
  const b = await decodeLogits(compact);
  for (let i = 0; i < a.length; i++) {
    const rel = maxAbsDiff(a[i], b[i]) / maxAbs(a[i]);
    expect(rel).toBeLessThan(tolerance);
    expect(rel).toBeGreaterThan(0); // the compact copy is really what the step reads
  }
  // Full-sequence forward keeps the fp32 weights.
  const fa = await f32.forward([prompt]);
  const fb = await compact.forward([prompt]);
  expect(maxAbsDiff(fa.logits, fb.logits)).toBe(0);
  f32.dispose();
  compact.dispose();
});

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
  const native = model.native();
  const rows = 11;
  const states = Array.from({ length: rows }, () => native.createState(1));
  const alone = native.createState(1);
  for (const s of [...states, alone]) await native.prefill(s, Int32Array.from(prompt), prompt.length, 'chunkwise', 8);
  const batched = await native.stepBatch(states, new Int32Array(rows).fill(7));
  const single = Array.from(await native.step(alone, Int32Array.from([7])));
  for (let r = 0; r < rows; r++) expect(Array.from(batched.subarray(r * 300, (r + 1) * 300))).toEqual(single);
  for (const s of [...states, alone]) s.dispose();
  model.dispose();
});

test('a model with compact decode weights cannot be trained; bad formats are errors', async () => {
  const model = await RetNet.fromStateDict(config, weights, { weights: 'bf16' });
  const opts = { mode: 'parallel' as const, chunkSize: 8, lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0, clipNorm: 0, noDecay: [], seed: 0 };
  expect(() => model.native().trainStep([{ tokens: Int32Array.from(prompt), batch: 1, length: prompt.length, targets: null, mask: null }], opts)).toThrow(
    /fp32 weights/,
  );
  await expect(RetNet.fromStateDict(config, weights, { weights: 'fp8' as 'int8' })).rejects.toThrow(/weights must be/);
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
