// `npm start` / `retnet train`: trains a byte-level RetNet (by default on the Brown corpus),
// reports validation loss in nats/byte, saves a checkpoint and prints a generated sample with the
// decode speed. Ctrl-C or SIGTERM stops after the current step and still saves the checkpoint.

import * as path from 'path';
import { performance } from 'perf_hooks';
import { parseArgs } from 'util';

import { claimTrainingRun, moveCheckpointAside } from '../lib/checkpoint';
import { resolveConfig } from '../lib/config';
import { Dataset, loadBrownCorpus } from '../lib/dataset';
import { RetNet } from '../lib/model';
import { ProgressLine, formatDuration } from '../lib/progress';
import { integerFlag, numberFlag } from './flags';
import { Trainer, TrainMode } from '../lib/trainer';
import type { Precision } from '../lib/native';

// Defaults sized (by measurement on a 2-core CPU) so the whole run takes about ten minutes.
const DEFAULTS = {
  layers: 4,
  dim: 256,
  heads: 2,
  ffn: 512,
  valueDim: 512,
  steps: 560,
  batch: 8,
  seqLen: 256,
  mode: 'parallel' as TrainMode,
  chunkSize: 64,
  lr: 2e-3,
  out: path.join('runs', 'brown'),
  seed: 0,
  evalEvery: 200,
  checkpointEvery: 200,
  evalBatches: 16,
  prompt: 'The jury said',
  sampleBytes: 200,
};

const USAGE = `usage: retnet train [options]

  --data FILE...      UTF-8 text files to train on (default: the Brown corpus, tags stripped)
  --layers N          decoder layers (default ${DEFAULTS.layers})
  --dim N             embedding dim D (default ${DEFAULTS.dim})
  --heads N           retention heads (default ${DEFAULTS.heads})
  --ffn N             feed-forward dim (default ${DEFAULTS.ffn})
  --value-dim N       value dim (default ${DEFAULTS.valueDim})
  --steps N           total optimizer steps (default ${DEFAULTS.steps})
  --batch N           rows per step (default ${DEFAULTS.batch})
  --seq-len N         bytes per row (default ${DEFAULTS.seqLen})
  --mode M            parallel | chunkwise (default ${DEFAULTS.mode})
  --chunk-size N      chunk size for chunkwise (default ${DEFAULTS.chunkSize})
  --checkpoint-activations
                      recompute each layer's activations in the backward (less memory, ~1/4 more time)
  --precision P       fp32 | bf16: what the layers' linear products round their inputs to in training (default fp32)
  --lr X              peak learning rate (default ${DEFAULTS.lr})
  --out DIR           checkpoint directory (default ${DEFAULTS.out}); a checkpoint already there is
                      moved aside to DIR.replaced-<time> unless --resume continues it
  --resume            continue the checkpoint in --out (its model shape, options, seq-len and data order;
                      --steps may extend it; give --batch again if it was not the default)
  --seed N            seed of initialisation and data order (default ${DEFAULTS.seed})
  --eval-every N      validation every N steps, 0 = only at the end (default ${DEFAULTS.evalEvery})
  --checkpoint-every N
                      a checkpoint every N steps, 0 = only at the end (default ${DEFAULTS.checkpointEvery});
                      Ctrl-C or SIGTERM stops after the step in progress and writes one too
  --prompt TEXT       prompt of the sample printed at the end (default "${DEFAULTS.prompt}")
  -h, --help          show this help`;

const MAX_STEP_TOKENS = 1 << 24;

/** Flags a resumed run takes from its checkpoint (model shape, options, data windows). */
const RESUME_KEEPS = ['layers', 'dim', 'heads', 'ffn', 'value-dim', 'seq-len', 'mode', 'chunk-size', 'checkpoint-activations', 'precision', 'lr', 'seed'] as const;

