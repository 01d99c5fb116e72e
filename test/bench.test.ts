// Smoke run of the benchmark CLI on a tiny preset: it runs, and its JSON has the promised fields.
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { checkOutputPath, decodeStepBytes, parseBenchArgs } from '../scripts/bench';
import { resolveConfig } from '../lib/config';
import { addon } from '../lib/native';

test('bench decode+train on the tiny preset writes the JSON report', () => {
  const script = path.join(__dirname, '..', 'dist', 'scripts', 'bench.js');
  const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-bench-')), 'bench.json');
  execFileSync(process.execPath, [script, 'all', '--preset', 'tiny', '--batch', '1,2', '--context', '16,24', '--train-shapes', '1x32', '--checkpointing', 'off,on', '--precision', 'fp32,bf16', '--steps', '2', '--chunk-size', '8', '--json', out], {
    stdio: 'ignore',
  });
  const report = JSON.parse(fs.readFileSync(out, 'utf8'));
  expect(report.memoryBandwidthGBps).toBeGreaterThan(0);
  expect(report.decode).toHaveLength(4);
  expect(report.contexts).toHaveLength(1);
  expect(report.contexts[0]).toMatchObject({ preset: 'tiny', weights: 'f32', shortContext: 16, longContext: 24 });
  expect(report.contexts[0].longOverShort).toBeGreaterThan(0);
  expect(report.turns.map((f: { context: number; promptTokens: number }) => [f.context, f.promptTokens])).toEqual([
    [16, 1],
    [16, 4],
    [16, 16],
    [16, 64],
  ]);
  for (const f of report.turns) expect(f.msToLogits).toBeGreaterThan(0);
  expect(report.runs.map((f: { batch: number; context: number }) => [f.batch, f.context])).toEqual([
    [1, 16],
    [2, 16],
  ]);
  for (const f of report.runs) {
    for (const key of ['callMsPerStep', 'runMsPerStep', 'runOverCall', 'bandwidthGBps', 'callRooflineFraction', 'runRooflineFraction']) expect(f[key]).toBeGreaterThan(0);
  }
  expect(report.generate.map((f: { concurrency: number; maxTokens: number }) => [f.concurrency, f.maxTokens])).toEqual([
    [1, 2],
    [2, 2],
  ]);
  for (const f of report.generate) {
    expect(f.tokensPerSecond).toBeGreaterThan(0);
    expect(f.stepsTokensPerSecond).toBeGreaterThan(0);
    expect(f.againstSteps).toBeGreaterThan(0);
  }
  expect(report.sampling.length).toBeGreaterThan(0);
  for (const f of report.sampling) expect(f.msPerToken).toBeGreaterThan(0);
  for (const f of report.decode) {
    for (const key of ['preset', 'weights', 'batch', 'context', 'prefillTokensPerSecond', 'tokensPerSecond', 'msPerToken', 'bandwidthGBps', 'rooflineFraction', 'peakRssBytes']) {
      expect(f).toHaveProperty(key);
    }
    expect(f.tokensPerSecond).toBeGreaterThan(0);
    expect(f.bandwidthGBps).toBeGreaterThan(0);
  }
  expect(report.train.map((f: { mode: string; precision: string; checkpointActivations: boolean }) => `${f.mode} ${f.precision} ${f.checkpointActivations}`)).toEqual([
    'parallel fp32 false',
    'parallel fp32 true',
    'parallel bf16 false',
    'parallel bf16 true',
    'chunkwise fp32 false',
    'chunkwise fp32 true',
    'chunkwise bf16 false',
    'chunkwise bf16 true',
  ]);
  for (const f of report.train) expect(f.tokensPerSecond).toBeGreaterThan(0);
  expect(report.kernels.length).toBeGreaterThan(0);
});

test('decode step bytes count weights once and state per row', () => {
  const c = resolveConfig({ vocab_size: 10, decoder_embed_dim: 4, decoder_value_embed_dim: 4, decoder_retention_heads: 2, decoder_ffn_embed_dim: 4, decoder_layers: 1 });
  // layer: 2*16 + 3*16 + 3*16 + 2*4 = 136; output 40; final norm 4; state 2 heads * 2 * 2 = 8 per row (read + write).
  expect(decodeStepBytes(c, 1)).toBe(4 * (136 + 40 + 4 + 4 + 2 * 8));
  expect(decodeStepBytes(c, 3) - decodeStepBytes(c, 1)).toBe(4 * 2 * (4 + 2 * 8));
  expect(() => parseBenchArgs(['--batch', '0'])).toThrow(/takes comma-separated integers in \[1, 4096\]/);
  expect(() => parseBenchArgs(['--context', '2000000000'])).toThrow(/--context takes comma-separated integers in \[1, 1048576\]/);
  expect(() => parseBenchArgs(['--preset', 'huge'])).toThrow(/unknown preset/);
  for (const inherited of ['toString', 'constructor', '__proto__']) expect(() => parseBenchArgs(['--preset', inherited])).toThrow(/unknown preset/);
  // Checked before the run, not when its files are written at the end.
  expect(() => checkOutputPath(os.tmpdir(), '--json')).toThrow(`--json: ${os.tmpdir()} is a directory; give a file name`);
  expect(() => parseBenchArgs(['--train-modes', 'recurrent'])).toThrow(/unknown mode recurrent/);
  expect(() => parseBenchArgs(['--checkpointing', 'yes'])).toThrow(/yes is not off or on/);
  expect(() => parseBenchArgs(['--precision', 'fp16'])).toThrow(/unknown precision fp16/);
  expect(parseBenchArgs(['decode', '--help']).help).toBe(true);
  expect(parseBenchArgs(['-h']).help).toBe(true);
  expect(parseBenchArgs(['decode']).help).toBeUndefined();
});

test('the decode-product kernel bench times linear_rowwise and rejects empty shapes', async () => {
  const native = addon();
  expect(() => native.benchKernel('decode_product', { M: 0, N: 8, K: 8, reps: 1 })).toThrow(/M must be >= 1/);
  const seconds = await native.benchKernel('decode_product', { M: 2, N: 8, K: 8, reps: 1 });
  expect(seconds).toBeGreaterThan(0);
});
