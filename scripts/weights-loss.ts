// `node dist/scripts/weights-loss.js [DIR]`: what compact weights cost in quality.
// Loads a checkpoint (default runs/brown, the one `npm start` writes) once per weight format
// and computes the validation loss through recurrent decode steps (the path compact weights
// serve), over windows spread across the validation tail of the same corpus the run used.
import { parseArgs } from 'util';

import { Dataset, loadBrownCorpus } from '../lib/dataset';
import { RetNet } from '../lib/model';
import type { WeightFormat } from '../lib/native';
import { integerFlag } from './flags';

const USAGE = `usage: node dist/scripts/weights-loss.js [DIR] [options]
  DIR               checkpoint directory (default runs/brown)
  --data FILE...    UTF-8 text files the run trained on (default: the Brown corpus)
  --weights LIST    formats to compare, comma-separated (default f32,bf16,int8); each line's
                    change is relative to the first format listed
  --windows N       validation windows, decoded as one batch (default 16)
  --length N        tokens per window (default 256)`;

const FORMATS: readonly WeightFormat[] = ['f32', 'bf16', 'int8'];

/**
 * Mean next-token cross-entropy (nats per token) of `windows` (equal lengths >= 2), fed one
 * token per recurrent step to a session of one row per window.
 */
export async function recurrentLoss(model: RetNet, windows: Int32Array[]): Promise<number> {
  const length = windows[0]?.length ?? 0;
  if (length < 2 || windows.some((w) => w.length !== length)) {
    throw new Error('recurrentLoss: windows must all have the same length, at least 2');
  }
  const V = model.vocabSize;
  const session = model.createSession({ batch: windows.length });
  let total = 0;
  try {
    for (let t = 0; t + 1 < length; t++) {
      const { logits } = await session.step(windows.map((w) => w[t]));
      windows.forEach((w, b) => {
        const row = logits.subarray(b * V, (b + 1) * V);
        let max = -Infinity;
        for (let i = 0; i < V; i++) max = Math.max(max, row[i]);
        let sum = 0;
        for (let i = 0; i < V; i++) sum += Math.exp(row[i] - max);
        total += max + Math.log(sum) - row[w[t + 1]];
      });
    }
  } finally {
    session.dispose();
  }
  return total / (windows.length * (length - 1));
}

/** `count` windows of `length` tokens spread evenly over `tokens`. */
export function spreadWindows(tokens: Int32Array, count: number, length: number): Int32Array[] {
  if (tokens.length < length) throw new Error(`the validation tokens (${tokens.length}) are fewer than one window (${length})`);
  const span = tokens.length - length;
  return Array.from({ length: count }, (_, i) => {
    const start = count === 1 ? 0 : Math.floor((span * i) / (count - 1));
    return tokens.slice(start, start + length);
  });
}

export async function main(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      data: { type: 'string', multiple: true },
      weights: { type: 'string' },
      windows: { type: 'string' },
      length: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  if (positionals.length > 1) throw new Error(`one checkpoint directory expected, got ${positionals.length}\n${USAGE}`);
  const dir = positionals[0] ?? 'runs/brown';
  const formats = (values.weights ?? FORMATS.join(',')).split(',');
  for (const f of formats) {
    if (!FORMATS.includes(f as WeightFormat)) throw new Error(`--weights: unknown format ${JSON.stringify(f)} (f32, bf16 or int8)`);
  }
  const count = integerFlag(values.windows, 'windows', 1) ?? 16;
  const length = integerFlag(values.length, 'length', 2) ?? 256;
  // The validation tail is the stream's last 5 %, whatever the window length and seed.
  const datasetOptions = { seqLen: length, validationFraction: 0.05 };
  const dataset = values.data
    ? await Dataset.fromFiles(values.data, datasetOptions)
    : Dataset.fromText(await loadBrownCorpus(), datasetOptions);
  const windows = spreadWindows(dataset.validationTokens, count, length);
  let reference: number | undefined;
  for (const format of formats as WeightFormat[]) {
    const model = await RetNet.load(dir, { weights: format });
    // The header once the checkpoint has loaded: a bad path prints only its error.
    if (reference === undefined) console.log(`${dir}: ${count} windows of ${length} tokens (${count * (length - 1)} predictions), recurrent decode`);
    try {
      const start = process.hrtime.bigint();
      const loss = await recurrentLoss(model, windows);
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      reference ??= loss;
      const change = ((loss - reference) / reference) * 100;
      console.log(
        `${format.padEnd(4)}  loss ${loss.toFixed(5)} nats/token  change ${change >= 0 ? '+' : ''}${change.toFixed(3)} %` +
          `  (${((count * (length - 1)) / seconds).toFixed(0)} tok/s at batch ${count})`,
      );
    } finally {
      model.dispose();
    }
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((err: Error) => {
    process.stderr.write(`weights-loss: ${err.message}\n`);
    process.exit(1);
  });
}
