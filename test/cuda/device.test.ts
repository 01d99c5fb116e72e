// Device selection: 'cuda' fails clearly when it cannot run, 'auto' falls back to the CPU.
import { execFileSync } from 'child_process';
import * as path from 'path';

import { buildInfo } from '../../lib/info';
import { RetNet } from '../../lib/model';

const config = {
  vocab_size: 32,
  decoder_embed_dim: 16,
  decoder_value_embed_dim: 16,
  decoder_retention_heads: 2,
  decoder_ffn_embed_dim: 16,
  decoder_layers: 1,
};
const info = buildInfo();
const usable = info.cuda && info.cudaDevices > 0;

test('buildInfo reports whether CUDA was compiled in and how many devices it sees', () => {
  expect(typeof info.cuda).toBe('boolean');
  expect(Number.isInteger(info.cudaDevices) && info.cudaDevices >= 0).toBe(true);
  if (!info.cuda) expect(info.cudaDevices).toBe(0);
});

test('buildInfo names the GEMM of CUDA full-sequence products (cuBLAS when it loads, else the own kernel)', () => {
  if (!info.cuda) {
    expect(info.cudaGemm).toBe('');
    return;
  }
  expect(info.cudaGemm).toMatch(/^(cublas|own) \(.+\)$/);
  // The addon reads RETNET_CUDA_GEMM from the real environment, which jest's process.env does not
  // change: ask a child process.
  const addonPath = path.join(__dirname, '..', '..', 'build', 'Release', 'retnet.node');
  const cudaGemmWith = (value: string): string =>
    execFileSync(process.execPath, ['-e', `console.log(require(${JSON.stringify(addonPath)}).buildInfo().cudaGemm)`], {
      env: { ...process.env, RETNET_CUDA_GEMM: value },
      encoding: 'utf8',
    }).trim();
  expect(cudaGemmWith('own')).toBe('own (RETNET_CUDA_GEMM=own)');
  expect(cudaGemmWith('fast')).toBe("error: RETNET_CUDA_GEMM must be 'own' or 'cublas', got 'fast'");
});

(usable ? test.skip : test)("device 'cuda' without a usable device rejects with the reason", async () => {
  const expected = info.cuda ? /^no CUDA device: .+/ : /^retnet was built without CUDA$/;
  await expect(RetNet.create(config, { device: 'cuda' })).rejects.toThrow(expected);
});

(usable ? test.skip : test)("device 'auto' without a usable device runs on the CPU with one notice", async () => {
  const warn = jest.spyOn(console, 'warn').mockImplementation(() => undefined);
  try {
    const models = [await RetNet.create(config, { device: 'auto' }), await RetNet.create(config, { device: 'auto' })];
    const { logits } = await models[0].forward([[1, 2, 3]]);
    expect(logits.length).toBe(3 * config.vocab_size);
    expect(warn).toHaveBeenCalledTimes(1);
    expect(String(warn.mock.calls[0][0])).toMatch(/CPU/);
    models.forEach((m) => m.dispose());
  } finally {
    warn.mockRestore();
  }
});

test('an unknown device is rejected', async () => {
  await expect(RetNet.create(config, { device: 'tpu' as never })).rejects.toThrow(/device must be 'cpu', 'cuda' or 'auto'/);
});

(usable ? test : test.skip)("compact weights are CPU-only: device 'cuda' rejects them", async () => {
  await expect(RetNet.create(config, { device: 'cuda', weights: 'bf16' })).rejects.toThrow(
    /weights 'bf16' and 'int8' run on the CPU only; this model is on cuda/,
  );
});

(usable ? test : test.skip)("bf16 products are CPU-only: a CUDA model's training pass rejects them", async () => {
  const model = await RetNet.create(config, { device: 'cuda' });
  try {
    const tokens = [[1, 2, 3, 4]];
    await expect(model.lossAndGradients(tokens, { precision: 'bf16' })).rejects.toThrow(/precision 'bf16' trains on the CPU only; this model is on cuda/);
    const { loss } = await model.lossAndGradients(tokens);
    expect(Number.isFinite(loss)).toBe(true);
  } finally {
    model.dispose();
  }
});
