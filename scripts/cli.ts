#!/usr/bin/env node
// The `retnet` command: `retnet train ...` trains (see scripts/train.ts), `retnet generate ...`
// streams a continuation of a prompt from a saved model, `retnet serve ...` runs the HTTP
// server (scripts/serve.ts), `retnet bench ...` measures speed (scripts/bench.ts).

import { parseArgs } from 'util';

import { validateGenerateOptions } from '../lib/generate';
import { RetNet } from '../lib/model';
import { main as bench } from './bench';
import { integerFlag, numberFlag } from './flags';
import { serve } from './serve';
import { train } from './train';

const USAGE = `usage: retnet <command> [options]

commands:
  train       train a byte-level model (retnet train --help)
  generate    continue a prompt with a saved model (retnet generate --help)
  serve       an OpenAI-compatible completions server for a saved model (retnet serve --help)
  bench       decode / train / kernel benchmarks (retnet bench --help)`;

const GENERATE_USAGE = `usage: retnet generate --model DIR [options]

  --model DIR          a model directory (config.json + model.safetensors) or a .safetensors file;
                       a training checkpoint directory works too (default runs/brown)
  --prompt TEXT        text to continue (default "The ")
  --max-tokens N       tokens to generate (default 200)
  --temperature X      sampling temperature, 0 = greedy (default 0.8)
  --top-k N            keep the N most likely tokens, 0 = all (default 40)
  --top-p X            nucleus mass in (0, 1] (default 1)
  --seed N             sampling seed (default: random)
  -h, --help           show this help`;

async function generate(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      model: { type: 'string' },
      prompt: { type: 'string' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(GENERATE_USAGE + '\n');
    return;
  }
  const options = {
    maxTokens: integerFlag(values['max-tokens'], 'max-tokens', 0) ?? 200,
    temperature: numberFlag(values.temperature, 'temperature') ?? 0.8,
    topK: integerFlag(values['top-k'], 'top-k', 0) ?? 40,
    topP: numberFlag(values['top-p'], 'top-p'),
    seed: integerFlag(values.seed, 'seed'),
  };
  // Checked before the model loads and anything is printed; the error names the flag.
  try {
    validateGenerateOptions(options);
  } catch (e) {
    const flag = (name: string) => `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
    throw new Error((e as Error).message.replace(/option: (\w+)/, (_m, name: string) => `flag: ${flag(name)}`));
  }
  const model = await RetNet.load(values.model ?? 'runs/brown');
  try {
    const prompt = values.prompt ?? 'The ';
    process.stdout.write(prompt);
    for await (const chunk of model.generate(prompt, options)) process.stdout.write(chunk.text);
    process.stdout.write('\n');
  } finally {
    model.dispose();
  }
}

async function main(argv: string[]): Promise<void> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'train':
      return train(rest);
    case 'generate':
      return generate(rest);
    case 'serve':
      return serve(rest);
    case 'bench':
      return bench(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE + '\n');
      return;
    default:
      throw new Error(`unknown command ${JSON.stringify(command)}\n${USAGE}`);
  }
}

main(process.argv.slice(2)).catch((e: Error) => {
  process.stderr.write(`error: ${e.message}\n`);
  process.exit(1);
});
