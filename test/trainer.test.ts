import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { Dataset } from '../lib/dataset';
import { RetNet } from '../lib/model';
import { Trainer, TrainerOptions, defaultNoDecay, learningRateAt, resolveTrainerOptions } from '../lib/trainer';

const TINY = {
  vocab_size: 256,
  decoder_embed_dim: 32,
  decoder_value_embed_dim: 64,
  decoder_retention_heads: 2,
  decoder_ffn_embed_dim: 64,
  decoder_layers: 1,
  recurrent_chunk_size: 8,
};
const TEXT = 'the quick brown fox jumps over the lazy dog. '.repeat(30);

function tinyModel(seed = 1): Promise<RetNet> {
  return RetNet.create(TINY, { seed });
}

function tinyData(seed = 5): Dataset {
  return Dataset.fromText(TEXT, { seqLen: 32, validationFraction: 0.1, seed });
}

describe('learning-rate schedule', () => {
  const base = { lr: 1e-3, minLr: 1e-4, warmupSteps: 10, totalSteps: 110 };

  test('linear warmup from lr/warmupSteps to lr', () => {
    const o = { ...base, schedule: 'cosine' as const };
    expect(learningRateAt(1, o)).toBeCloseTo(1e-4, 15);
    expect(learningRateAt(5, o)).toBeCloseTo(5e-4, 15);
    expect(learningRateAt(10, o)).toBeCloseTo(1e-3, 15);
  });

  test('cosine decays to the floor at totalSteps and stays there', () => {
    const o = { ...base, schedule: 'cosine' as const };
    expect(learningRateAt(60, o)).toBeCloseTo(1e-4 + 0.9e-3 * 0.5, 15); // halfway: cos(pi/2) = 0
    expect(learningRateAt(35, o)).toBeCloseTo(1e-4 + 0.9e-3 * 0.5 * (1 + Math.cos(Math.PI / 4)), 15);
    expect(learningRateAt(110, o)).toBeCloseTo(1e-4, 15);
    expect(learningRateAt(500, o)).toBeCloseTo(1e-4, 15);
  });

  test('linear decays in a straight line to the floor', () => {
    const o = { ...base, schedule: 'linear' as const };
    expect(learningRateAt(11, o)).toBeCloseTo(1e-4 + 0.9e-3 * 0.99, 15);
    expect(learningRateAt(85, o)).toBeCloseTo(1e-4 + 0.9e-3 * 0.25, 15);
    expect(learningRateAt(110, o)).toBeCloseTo(1e-4, 15);
    expect(learningRateAt(200, o)).toBeCloseTo(1e-4, 15);
  });

  test('constant stays at lr after warmup; no warmup starts at lr', () => {
    expect(learningRateAt(11, { ...base, schedule: 'constant' })).toBe(1e-3);
    expect(learningRateAt(1000, { ...base, schedule: 'constant' })).toBe(1e-3);
    expect(learningRateAt(1, { ...base, warmupSteps: 0, schedule: 'cosine' })).toBeCloseTo(1e-3, 6);
    expect(learningRateAt(1, { ...base, warmupSteps: 0, totalSteps: 0, schedule: 'linear' })).toBe(1e-4);
  });
});

/** Σ next-token cross-entropy in float64 from forward()'s logits: the reference of the native loss. */
async function referenceLossSum(model: RetNet, data: Int32Array, B: number, T: number, mode: 'parallel' | 'chunkwise' | 'recurrent', chunkSize: number): Promise<number> {
  const { logits } = await model.forward({ data, shape: [B, T] }, { mode, chunkSize });
  const V = model.vocabSize;
  let total = 0;
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T - 1; t++) {
      const row = logits.subarray((b * T + t) * V, (b * T + t + 1) * V);
      let max = -Infinity;
      for (const x of row) max = Math.max(max, x);
      let sum = 0;
      for (const x of row) sum += Math.exp(x - max);
      total += max + Math.log(sum) - row[data[b * T + t + 1]];
    }
  }
  return total;
}