function parseFlags(argv: string[]) {
  // Positionals are more data files, so `--data a.txt b.txt` works as well as repeating --data.
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: {
      data: { type: 'string', multiple: true },
      layers: { type: 'string' },
      dim: { type: 'string' },
      heads: { type: 'string' },
      ffn: { type: 'string' },
      'value-dim': { type: 'string' },
      steps: { type: 'string' },
      batch: { type: 'string' },
      'seq-len': { type: 'string' },
      mode: { type: 'string' },
      'chunk-size': { type: 'string' },
      'checkpoint-activations': { type: 'boolean' },
      precision: { type: 'string' },
      lr: { type: 'string' },
      out: { type: 'string' },
      resume: { type: 'boolean' },
      seed: { type: 'string' },
      'eval-every': { type: 'string' },
      'checkpoint-every': { type: 'string' },
      prompt: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const integer = (flag: keyof typeof values, fallback: number, min: number): number =>
    integerFlag(values[flag] as string | undefined, flag, min) ?? fallback;
  const lr = numberFlag(values.lr, 'lr', 0) ?? DEFAULTS.lr;
  const mode = (values.mode ?? DEFAULTS.mode) as TrainMode;
  if (mode !== 'parallel' && mode !== 'chunkwise') throw new Error(`--mode must be parallel or chunkwise, got ${values.mode}`);
  const precision = (values.precision ?? 'fp32') as Precision;
  if (precision !== 'fp32' && precision !== 'bf16') throw new Error(`--precision must be fp32 or bf16, got ${values.precision}`);
  const batch = integer('batch', DEFAULTS.batch, 1);
  const seqLen = integer('seq-len', DEFAULTS.seqLen, 2);
  // A step holds batch x seq-len tokens' activations; far past this no machine has the memory.
  if (batch * seqLen > MAX_STEP_TOKENS) throw new Error(`--batch x --seq-len must be at most ${MAX_STEP_TOKENS} tokens a step, got ${batch} x ${seqLen}`);
  const prompt = values.prompt ?? DEFAULTS.prompt;
  if (prompt === '') throw new Error('--prompt must not be empty (it starts the sample printed at the end)');
  return {
    help: values.help === true,
    data: values.data || positionals.length > 0 ? [...(values.data ?? []), ...positionals] : undefined,
    layers: integer('layers', DEFAULTS.layers, 1),
    dim: integer('dim', DEFAULTS.dim, 2),
    heads: integer('heads', DEFAULTS.heads, 1),
    ffn: integer('ffn', DEFAULTS.ffn, 1),
    valueDim: integer('value-dim', DEFAULTS.valueDim, 1),
    steps: integer('steps', DEFAULTS.steps, 1),
    stepsGiven: values.steps !== undefined,
    batch,
    seqLen,
    mode,
    chunkSize: integer('chunk-size', DEFAULTS.chunkSize, 1),
    checkpointActivations: values['checkpoint-activations'] === true,
    precision,
    lr,
    out: values.out ?? DEFAULTS.out,
    resume: values.resume === true,
    seed: integer('seed', DEFAULTS.seed, 0),
    evalEvery: integer('eval-every', DEFAULTS.evalEvery, 0),
    checkpointEvery: integer('checkpoint-every', DEFAULTS.checkpointEvery, 0),
    prompt,
    // What a resumed run takes from its checkpoint instead.
    ignoredOnResume: RESUME_KEEPS.filter((flag) => values[flag] !== undefined),
  };
}

/** Prints a sample continuation of `prompt` and returns decode tokens per second. */
async function sample(model: RetNet, prompt: string, seed: number): Promise<number> {
  let text = '';
  let tokens = 0;
  let firstTokenAt = 0;
  for await (const chunk of model.generate(prompt, { maxTokens: DEFAULTS.sampleBytes, temperature: 0.7, topK: 40, seed })) {
    // Timing from the first sampled token leaves the prompt's prefill out of the decode rate.
    if (tokens === 0) firstTokenAt = performance.now();
    text += chunk.text;
    tokens++;
  }
  const seconds = (performance.now() - firstTokenAt) / 1000;
  process.stdout.write(`\n--- sample ---\n${prompt}${text}\n--------------\n`);
  return tokens > 1 ? (tokens - 1) / seconds : NaN;
}

export async function train(argv: string[]): Promise<void> {
  const flags = parseFlags(argv);
  if (flags.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  const log = (message: string) => process.stderr.write(message + '\n');

  // One run per output directory, from before a resume reads it to after the last save.
  const releaseRun = await claimTrainingRun(flags.out);
  try {
    await trainClaimed(flags, log);
  } finally {
    await releaseRun();
  }
}

async function trainClaimed(flags: ReturnType<typeof parseFlags>, log: (message: string) => void): Promise<void> {
  const modelConfig = {
    vocab_size: 256,
    decoder_layers: flags.layers,
    decoder_embed_dim: flags.dim,
    decoder_retention_heads: flags.heads,
    decoder_ffn_embed_dim: flags.ffn,
    decoder_value_embed_dim: flags.valueDim,
    recurrent_chunk_size: flags.chunkSize,
    chunkwise_recurrent: flags.mode === 'chunkwise',
  };
  // A fresh run's model shape is checked before the data loads (the Brown corpus takes seconds).
  if (!flags.resume) resolveConfig(modelConfig);
  // A resumed run keeps its saved schedule unless --steps asks for a different length, and its
  // data windows (the checkpoint's seqLen and seed), so the batches continue where they stopped.
  const resumed = flags.resume ? await Trainer.resume(flags.out, flags.stepsGiven ? { totalSteps: flags.steps } : {}) : undefined;
  const saved = resumed?.datasetState;
  const datasetOptions = { seqLen: saved?.seqLen ?? flags.seqLen, validationFraction: 0.05, seed: saved?.seed ?? flags.seed };
  let dataset: Dataset;
  try {
    dataset = flags.data ? await Dataset.fromFiles(flags.data, datasetOptions) : Dataset.fromText(await loadBrownCorpus(), datasetOptions);
    if (saved) dataset.setState(saved);
  } catch (e) {
    resumed?.model.dispose();
    throw e;
  }
  log(
    `data: ${flags.data ? flags.data.join(', ') : 'Brown corpus'}: ` +
      `${dataset.trainTokens.length} training bytes, ${dataset.validationTokens.length} validation bytes`,
  );

  let model: RetNet;
  let trainer: Trainer;
  if (resumed) {
    ({ model, trainer } = resumed);
    log(`resumed ${flags.out} at step ${trainer.stepCount}`);
    // A checkpoint saved without a dataset (Trainer.fit's caller gave none) holds no position.
    if (!saved) log(`${flags.out} holds no dataset position: the data order starts over from its first batch`);
    if (flags.ignoredOnResume.length > 0) {
      log(`ignoring ${flags.ignoredOnResume.map((f) => `--${f}`).join(', ')}: a resumed run keeps its checkpoint's`);
    }
    if (trainer.stepCount >= trainer.options.totalSteps) {
      log(`no steps to run: the checkpoint is already at step ${trainer.stepCount} of ${trainer.options.totalSteps}; it is left as it was`);
      model.dispose();
      return;
    }
  } else {
    model = await RetNet.create(modelConfig, { seed: flags.seed });
    trainer = new Trainer(model, {
      lr: flags.lr,
      totalSteps: flags.steps,
      warmupSteps: Math.min(100, Math.floor(flags.steps / 10)),
      mode: flags.mode,
      chunkSize: flags.chunkSize,
      seed: flags.seed,
      checkpointActivations: flags.checkpointActivations,
      precision: flags.precision,
    });
  }
  const totalSteps = trainer.options.totalSteps;
  log(
    `model: ${model.parameterCount.toLocaleString('en-US')} parameters (L=${model.config.decoder_layers}, ` +
      `D=${model.config.decoder_embed_dim}, H=${model.config.decoder_retention_heads}), ` +
      `${totalSteps} steps of ${flags.batch}x${dataset.seqLen} bytes, ${trainer.options.mode}, ${trainer.options.precision} products`,
  );

  // Starting over where a checkpoint is keeps that one, moved aside (once the new run is set
  // up), rather than replacing it.
  const previous = resumed ? undefined : await moveCheckpointAside(flags.out);
  if (previous) {
    log(`moved the checkpoint already in ${flags.out} (${previous.step === undefined ? 'its trainer.json unreadable' : `step ${previous.step}`}) to ${previous.aside}`);
  }

  const controller = new AbortController();
  const onInterrupt = () => {
    if (controller.signal.aborted) process.exit(130);
    log('\nstopping after this step (Ctrl-C again to quit now)');
    controller.abort();
  };
  process.on('SIGINT', onInterrupt);
  process.on('SIGTERM', onInterrupt);
  const progress = new ProgressLine(process.stderr);
  try {
    const summary = await trainer.fit(dataset, {
      batchSize: flags.batch,
      steps: totalSteps,
      evalEvery: flags.evalEvery,
      evalBatches: DEFAULTS.evalBatches,
      checkpointDir: flags.out,
      checkpointEvery: flags.checkpointEvery,
      signal: controller.signal,
      onProgress: (p) => {
        if (p.kind === 'step' && p.result) {
          progress.update({
            step: p.step,
            total: p.totalSteps,
            loss: p.result.loss,
            tokensPerSecond: p.result.tokensPerSecond,
            etaSeconds: p.etaSeconds,
          });
        } else if (p.kind === 'eval') {
          progress.log(`step ${p.step}: validation loss ${p.validationLoss!.toFixed(4)} nats/byte`);
        } else if (p.kind === 'checkpoint') {
          progress.log(`step ${p.step}: checkpoint written to ${p.checkpointDir}`);
        }
      },
    });
    progress.finish();
    log(
      summary.stepsRun === 0
        ? `no steps to run: the checkpoint is already at step ${summary.endStep} of ${totalSteps}`
        : `trained steps ${summary.startStep + 1}..${summary.endStep} in ${formatDuration(summary.elapsedSeconds)} ` +
            `(${Math.round(summary.tokensPerSecond)} tok/s)${summary.aborted ? ', stopped early' : ''}`,
    );
    if (summary.validationLoss !== undefined) {
      const nats = summary.validationLoss;
      process.stdout.write(`validation loss: ${nats.toFixed(4)} nats/byte (${(nats / Math.LN2).toFixed(4)} bits/byte)\n`);
    }
    process.stdout.write(`checkpoint: ${flags.out}\n`);
    if (!summary.aborted) {
      const decodeRate = await sample(model, flags.prompt, flags.seed);
      process.stdout.write(`decode: ${decodeRate.toFixed(1)} tokens/s\n`);
    }
  } finally {
    process.off('SIGINT', onInterrupt);
    process.off('SIGTERM', onInterrupt);
    model.dispose();
  }
}

if (require.main === module) {
  train(process.argv.slice(2)).catch((e: Error) => {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(1);
  });
}
