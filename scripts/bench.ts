// `npm run bench` / `retnet bench`: decode throughput of the native core on random-weight
// presets or a checkpoint. Prints a table and, with --json FILE, writes every figure.
import * as fs from 'fs';

import { RetNet } from '../lib';
import { buildInfo } from '../lib/info';

const PRESETS: Record<string, Record<string, unknown> & { vocab_size: number }> = {
  tiny: { vocab_size: 256, decoder_embed_dim: 64, decoder_value_embed_dim: 128, decoder_retention_heads: 2, decoder_ffn_embed_dim: 128, decoder_layers: 2, activation_fn: 'swish' },
  base: { vocab_size: 32000, decoder_embed_dim: 512, decoder_value_embed_dim: 864, decoder_retention_heads: 2, decoder_ffn_embed_dim: 864, decoder_layers: 6, activation_fn: 'swish', no_scale_embedding: false },
  medium: { vocab_size: 32000, decoder_embed_dim: 1024, decoder_value_embed_dim: 1728, decoder_retention_heads: 4, decoder_ffn_embed_dim: 1728, decoder_layers: 16, activation_fn: 'swish', no_scale_embedding: false },
};

interface DecodeFigure {
  preset: string;
  weights: 'f32';
  batch: number;
  context: number;
  prefillTokensPerSecond: number;
  tokensPerSecond: number;
  msPerToken: number;
  peakRssBytes: number;
}

interface Args {
  preset: string;
  model?: string;
  batches: number[];
  contexts: number[];
  steps: number;
  chunkSize: number;
  json?: string;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { preset: 'base', batches: [1, 4], contexts: [512, 2048], steps: 64, chunkSize: 64 };
  const list = (v: string, flag: string): number[] => {
    const out = v.split(',').map(Number);
    if (out.some((n) => !Number.isInteger(n) || n < 1)) throw new Error(`${flag} takes comma-separated positive integers`);
    return out;
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (value === undefined && flag !== 'decode') throw new Error(`${flag} needs a value`);
    switch (flag) {
      case 'decode':
        continue;
      case '--preset':
        if (!(value in PRESETS)) throw new Error(`--preset must be one of ${Object.keys(PRESETS).join(', ')}`);
        args.preset = value;
        break;
      case '--model':
        args.model = value;
        break;
      case '--batch':
        args.batches = list(value, flag);
        break;
      case '--context':
        args.contexts = list(value, flag);
        break;
      case '--steps':
        args.steps = list(value, flag)[0];
        break;
      case '--chunk-size':
        args.chunkSize = list(value, flag)[0];
        break;
      case '--json':
        args.json = value;
        break;
      default:
        throw new Error(`unknown flag ${flag} (flags: --preset, --model, --batch, --context, --steps, --chunk-size, --json)`);
    }
    i++;
  }
  return args;
}

function seconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export async function benchDecode(args: Args): Promise<DecodeFigure[]> {
  const name = args.model ?? args.preset;
  const model = args.model ? await RetNet.load(args.model) : await RetNet.create(PRESETS[args.preset], { seed: 1 });
  const V = model.config.vocab_size;
  const figures: DecodeFigure[] = [];
  for (const batch of args.batches) {
    for (const context of args.contexts) {
      const session = model.createSession({ batch });
      const prompt = Array.from({ length: batch }, (_, b) => Array.from({ length: context }, (_, t) => (t * 7 + b) % V));
      let start = process.hrtime.bigint();
      await session.prefill(prompt, { mode: 'chunkwise', chunkSize: args.chunkSize });
      const prefillSeconds = seconds(start);
      const ids = Array.from({ length: batch }, (_, b) => (b * 13) % V);
      for (let i = 0; i < 4; i++) await session.step(ids); // warm-up
      start = process.hrtime.bigint();
      for (let i = 0; i < args.steps; i++) await session.step(ids);
      const stepSeconds = seconds(start) / args.steps;
      session.dispose();
      figures.push({
        preset: name,
        weights: 'f32',
        batch,
        context,
        prefillTokensPerSecond: (batch * context) / prefillSeconds,
        tokensPerSecond: batch / stepSeconds,
        msPerToken: stepSeconds * 1000,
        peakRssBytes: process.resourceUsage().maxRSS * 1024,
      });
      const f = figures[figures.length - 1];
      console.log(
        `${name.padEnd(8)} batch ${String(batch).padStart(3)}  context ${String(context).padStart(6)}  ` +
          `prefill ${f.prefillTokensPerSecond.toFixed(0).padStart(7)} tok/s  decode ${f.msPerToken.toFixed(2).padStart(7)} ms/step ` +
          `${f.tokensPerSecond.toFixed(1).padStart(8)} tok/s  peak RSS ${(f.peakRssBytes / 2 ** 20).toFixed(0)} MiB`,
      );
    }
  }
  model.dispose();
  return figures;
}

export async function main(argv: string[]): Promise<void> {
  const args = parseArgs(argv);
  const info = buildInfo();
  console.log(`retnet decode bench: ${info.threads} threads, gemm kernels ${info.gemm}`);
  const decode = await benchDecode(args);
  if (args.json) fs.writeFileSync(args.json, JSON.stringify({ build: info, decode }, null, 2) + '\n');
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((e: Error) => {
    console.error(`retnet bench: ${e.message}`);
    process.exit(1);
  });
}