describe('Trainer options', () => {
  let model: RetNet;
  beforeAll(async () => {
    model = await tinyModel();
  });
  afterAll(() => model.dispose());

  test('defaults', () => {
    const o = resolveTrainerOptions(model, { lr: 1e-3, totalSteps: 10 });
    expect(o).toMatchObject({
      minLr: 1e-4,
      warmupSteps: 0,
      schedule: 'cosine',
      beta1: 0.9,
      beta2: 0.95,
      eps: 1e-8,
      weightDecay: 0.1,
      clipNorm: 1,
      gradAccumulation: 1,
      mode: 'parallel',
      chunkSize: 8,
      seed: 0,
    });
    expect(o.noDecay).toEqual(['layers.0.retention_layer_norm.weight', 'layers.0.final_layer_norm.weight', 'layer_norm.weight']);
    expect(defaultNoDecay(model)).toEqual(o.noDecay);
  });

  test("the default mode follows the config's chunkwise_recurrent, as forward() does", async () => {
    const chunkwiseModel = await RetNet.create({ ...TINY, chunkwise_recurrent: true }, { seed: 1 });
    try {
      expect(resolveTrainerOptions(chunkwiseModel, { lr: 1e-3, totalSteps: 10 }).mode).toBe('chunkwise');
      expect(resolveTrainerOptions(chunkwiseModel, { lr: 1e-3, totalSteps: 10, mode: 'parallel' }).mode).toBe('parallel');
    } finally {
      chunkwiseModel.dispose();
    }
  });

  test.each<[Partial<TrainerOptions> & Record<string, unknown>, RegExp]>([
    [{ lr: 0 }, /lr must be a number > 0 that float32 holds \(1\.4e-45 to 3\.4e38\), got 0/],
    [{ lr: 1e-300 }, /lr must be a number > 0 that float32 holds/],
    [{ beta1: 0.9999999999999999 }, /beta1 must be a number in \[0, 1\) \(below 1 as a float32\)/],
    [{ eps: Number.MIN_VALUE }, /eps must be a finite number > 0 \(above 0 as a float32\)/],
    [{ chunkSize: 2 ** 31 }, /chunkSize must be an integer from 1 to 2\^31 - 1/],
    [{ lr: NaN }, /lr must be/],
    [{ minLr: 2e-3 }, /minLr must be a number in \[0, lr=0.001\]/],
    [{ totalSteps: 0 }, /totalSteps must be an integer >= 1/],
    [{ warmupSteps: 11 }, /warmupSteps must be an integer in \[0, totalSteps=10\]/],
    [{ schedule: 'step' as never }, /schedule must be 'cosine', 'linear' or 'constant', got "step"/],
    [{ beta1: 1 }, /beta1 must be a number in \[0, 1\)/],
    [{ beta2: -0.1 }, /beta2 must be a number in \[0, 1\)/],
    [{ eps: 0 }, /eps must be a finite number > 0/],
    [{ weightDecay: -1 }, /weightDecay must be a finite number >= 0/],
    [{ noDecay: ['nope.weight'] }, /noDecay must be an array of the model's parameter names/],
    [{ clipNorm: -1 }, /clipNorm must be a finite number >= 0/],
    [{ gradAccumulation: 1.5 }, /gradAccumulation must be an integer >= 1/],
    [{ mode: 'recurrent' as never }, /mode must be 'parallel' or 'chunkwise'/],
    [{ chunkSize: 0 }, /chunkSize must be an integer from 1 to 2\^31 - 1/],
    [{ seed: 0.5 }, /seed must be a safe integer/],
    [{ checkpointActivations: 'yes' as never }, /checkpointActivations must be a boolean, got "yes"/],
    [{ precision: 'fp16' as never }, /precision must be 'fp32' or 'bf16', got "fp16"/],
    [{ learningRate: 1 }, /unknown option learningRate/],
  ])('rejects %p', (bad, message) => {
    expect(() => new Trainer(model, { lr: 1e-3, totalSteps: 10, ...bad } as TrainerOptions)).toThrow(message);
  });

  test('each option is read once: a getter cannot pass the checks with one value and be used with another', () => {
    let reads = 0;
    const options = { totalSteps: 10 } as TrainerOptions;
    Object.defineProperty(options, 'lr', { get: () => (reads++ === 0 ? 1e-3 : 1e300), enumerable: true });
    const trainer = new Trainer(model, options);
    expect(reads).toBe(1);
    expect(trainer.options.lr).toBe(1e-3);
  });

  test('rejects micro-batch layouts that do not match gradAccumulation', async () => {
    const trainer = new Trainer(model, { lr: 1e-3, totalSteps: 10, gradAccumulation: 2 });
    const batch = tinyData().nextBatch(3);
    await expect(trainer.step(batch)).rejects.toThrow(/3 rows does not split into gradAccumulation=2/);
    await expect(trainer.step([batch, batch, batch])).rejects.toThrow(/got 3 micro-batches but gradAccumulation is 2/);
    expect(trainer.stepCount).toBe(0);
  });
});

describe('Trainer', () => {
  test('drives a tiny model to near-zero loss on repeated text', async () => {
    const model = await tinyModel();
    const data = tinyData();
    const trainer = new Trainer(model, { lr: 1e-2, totalSteps: 150, warmupSteps: 10, weightDecay: 0 });
    let last = Infinity;
    for (let i = 0; i < 150; i++) last = (await trainer.step(data.nextBatch(8))).loss;
    expect(last).toBeLessThan(0.1);
    expect(await trainer.evaluate(data.validationBatches(8))).toBeLessThan(0.1);
    expect(trainer.stepCount).toBe(150);
    expect(trainer.trainingHistory.steps).toHaveLength(150);
    model.dispose();
  });

  test('a step reports the scheduled lr, a gradient norm and a rate; a second concurrent step is refused', async () => {
    const model = await tinyModel();
    const trainer = new Trainer(model, { lr: 1e-3, totalSteps: 10, warmupSteps: 4 });
    const batch = tinyData().nextBatch(4);
    const running = trainer.step(batch);
    await expect(trainer.step(batch)).rejects.toThrow(/still running; await it/);
    await expect(trainer.evaluate([batch])).rejects.toThrow(/still running/);
    const result = await running;
    expect(result).toMatchObject({ step: 1, lr: 2.5e-4 });
    expect(result.loss).toBeGreaterThan(4); // near ln(256) = 5.5 for an untrained byte model
    expect(result.loss).toBeLessThan(8);
    expect(result.gradNorm).toBeGreaterThan(0);
    expect(result.tokensPerSecond).toBeGreaterThan(0);
    expect(trainer.nextLearningRate).toBeCloseTo(5e-4, 15);
    model.dispose();
  });

  test("evaluate (forward + cross-entropy on the worker) agrees with the training pass's loss and with forward's logits", async () => {
    const model = await tinyModel();
    const trainer = new Trainer(model, { lr: 1e-3, totalSteps: 10 });
    const batch = tinyData().nextBatch(4);
    const { loss } = await model.lossAndGradients(batch, { mode: 'parallel' });
    const evaluated = await trainer.evaluate([batch]);
    expect(evaluated).toBeCloseTo(loss, 4);
    expect(evaluated).toBeCloseTo((await referenceLossSum(model, batch.data, batch.shape[0], batch.shape[1], 'parallel', 8)) / (4 * 31), 10);
    model.dispose();
  });

  test("the worker's loss sum equals forward()'s cross-entropy in every mode, past one 16 MiB block of logits", async () => {
    const model = await tinyModel();
    const native = model.native();
    const short = Int32Array.from({ length: 2 * 40 }, (_, i) => (i * 37) % 256);
    for (const mode of ['parallel', 'chunkwise', 'recurrent'] as const) {
      expect(await native.lossSum(short, 2, 40, mode, 16)).toBeCloseTo(await referenceLossSum(model, short, 2, 40, mode, 16), 8);
    }
    // 17000 rows x 256 logits: two blocks.
    const long = Int32Array.from({ length: 17000 }, (_, i) => (i * 7919) % 256);
    expect(await native.lossSum(long, 1, 17000, 'chunkwise', 128)).toBeCloseTo(await referenceLossSum(model, long, 1, 17000, 'chunkwise', 128), 6);
    model.dispose();
  });

  test('gradAccumulation: a split batch matches the same micro-batches passed as a list', async () => {
    const batch = tinyData().nextBatch(8);
    const halves = [0, 1].map((i) => ({ data: batch.data.slice(i * 4 * 32, (i + 1) * 4 * 32), shape: [4, 32] as [number, number] }));
    const losses: number[][] = [];
    for (const input of [batch, halves]) {
      const model = await tinyModel();
      const trainer = new Trainer(model, { lr: 1e-3, totalSteps: 10, gradAccumulation: 2 });
      losses.push([(await trainer.step(input)).loss, (await trainer.step(input)).loss]);
      model.dispose();
    }
    expect(losses[1]).toEqual(losses[0]);
    // Equal-sized micro-batches: the mean of their mean losses is the whole batch's mean loss.
    const single = await tinyModel();
    const first = await new Trainer(single, { lr: 1e-3, totalSteps: 10 }).step(batch);
    expect(first.loss).toBeCloseTo(losses[0][0], 5);
    single.dispose();
  });

  test('resume from a checkpoint continues with bit-identical losses', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-resume-'));
    const options: TrainerOptions = { lr: 5e-3, totalSteps: 12, warmupSteps: 3, mode: 'chunkwise', chunkSize: 8, seed: 9 };

    const model = await tinyModel();
    const data = tinyData();
    const trainer = new Trainer(model, options);
    const uninterrupted: number[] = [];
    for (let i = 0; i < 12; i++) uninterrupted.push((await trainer.step(data.nextBatch(4))).loss);
    model.dispose();

    const first = await tinyModel();
    const firstData = tinyData();
    const summary = await new Trainer(first, options).fit(firstData, { batchSize: 4, steps: 5, checkpointDir: path.join(dir, 'ckpt') });
    expect(summary).toMatchObject({ startStep: 0, endStep: 5, stepsRun: 5, aborted: false });
    first.dispose();

    const resumed = await Trainer.resume(path.join(dir, 'ckpt'));
    const resumedData = tinyData();
    resumedData.setState(resumed.datasetState!);
    expect(resumed.trainer.stepCount).toBe(5);
    expect(resumed.trainer.trainingHistory.steps.map((s) => s.loss)).toEqual(uninterrupted.slice(0, 5));
    const after: number[] = [];
    for (let i = 5; i < 12; i++) after.push((await resumed.trainer.step(resumedData.nextBatch(4))).loss);
    expect(after).toEqual(uninterrupted.slice(5));
    resumed.model.dispose();
    fs.rmSync(dir, { recursive: true });
  });

  test('fit evaluates and checkpoints on schedule, reports progress, and an abort stops after the step', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-fit-'));
    const model = await tinyModel();
    const trainer = new Trainer(model, { lr: 5e-3, totalSteps: 20 });
    const controller = new AbortController();
    const kinds: string[] = [];
    const summary = await trainer.fit(tinyData(), {
      batchSize: 4,
      evalEvery: 2,
      checkpointEvery: 3,
      checkpointDir: path.join(dir, 'run'),
      signal: controller.signal,
      onProgress: (p) => {
        kinds.push(`${p.kind}@${p.step}`);
        if (p.kind === 'step' && p.step === 4) controller.abort();
      },
    });
    expect(kinds).toEqual(['step@1', 'step@2', 'eval@2', 'step@3', 'checkpoint@3', 'step@4', 'eval@4', 'checkpoint@4']);
    expect(summary).toMatchObject({ startStep: 0, endStep: 4, stepsRun: 4, aborted: true });
    expect(trainer.trainingHistory.validation.map((v) => v.step)).toEqual([2, 4]);
    const saved = JSON.parse(fs.readFileSync(path.join(dir, 'run', 'trainer.json'), 'utf8'));
    expect(saved.step).toBe(4);
    expect(saved.dataset.batchesDrawn).toBe(4);
    await expect(trainer.fit(tinyData(), { batchSize: 0 })).rejects.toThrow(/batchSize must be an integer >= 1/);
    await expect(trainer.fit(tinyData(), { chekpointDir: dir } as never)).rejects.toThrow('invalid fit option: unknown option chekpointDir');
    await expect(trainer.fit(tinyData(), { signal: { aborted: 'yes' } } as never)).rejects.toThrow('invalid fit option: signal must be an AbortSignal');
    await expect(trainer.fit(null as never, {})).rejects.toThrow('fit: the first argument must be a Dataset');
    expect(() => Dataset.fromText('text', null as never)).toThrow('Dataset.fromText: options must be an object with seqLen');
    model.dispose();
    fs.rmSync(dir, { recursive: true });
  });
});

