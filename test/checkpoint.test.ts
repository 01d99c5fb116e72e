import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { OPTIMIZER_FILE, TRAINER_FILE, loadCheckpoint, recoverCheckpoint, saveCheckpoint } from '../lib/checkpoint';
import { Dataset } from '../lib/dataset';
import { RetNet } from '../lib/model';
import { Trainer, TrainerOptions } from '../lib/trainer';

const TINY = {
  vocab_size: 256,
  decoder_embed_dim: 32,
  decoder_value_embed_dim: 32,
  decoder_retention_heads: 1,
  decoder_ffn_embed_dim: 64,
  decoder_layers: 1,
};
const TEXT = 'pack my box with five dozen liquor jugs. '.repeat(20);
const OPTIONS: TrainerOptions = { lr: 5e-3, totalSteps: 10, seed: 4 };

let workDir: string;
beforeEach(() => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-ckpt-'));
});
afterEach(() => {
  jest.restoreAllMocks();
  fs.rmSync(workDir, { recursive: true, force: true });
});

function data(): Dataset {
  return Dataset.fromText(TEXT, { seqLen: 16, validationFraction: 0, seed: 2 });
}

/** A trainer after `steps` steps on the tiny data. */
async function trained(steps: number): Promise<{ model: RetNet; trainer: Trainer; dataset: Dataset }> {
  const model = await RetNet.create(TINY, { seed: 3 });
  const trainer = new Trainer(model, OPTIONS);
  const dataset = data();
  for (let i = 0; i < steps; i++) await trainer.step(dataset.nextBatch(4));
  return { model, trainer, dataset };
}

/** Losses of `steps` further steps after resuming from `dir`. */
async function lossesAfterResume(dir: string, steps: number): Promise<number[]> {
  const { model, trainer, datasetState } = await Trainer.resume(dir);
  const dataset = data();
  dataset.setState(datasetState!);
  const losses: number[] = [];
  for (let i = 0; i < steps; i++) losses.push((await trainer.step(dataset.nextBatch(4))).loss);
  model.dispose();
  return losses;
}

test('a checkpoint directory holds the model (loadable by RetNet.load), the optimizer and the trainer state', async () => {
  const { model, trainer, dataset } = await trained(3);
  const dir = path.join(workDir, 'ckpt');
  const batch = dataset.nextBatch(4);
  const saving = saveCheckpoint(dir, { model, trainer, dataset });
  await expect(trainer.step(batch)).rejects.toThrow(/checkpoint is still running/);
  await saving;
  expect(fs.readdirSync(dir).sort()).toEqual(['config.json', 'model.safetensors', OPTIMIZER_FILE, TRAINER_FILE]);
  expect(fs.readdirSync(workDir)).toEqual(['ckpt']);

  const loaded = await RetNet.load(dir);
  const probe = [[1, 2, 3, 4, 5]];
  expect((await loaded.forward(probe)).logits).toEqual((await model.forward(probe)).logits);
  loaded.dispose();

  const checkpoint = await loadCheckpoint(dir);
  expect(checkpoint.state).toMatchObject({ step: 3, dataset: dataset.getState(), options: trainer.options });
  expect(checkpoint.optimizer.step).toBe(3);
  const live = await trainer.optimizerState();
  // Arrays made by the addon come from another realm than jest's, so compare the values.
  expect(Array.from(checkpoint.optimizer.m)).toEqual(Array.from(live.m));
  expect(Array.from(checkpoint.optimizer.v)).toEqual(Array.from(live.v));
  checkpoint.model.dispose();
  model.dispose();
});

test('a save that fails half-way leaves the previous checkpoint loadable and resumable', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(2);
  await saveCheckpoint(dir, run);
  const expected = await lossesAfterResume(dir, 3);
  for (let i = 0; i < 2; i++) await run.trainer.step(run.dataset.nextBatch(4));

  // Fail the write of the optimizer file: the model files of the new checkpoint are already in the temp dir.
  const realOpen = fs.promises.open;
  const open = jest.spyOn(fs.promises, 'open').mockImplementation((file, ...rest) => {
    if (String(file).includes(OPTIMIZER_FILE)) return Promise.reject(new Error('injected disk failure'));
    return realOpen(file, ...rest);
  });
  await expect(saveCheckpoint(dir, run)).rejects.toThrow('injected disk failure');
  expect(open).toHaveBeenCalled();
  open.mockRestore();

  expect(fs.readdirSync(workDir)).toEqual(['ckpt']);
  const loaded = await RetNet.load(dir);
  loaded.dispose();
  const previous = await loadCheckpoint(dir);
  expect(previous.state.step).toBe(2);
  previous.model.dispose();
  expect(await lossesAfterResume(dir, 3)).toEqual(expected);
  run.model.dispose();
});

