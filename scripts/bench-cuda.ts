// `npm run bench:cuda`: tokens/s of forward, prefill, decode and training on the CUDA backend,
// for a randomly initialised model. Best of a few timed runs after one warm-up. On CUDA it runs
// once per GEMM of the full-sequence products: the own kernel and, when it loads, cuBLAS
// (RETNET_CUDA_GEMM=own|cublas set beforehand benches that one only). Decode always runs the
// own batch-invariant kernel, so its rows measure the same code in both runs.
// The last column is what the row achieved: decode, the bytes a step must move
// (decodeStepBytes: weights, embedding rows, state read and written) per second; the others,
// the FLOPs of their matrix products (2 per weight per token, 6 for a training step;
// retention's own work not counted) per second.
//   node dist/scripts/bench-cuda.js [--device cpu] [--small]
import { type RetNetConfig } from '../lib/config';
import { buildInfo } from '../lib/info';
import { RetNet } from '../lib/model';
import { NativeModel, NativeState } from '../lib/native';
import { decodeStepBytes, stepWeightCount } from './bench';

/** Bytes a timed run must move (decode) or FLOPs of its matrix products (the rest). */
type Work = { bytes: number } | { flops: number };

/** One benchmarked operation: `run` does it once; a timing covers `repeat` runs in a row. */
export interface BenchOperation {
  /** Short name, as `cuda-profile.js` takes it. */
  id: string;
  name: string;
  shape: string;
  repeat: number;
  /** Tokens and work of one run. */
  tokens: number;
  work: Work;
  run: () => Promise<unknown>;
  dispose?: () => void;
}

interface Measurement {
  name: string;
  shape: string;
  seconds: number;
  tokens: number;
  work: Work;
}

async function best(reps: number, run: () => Promise<unknown>): Promise<number> {
  await run();
  let fastest = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    await run();
    fastest = Math.min(fastest, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  return fastest;
}

export function randomTokens(n: number, V: number, seed: number): Int32Array {
  const out = new Int32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s % V;
  }
  return out;
}

/**
 * The bench's operations on `model`: forward in both forms, a chunkwise prefill, one decode step
 * at each of `decodeBatches` (its session prefilled with 64 tokens by the first run), and a
 * chunkwise trainStep.
 */
export function benchOperations(model: NativeModel, config: RetNetConfig, small: boolean, decodeBatches: number[]): BenchOperation[] {
  const V = config.vocab_size;
  const weights = stepWeightCount(config);
  const head = V * config.decoder_embed_dim;
  const B = small ? 2 : 4;
  const T = small ? 256 : 1024;
  const C = 128;
  const tokens = randomTokens(B * T, V, 1);
  const ops: BenchOperation[] = (['parallel', 'chunkwise'] as const).map((mode) => ({
    id: `forward-${mode}`, name: `forward ${mode}`, shape: `B${B} T${T}${mode === 'chunkwise' ? ` C${C}` : ''}`, repeat: 1,
    tokens: B * T, work: { flops: 2 * weights * B * T }, run: () => model.forward(tokens, B, T, mode, C),
  }));
  const promptLength = small ? 512 : 2048;
  const prompt = randomTokens(promptLength, V, 2);
  ops.push({
    id: 'prefill', name: 'prefill chunkwise', shape: `B1 T${promptLength} C${C}`, repeat: 1, tokens: promptLength,
    // A prefill projects only the last row to logits.
    work: { flops: 2 * (weights - head) * promptLength + 2 * head },
    run: async () => {
      const state = model.createState(1);
      await model.prefill(state, prompt, promptLength, 'chunkwise', C);
      state.dispose();
    },
  });
  for (const batch of decodeBatches) {
    const next = randomTokens(batch, V, 4);
    // The session is made and prefilled by the first run (the warm-up), so an operation that
    // is never run costs nothing, and a profile of another one sees none of its kernels.
    let state: NativeState | undefined;
    ops.push({
      id: `step-${batch}`, name: 'decode', shape: `batch ${batch}`, repeat: 32, tokens: batch,
      work: { bytes: decodeStepBytes(config, batch) },
      run: async () => {
        if (!state) {
          state = model.createState(batch);
          await model.prefill(state, randomTokens(batch * 64, V, 3), 64, 'chunkwise', C);
        }
        return model.step(state, next);
      },
      dispose: () => state?.dispose(),
    });
  }
  const trainB = small ? 2 : 4;
  const trainT = small ? 128 : 512;
  const micro = [{ tokens: randomTokens(trainB * trainT, V, 5), batch: trainB, length: trainT, targets: null, mask: null }];
  const options = {
    mode: 'chunkwise' as const, chunkSize: C, lr: 1e-4, beta1: 0.9, beta2: 0.98, eps: 1e-8, weightDecay: 0.01,
    clipNorm: 1.0, noDecay: [], seed: 0,
  };
  ops.push({
    id: 'train', name: 'trainStep chunkwise', shape: `B${trainB} T${trainT} C${C}`, repeat: 1, tokens: trainB * trainT,
    work: { flops: 6 * weights * trainB * trainT }, run: () => model.trainStep(micro, options),
  });
  return ops;
}