test('fit saves the run up to a step that fails (a non-finite gradient) before the error goes up', async () => {
  const model = await tinyModel();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-diverge-'));
  try {
    // An lr this large blows the weights up within a few steps; the native step then refuses.
    const trainer = new Trainer(model, { lr: 1e6, clipNorm: 0, totalSteps: 50, warmupSteps: 0, schedule: 'constant' });
    const failure = trainer.fit(tinyData(), { batchSize: 4, checkpointDir: path.join(dir, 'ck') });
    await expect(failure).rejects.toThrow(/gradient norm is not finite; parameters left unchanged; the run up to step \d+ is saved in /);
    const resumed = await Trainer.resume(path.join(dir, 'ck'));
    expect(resumed.trainer.stepCount).toBe(trainer.stepCount);
    expect(trainer.stepCount).toBeGreaterThan(0);
    resumed.model.dispose();
  } finally {
    model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an update that makes the weights non-finite fails its step and every later one, and no save writes those weights', async () => {
  const model = await tinyModel();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-overflow-'));
  try {
    await model.save(path.join(dir, 'saved'));
    const before = fs.readFileSync(path.join(dir, 'saved', 'model.safetensors'));
    // lr / (1 - beta1) is past the float range: the first update overflows.
    const trainer = new Trainer(model, { lr: 1e38, totalSteps: 10, warmupSteps: 0, schedule: 'constant' });
    const data = tinyData();
    await expect(trainer.step(data.nextBatch(4))).rejects.toThrow(
      "step 1's update made the parameters non-finite (is the learning rate too large?); load the last checkpoint",
    );
    await expect(trainer.step(data.nextBatch(4))).rejects.toThrow("the parameters are non-finite since step 1's update");
    await expect(model.save(path.join(dir, 'saved'))).rejects.toThrow(/RetNet\.save: tensor "[^"]+" has a non-finite value \((NaN|-?Infinity)\) at flat index \d+; nothing was written/);
    expect(fs.readFileSync(path.join(dir, 'saved', 'model.safetensors')).equals(before)).toBe(true);
    expect(fs.readdirSync(dir)).toEqual(['saved']);
  } finally {
    model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a new Trainer on a model starts fresh AdamW moments; the previous one can no longer step; its checkpoints resume', async () => {
  const model = await tinyModel();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-phase2-'));
  try {
    const data = tinyData();
    const first = new Trainer(model, { lr: 1e-3, totalSteps: 100 });
    for (let i = 0; i < 3; i++) await first.step(data.nextBatch(2));
    const second = new Trainer(model, { lr: 1e-4, totalSteps: 10 });
    await expect(first.step(data.nextBatch(2))).rejects.toThrow('Trainer.step: a newer Trainer on this model has taken over its optimizer');
    // From fresh moments: the same step as a model with these weights and no optimizer history.
    const copy = await RetNet.fromStateDict(model.config, model.stateDict());
    const fresh = new Trainer(copy, { lr: 1e-4, totalSteps: 10 });
    const batch = data.nextBatch(2);
    const [a, b] = [await second.step(batch), await fresh.step(batch)];
    expect(a.loss).toBe(b.loss);
    expect(Array.from(model.stateDict().get('layers.0.ffn.fc1.weight')!)).toEqual(Array.from(copy.stateDict().get('layers.0.ffn.fc1.weight')!));
    copy.dispose();
    await second.fit(data, { batchSize: 2, steps: 3, checkpointDir: path.join(dir, 'ck') });
    const resumed = await Trainer.resume(path.join(dir, 'ck'));
    expect(resumed.trainer.stepCount).toBe(3);
    resumed.model.dispose();
  } finally {
    model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