test('recovery after a crash: a partial temp dir is dropped, the old checkpoint comes back', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(2);
  await saveCheckpoint(dir, run);
  const expected = await lossesAfterResume(dir, 2);

  // The state a crash between the two renames leaves: the old checkpoint moved aside, an incomplete new one.
  fs.renameSync(dir, `${dir}.retnet-old`);
  fs.mkdirSync(`${dir}.retnet-tmp`);
  fs.copyFileSync(path.join(`${dir}.retnet-old`, 'config.json'), path.join(`${dir}.retnet-tmp`, 'config.json'));
  fs.writeFileSync(path.join(`${dir}.retnet-tmp`, 'model.safetensors'), Buffer.alloc(100));

  expect(await lossesAfterResume(dir, 2)).toEqual(expected);
  expect(fs.readdirSync(workDir)).toEqual(['ckpt']);
  run.model.dispose();
});

test('recovery after a crash: a complete temp dir (the newer checkpoint) is promoted', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(1);
  await saveCheckpoint(dir, run);
  await run.trainer.step(run.dataset.nextBatch(4));
  await saveCheckpoint(path.join(workDir, 'newer'), run);
  const expected = await lossesAfterResume(path.join(workDir, 'newer'), 2);

  // Crash after the old checkpoint moved aside and the new one was complete, before it moved in.
  fs.renameSync(dir, `${dir}.retnet-old`);
  fs.renameSync(path.join(workDir, 'newer'), `${dir}.retnet-tmp`);
  await recoverCheckpoint(dir);
  expect(fs.readdirSync(workDir)).toEqual(['ckpt']);
  const promoted = await loadCheckpoint(dir);
  expect(promoted.state.step).toBe(2);
  promoted.model.dispose();
  expect(await lossesAfterResume(dir, 2)).toEqual(expected);
  run.model.dispose();
});

test('clear errors for a missing or foreign checkpoint', async () => {
  await expect(loadCheckpoint(path.join(workDir, 'none'))).rejects.toThrow(/cannot read .*trainer\.json/);
  const dir = path.join(workDir, 'foreign');
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, TRAINER_FILE), '{"format":"other"}');
  await expect(loadCheckpoint(dir)).rejects.toThrow(/is not a version 1 retnet-training-checkpoint/);
  const { model, trainer } = await trained(0);
  const other = await RetNet.create(TINY);
  await expect(saveCheckpoint(dir, { model: other, trainer })).rejects.toThrow(/different model/);
  other.dispose();
  model.dispose();
});

test('a save refuses a directory holding anything but checkpoint files, and a file', async () => {
  const run = await trained(1);
  const dir = path.join(workDir, 'runs');
  fs.mkdirSync(path.join(dir, 'other-run'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'notes.txt'), 'mine');
  await expect(saveCheckpoint(dir, run)).rejects.toThrow(/holds files that are not a training checkpoint .*; refusing to replace it/);
  expect(fs.readdirSync(dir).sort()).toEqual(['notes.txt', 'other-run']);
  const file = path.join(workDir, 'mymodel.safetensors');
  fs.writeFileSync(file, 'a saved model');
  await expect(saveCheckpoint(file, run)).rejects.toThrow(/is a file, not a checkpoint directory; refusing to replace it/);
  expect(fs.readFileSync(file, 'utf8')).toBe('a saved model');
  // fit() checks before its first step.
  await expect(run.trainer.fit(data(), { steps: 3, batchSize: 4, checkpointDir: dir })).rejects.toThrow(/refusing to replace it/);
  expect(run.trainer.stepCount).toBe(1);
  // Nor a saved model's directory (its config.json and weights are checkpoint file names).
  const saved = path.join(workDir, 'saved-model');
  await run.model.save(saved);
  await expect(saveCheckpoint(saved, run)).rejects.toThrow(/not a training checkpoint/);
  expect(fs.readdirSync(saved).sort()).toEqual(['config.json', 'model.safetensors']);
  // A path under a file cannot be written: fit says so before its first step.
  await expect(run.trainer.fit(data(), { steps: 3, batchSize: 4, checkpointDir: path.join(file, 'run') })).rejects.toThrow(/cannot write .*mymodel\.safetensors\/run/);
  expect(run.trainer.stepCount).toBe(1);
  // An empty directory, or a checkpoint, is replaced.
  fs.mkdirSync(path.join(workDir, 'empty'));
  await saveCheckpoint(path.join(workDir, 'empty'), run);
  await saveCheckpoint(path.join(workDir, 'empty'), run);
  expect(fs.readdirSync(path.join(workDir, 'empty')).sort()).toEqual(['config.json', 'model.safetensors', OPTIMIZER_FILE, TRAINER_FILE].sort());
  run.model.dispose();
});