async function measure(model: NativeModel, config: RetNetConfig, small: boolean): Promise<Measurement[]> {
  const out: Measurement[] = [];
  for (const op of benchOperations(model, config, small, [1, 16])) {
    const seconds = await best(op.repeat > 1 ? 2 : 3, async () => {
      for (let i = 0; i < op.repeat; i++) await op.run();
    });
    op.dispose?.();
    const scale = (w: Work): Work => ('bytes' in w ? { bytes: w.bytes * op.repeat } : { flops: w.flops * op.repeat });
    const shape = op.repeat > 1 ? `${op.shape}, ${op.repeat} steps` : op.shape;
    out.push({ name: op.name, shape, seconds, tokens: op.tokens * op.repeat, work: scale(op.work) });
  }
  return out;
}

function achieved(r: Measurement): string {
  return 'bytes' in r.work
    ? `${(r.work.bytes / r.seconds / 1e9).toFixed(1)} GB/s`
    : `${(r.work.flops / r.seconds / 1e12).toFixed(2)} TFLOP/s`;
}

function printTable(rows: Measurement[]): void {
  const lines = rows.map((r) => [r.name, r.shape, (r.seconds * 1e3).toFixed(2), Math.round(r.tokens / r.seconds).toString(), achieved(r)]);
  const header = ['what', 'shape', 'ms', 'tokens/s', 'achieved'];
  const widths = header.map((h, c) => Math.max(h.length, ...lines.map((l) => l[c].length)));
  for (const line of [header, ...lines]) console.log(line.map((cell, c) => cell.padEnd(widths[c])).join('  '));
}

/** The bench model: 134M parameters (D 1024, Dv 2048, 8 layers, vocab 8192), or a small one. */
export function benchConfig(small: boolean) {
  return small
    ? { vocab_size: 4096, decoder_embed_dim: 256, decoder_value_embed_dim: 512, decoder_retention_heads: 2, decoder_ffn_embed_dim: 512, decoder_layers: 2 }
    : { vocab_size: 8192, decoder_embed_dim: 1024, decoder_value_embed_dim: 2048, decoder_retention_heads: 4, decoder_ffn_embed_dim: 2048, decoder_layers: 8 };
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const device = args.includes('--device') ? (args[args.indexOf('--device') + 1] as 'cpu' | 'cuda') : 'cuda';
  const small = args.includes('--small');
  const info = buildInfo();
  if (device === 'cuda' && !(info.cuda && info.cudaDevices > 0)) {
    console.log(`bench-cuda: skipped (${info.cuda ? 'no CUDA device' : 'retnet was built without CUDA'})`);
    return;
  }
  const config = benchConfig(small);
  // A CUDA model reads RETNET_CUDA_GEMM when it is created.
  const chosen = process.env.RETNET_CUDA_GEMM;
  const gemms = device === 'cpu' ? [undefined] : chosen ? [chosen] : ['own', 'cublas'];
  for (const gemm of gemms) {
    if (gemm !== undefined) process.env.RETNET_CUDA_GEMM = gemm;
    const gemmName = device === 'cpu' ? info.gemm : buildInfo().cudaGemm;
    if (gemmName.startsWith('error: ')) {
      console.log(`bench-cuda: gemm ${gemm} skipped (${gemmName.slice('error: '.length)})`);
      continue;
    }
    const model = await RetNet.create(config, { device });
    console.log(
      `bench-cuda: device ${device}, gemm ${gemmName}, ${(model.parameterCount / 1e6).toFixed(1)}M parameters, ${JSON.stringify(config)}`,
    );
    try {
      printTable(await measure(model.native(), model.config, small));
    } finally {
      model.dispose();
    }
  }
}

if (require.main === module) {
  main().catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  });
}