test("saving and loading leave the user's own <dir>.old and <dir>.tmp alone", async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(1);
  await saveCheckpoint(dir, run);
  fs.cpSync(dir, `${dir}.old`, { recursive: true }); // a backup
  fs.mkdirSync(`${dir}.tmp`);
  fs.writeFileSync(path.join(`${dir}.tmp`, 'scratch'), 'x');
  // A directory under our sibling's name that is not ours stays too, and stops a save rather than be replaced.
  fs.mkdirSync(`${dir}.retnet-old`);
  fs.writeFileSync(path.join(`${dir}.retnet-old`, 'notes.txt'), 'x');
  await expect(saveCheckpoint(dir, run)).rejects.toThrow(/ckpt\.retnet-old is in the way/);
  (await loadCheckpoint(dir)).model.dispose();
  await recoverCheckpoint(dir);
  expect(fs.readdirSync(workDir).sort()).toEqual(['ckpt', 'ckpt.old', 'ckpt.retnet-old', 'ckpt.tmp']);
  fs.rmSync(`${dir}.retnet-old`, { recursive: true });
  await saveCheckpoint(dir, run);
  expect(fs.readdirSync(workDir).sort()).toEqual(['ckpt', 'ckpt.old', 'ckpt.tmp']);
  expect(fs.readdirSync(`${dir}.old`).length).toBe(4);
  run.model.dispose();
});

test('a trainer.json missing its history is a named error', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(1);
  await saveCheckpoint(dir, run);
  const file = path.join(dir, TRAINER_FILE);
  const state = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const damaged of [{ ...state, history: undefined }, { ...state, history: { steps: 5, validation: [] } }, { ...state, step: -1 }]) {
    fs.writeFileSync(file, JSON.stringify(damaged));
    await expect(Trainer.resume(dir)).rejects.toThrow(/trainer\.json is damaged: it needs step \(an integer >= 0\), options and history/);
  }
  fs.writeFileSync(file, JSON.stringify({ ...state, history: { steps: [null, 5], validation: [] } }));
  await expect(Trainer.resume(dir)).rejects.toThrow(/trainer\.json is damaged: history\.steps\[0\] is null, not a \{ step, loss, lr, gradNorm \} record/);
  fs.writeFileSync(file, JSON.stringify({ ...state, history: { steps: state.history.steps, validation: [{ step: 1, loss: 'low' }] } }));
  await expect(Trainer.resume(dir)).rejects.toThrow(/history\.validation\[0\] is \{"step":1,"loss":"low"\}, not a \{ step, loss \} record/);
  // A diverged step's NaN loss is written as null and reads back.
  fs.writeFileSync(file, JSON.stringify({ ...state, history: { steps: [{ ...state.history.steps[0], loss: null }], validation: [] } }));
  const resumed = await Trainer.resume(dir);
  resumed.model.dispose();
  run.model.dispose();
});

test('RetNet.save refuses a checkpoint directory and a config.json that is not a saved model', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(1);
  await saveCheckpoint(dir, run);
  const before = fs.readFileSync(path.join(dir, 'model.safetensors'));
  await expect(run.model.save(dir)).rejects.toThrow(/RetNet\.save: .*ckpt is a training checkpoint; new weights there would not match its optimizer state/);
  expect(fs.readFileSync(path.join(dir, 'model.safetensors')).equals(before)).toBe(true);
  const project = path.join(workDir, 'project');
  fs.mkdirSync(project);
  fs.writeFileSync(path.join(project, 'config.json'), '{"name": "not a model"}');
  await expect(run.model.save(project)).rejects.toThrow(/has a config\.json but no model\.safetensors \(not a saved model\); refusing to replace it/);
  expect(fs.readFileSync(path.join(project, 'config.json'), 'utf8')).toBe('{"name": "not a model"}');
  // A saved model's directory is replaced, as before.
  const saved = path.join(workDir, 'saved');
  await run.model.save(saved);
  await run.model.save(saved);
  run.model.dispose();
});

test('loads while fit writes a checkpoint every step wait their turn: the run and every load succeed', async () => {
  const dir = path.join(workDir, 'ckpt');
  const run = await trained(1);
  await saveCheckpoint(dir, run);
  let stop = false;
  const failures: string[] = [];
  let loads = 0;
  const reader = (async () => {
    while (!stop) {
      try {
        const loaded = await loadCheckpoint(dir);
        expect(loaded.optimizer.step).toBe(loaded.state.step);
        loaded.model.dispose();
        loads++;
      } catch (e) {
        failures.push((e as Error).message);
      }
    }
  })();
  await run.trainer.fit(run.dataset, { batchSize: 2, steps: 12, checkpointEvery: 1, checkpointDir: dir });
  stop = true;
  await reader;
  expect(failures).toEqual([]);
  expect(loads).toBeGreaterThan(0);
  expect(fs.readdirSync(workDir).sort()).toEqual(['ckpt']);
  const last = await loadCheckpoint(dir);
  expect(last.state.step).toBe(12);
  last.model.dispose();
  run.model.dispose();
});
