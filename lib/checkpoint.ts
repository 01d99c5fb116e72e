// Training checkpoints: one directory holding
//   config.json + model.safetensors   the model, as RetNet.save writes it (RetNet.load reads it)
//   optimizer.safetensors             AdamW moments m and v (flat, native order) and the step count
//   trainer.json                      step, trainer options, dataset position, loss history
//
// A checkpoint replaces the previous one as a whole: it is written into `<dir>.retnet-tmp`, then
// the old directory moves to `<dir>.retnet-old`, the new one moves into place and the old one is
// deleted. A crash at any point leaves either the old or the new checkpoint complete, and
// recoverCheckpoint() (run by every save and load) puts it back at `<dir>`.
//
// Nothing else is ever replaced or removed: a save refuses a `<dir>` holding anything but
// checkpoint files, and recovery touches only sibling directories of checkpoint files.
//
// Saves, loads and recoveries of one `<dir>` take turns: each holds `<dir>.retnet-lock` (its
// process id) while it runs, and waits for a live holder (another process, or another call in
// this one) to finish. Without it a load's recovery removed a running save's temp directory,
// and a load could read one save's trainer.json with the next save's weights.

import { constants as fsConstants, promises as fsp } from 'fs';
import * as path from 'path';

import type { Dataset, DatasetState } from './dataset';
import { CHECKPOINT_TRAINER_FILE, RetNet } from './model';
import { REPLACE_JOURNAL, openSafetensors, safetensorsWriter, writeFileAtomic } from './safetensors';
import type { ResolvedTrainerOptions, Trainer, TrainingHistory } from './trainer';

export const OPTIMIZER_FILE = 'optimizer.safetensors';
/** Written last: its presence marks a complete checkpoint. */
export const TRAINER_FILE = CHECKPOINT_TRAINER_FILE;

const FORMAT = 'retnet-training-checkpoint';
const FORMAT_VERSION = 1;

export interface TrainerCheckpointState {
  format: typeof FORMAT;
  version: number;
  step: number;
  options: ResolvedTrainerOptions;
  dataset: DatasetState | undefined;
  history: TrainingHistory;
}

export interface LoadedCheckpoint {
  model: RetNet;
  state: TrainerCheckpointState;
  optimizer: { step: number; m: Float32Array; v: Float32Array };
}

/** A checkpoint's files, and the journal a crash can leave of the model's save (writeFilesAtomic). */
const CHECKPOINT_FILES = new Set(['config.json', 'model.safetensors', OPTIMIZER_FILE, TRAINER_FILE, REPLACE_JOURNAL]);
/** What writeFileAtomic leaves of a checkpoint file when a crash interrupts it. */
const PARTIAL_FILE = /^\.(config\.json|model\.safetensors|optimizer\.safetensors|trainer\.json|\.retnet-replace\.json)\.\d+\.[0-9a-f]+\.tmp$/;

const LOCK_WAIT_MS = 120_000;
/** A lock file still empty after this long was left by a process that died creating it. */
const EMPTY_LOCK_STALE_MS = 10_000;

/**
 * Who holds `lock`: a live process id (-1 while its holder is still writing it), 'stale' when its
 * holder is gone, 'free' when the lock went away meanwhile.
 */
async function lockHolder(lock: string): Promise<number | 'stale' | 'free'> {
  let text: string;
  let age: number;
  try {
    [text, age] = await Promise.all([fsp.readFile(lock, 'utf8'), fsp.stat(lock).then((s) => Date.now() - s.mtimeMs)]);
  } catch {
    return 'free';
  }
  const pid = Number(text);
  if (text === '' || !Number.isSafeInteger(pid) || pid <= 0) return age < EMPTY_LOCK_STALE_MS ? -1 : 'stale';
  try {
    process.kill(pid, 0);
    return pid;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM' ? pid : 'stale';
  }
}

/** Creates `file` holding this process's id; false when it already exists. */
async function createPidFile(file: string): Promise<boolean> {
  let handle;
  try {
    handle = await fsp.open(file, 'wx');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
  try {
    await handle.writeFile(String(process.pid));
  } finally {
    await handle.close();
  }
  return true;
}

/**
 * Runs `work` holding `<dir>.retnet-lock`, after waiting for a live holder to let it go. A
 * reader that cannot create the lock (a read-only or missing parent) reads without it: no
 * save can be running there either.
 */
async function withCheckpointLock<T>(dir: string, what: string, work: () => Promise<T>, forWrite: boolean): Promise<T> {
  const lock = `${path.resolve(dir)}.retnet-lock`;
  if (forWrite) await fsp.mkdir(path.dirname(lock), { recursive: true });
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      if (await createPidFile(lock)) break;
    } catch (e) {
      if (!forWrite) return work();
      throw new Error(`${what}: cannot create ${lock}: ${(e as Error).message}`);
    }
    const holder = await lockHolder(lock);
    if (holder === 'free') continue;
    if (holder === 'stale') {
      await fsp.rm(lock, { force: true });
    } else if (Date.now() > deadline) {
      throw new Error(`${what}: ${dir} is still in use by ${holder > 0 ? `process ${holder}` : 'another process'} (${lock}) after ${LOCK_WAIT_MS / 1000} s`);
    } else {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
  try {
    return await work();
  } finally {
    await fsp.rm(lock, { force: true });
  }
}

function siblings(dir: string): { temp: string; old: string } {
  const resolved = path.resolve(dir);
  return { temp: `${resolved}.retnet-tmp`, old: `${resolved}.retnet-old` };
}

/**
 * The entries of `location` when it is a directory holding nothing but checkpoint files (or
 * partial writes of them; an empty directory counts), else undefined: the only kind a save may
 * replace or a recovery remove.
 */
async function checkpointFiles(location: string): Promise<string[] | undefined> {
  try {
    const entries = await fsp.readdir(location, { withFileTypes: true });
    const ours = entries.every((e) => e.isFile() && (CHECKPOINT_FILES.has(e.name) || PARTIAL_FILE.test(e.name)));
    return ours ? entries.map((e) => e.name) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Throws unless a checkpoint can be written to `dir`: it is absent, with a parent directory
 * this process can write (made here if missing), or an empty directory, or a checkpoint (a
 * trainer.json among checkpoint files only). A saved model's directory (config.json and weights
 * without trainer.json) is not replaced.
 */
export async function checkCheckpointTarget(dir: string): Promise<void> {
  const target = path.resolve(dir);
  const stat = await fsp.stat(target).catch(() => undefined);
  if (stat === undefined) {
    const parent = path.dirname(target);
    try {
      await fsp.mkdir(parent, { recursive: true });
      await fsp.access(parent, fsConstants.W_OK);
    } catch (e) {
      throw new Error(`checkpoint: cannot write ${target}: ${(e as Error).message}`);
    }
    return;
  }
  if (!stat.isDirectory()) throw new Error(`checkpoint: ${target} is a file, not a checkpoint directory; refusing to replace it`);
  const names = await checkpointFiles(target);
  if (names?.length === 0) return;
  if (names === undefined || !names.includes(TRAINER_FILE)) {
    throw new Error(
      `checkpoint: ${target} holds files that are not a training checkpoint (a saved model, or other work); ` +
        'refusing to replace it: choose an empty or new directory',
    );
  }
}

/**
 * Claims `dir` for one training run until the returned release is called: `<dir>.retnet-run`
 * holds this process's id, and a second run (fresh or resumed) on the same directory is
 * refused while that process lives. The save lock only makes single saves take turns; two runs
 * sharing a directory replaced each other's checkpoints.
 */
export async function claimTrainingRun(dir: string): Promise<() => Promise<void>> {
  const claim = `${path.resolve(dir)}.retnet-run`;
  const unwritable = (e: unknown) => new Error(`checkpoint: cannot write ${path.resolve(dir)}: ${(e as Error).message}`);
  await fsp.mkdir(path.dirname(claim), { recursive: true }).catch((e) => {
    throw unwritable(e);
  });
  for (;;) {
    const created = await createPidFile(claim).catch((e) => {
      throw unwritable(e);
    });
    if (created) return () => fsp.rm(claim, { force: true });
    const holder = await lockHolder(claim);
    if (holder === 'stale') {
      await fsp.rm(claim, { force: true });
    } else if (holder !== 'free') {
      throw new Error(
        `train: ${dir} is in use by another training run (${holder > 0 ? `process ${holder}` : 'a process starting'}, ${claim}); ` +
          'wait for it to end, or choose another --out',
      );
    }
  }
}

/**
 * Moves the checkpoint in `dir` (after recovering an interrupted save, whose files would
 * otherwise be put back and then replaced by the next save) to `<dir>.replaced-<time>`, for a
 * fresh run that will write there. A directory of checkpoint files counts as a checkpoint
 * whether or not its trainer.json still reads. Returns where it went and its step, if it had
 * one.
 */
export async function moveCheckpointAside(dir: string): Promise<{ aside: string; step: number | undefined } | undefined> {
  return withCheckpointLock(
    dir,
    'moveCheckpointAside',
    async () => {
      await recover(dir);
      const names = await checkpointFiles(path.resolve(dir));
      if (names === undefined || !names.includes(TRAINER_FILE)) return undefined;
      const step = await checkpointStep(dir);
      const aside = `${path.resolve(dir)}.replaced-${new Date().toISOString().replace(/[:.]/g, '-')}`;
      await fsp.rename(path.resolve(dir), aside);
      return { aside, step };
    },
    true,
  );
}

/** The step of the checkpoint in `dir`, or undefined where there is none. */
export async function checkpointStep(dir: string): Promise<number | undefined> {
  try {
    const state = JSON.parse(await fsp.readFile(path.join(path.resolve(dir), TRAINER_FILE), 'utf8')) as Partial<TrainerCheckpointState>;
    return state?.format === FORMAT && Number.isSafeInteger(state.step) ? state.step : undefined;
  } catch {
    return undefined;
  }
}

async function exists(location: string): Promise<boolean> {
  return fsp.stat(location).then(
    () => true,
    () => false,
  );
}

/** Makes renames inside `dir` durable (directories cannot be fsynced on every platform). */
async function syncDirectory(dir: string): Promise<void> {
  let handle;
  try {
    handle = await fsp.open(dir, 'r');
    await handle.sync();
  } catch {
    // Best effort: without directory fsync a power loss may lose the rename, never the data.
  } finally {
    await handle?.close();
  }
}

/**
 * Restores `<dir>` after an interrupted save: a complete `<dir>.retnet-tmp` wins (it is the newer
 * checkpoint), then `<dir>.retnet-old`; leftovers next to a present `<dir>` are removed. A
 * sibling holding anything but checkpoint files is left alone.
 */
export async function recoverCheckpoint(dir: string): Promise<void> {
  await withCheckpointLock(dir, 'recoverCheckpoint', () => recover(dir), false);
}

async function recover(dir: string): Promise<void> {
  const target = path.resolve(dir);
  const { temp, old } = siblings(dir);
  const tempIsOurs = (await checkpointFiles(temp)) !== undefined;
  const oldIsOurs = (await checkpointFiles(old)) !== undefined;
  if (!(await exists(target))) {
    if (tempIsOurs && (await exists(path.join(temp, TRAINER_FILE)))) await fsp.rename(temp, target);
    else if (oldIsOurs && (await exists(path.join(old, TRAINER_FILE)))) await fsp.rename(old, target);
  }
  if (tempIsOurs) await fsp.rm(temp, { recursive: true, force: true });
  if (oldIsOurs) await fsp.rm(old, { recursive: true, force: true });
  await syncDirectory(path.dirname(target));
}

/**
 * Writes a checkpoint of `model`, the trainer's optimizer and history, and the dataset position
 * to `dir`, replacing any previous checkpoint there only once the new one is complete.
 */
export async function saveCheckpoint(dir: string, parts: { model: RetNet; trainer: Trainer; dataset?: Dataset }): Promise<void> {
  const { model, trainer, dataset } = parts;
  if (trainer.model !== model) throw new Error('saveCheckpoint: the trainer belongs to a different model');
  // The trainer stays locked throughout, so no step can land between the weights and the moments.
  await trainer.exclusive('saveCheckpoint', () => withCheckpointLock(dir, 'saveCheckpoint', async () => {
    const version = model.native().weightVersion();
    const optimizer = await trainer.optimizerState();
    const state: TrainerCheckpointState = {
      format: FORMAT,
      version: FORMAT_VERSION,
      step: trainer.stepCount,
      options: trainer.options,
      dataset: dataset?.getState(),
      history: trainer.trainingHistory,
    };
    // Written from the two moments as they are, not first joined into one buffer of their size.
    const optimizerFile = safetensorsWriter(
      [
        { name: 'm', shape: [optimizer.m.length] },
        { name: 'v', shape: [optimizer.v.length] },
      ],
      (name) => (name === 'm' ? optimizer.m : optimizer.v),
      { format: FORMAT, step: String(optimizer.step) },
    );
    const trainerFile = Buffer.from(JSON.stringify(state, null, 1) + '\n');

    const target = path.resolve(dir);
    const { temp, old } = siblings(dir);
    await fsp.mkdir(path.dirname(target), { recursive: true });
    await recover(dir);
    await checkCheckpointTarget(dir);
    // Recovery removed the siblings this library leaves; one still there is someone else's.
    for (const sibling of [temp, old]) {
      if (await exists(sibling)) throw new Error(`saveCheckpoint: ${sibling} is in the way (not a checkpoint this library left); move it away`);
    }
    try {
      await fsp.mkdir(temp);
      await model.save(temp);
      // Weights and moments of one moment: setParam or another trainer's work may not land between.
      if (model.native().weightVersion() !== version) throw new Error('saveCheckpoint: the weights changed while saving; nothing was replaced');
      await writeFileAtomic(path.join(temp, OPTIMIZER_FILE), optimizerFile);
      await writeFileAtomic(path.join(temp, TRAINER_FILE), trainerFile);
      await syncDirectory(temp);
    } catch (e) {
      await fsp.rm(temp, { recursive: true, force: true }).catch(() => undefined);
      throw e;
    }
    if (await exists(target)) await fsp.rename(target, old);
    await fsp.rename(temp, target);
    await syncDirectory(path.dirname(target));
    await fsp.rm(old, { recursive: true, force: true });
  }, true));
}

/** Reads a checkpoint directory (recovering an interrupted save first). */
export async function loadCheckpoint(dir: string): Promise<LoadedCheckpoint> {
  return withCheckpointLock(dir, 'loadCheckpoint', () => load(dir), false);
}

async function load(dir: string): Promise<LoadedCheckpoint> {
  await recover(dir);
  const target = path.resolve(dir);
  const trainerPath = path.join(target, TRAINER_FILE);
  let state: TrainerCheckpointState;
  try {
    state = JSON.parse(await fsp.readFile(trainerPath, 'utf8')) as TrainerCheckpointState;
  } catch (e) {
    throw new Error(`loadCheckpoint: cannot read ${trainerPath} (${(e as Error).message})`);
  }
  if (state?.format !== FORMAT || state.version !== FORMAT_VERSION) {
    throw new Error(`loadCheckpoint: ${trainerPath} is not a version ${FORMAT_VERSION} ${FORMAT}`);
  }
  const { history } = state;
  if (!Number.isSafeInteger(state.step) || state.step < 0 || state.options === null || typeof state.options !== 'object' ||
      history === null || typeof history !== 'object' || !Array.isArray(history.steps) || !Array.isArray(history.validation)) {
    throw new Error(`loadCheckpoint: ${trainerPath} is damaged: it needs step (an integer >= 0), options and history { steps, validation }`);
  }
  // Each record as the trainer writes it (a non-finite number comes back from JSON as null).
  const isRecord = (r: unknown, fields: string[]): boolean =>
    r !== null && typeof r === 'object' && Number.isSafeInteger((r as Record<string, unknown>).step) &&
    fields.every((f) => typeof (r as Record<string, unknown>)[f] === 'number' || (r as Record<string, unknown>)[f] === null);
  const badStep = history.steps.findIndex((r) => !isRecord(r, ['loss', 'lr', 'gradNorm']));
  const badEval = history.validation.findIndex((r) => !isRecord(r, ['loss']));
  if (badStep >= 0 || badEval >= 0) {
    const [where, index, record] = badStep >= 0 ? ['steps', badStep, history.steps[badStep]] : ['validation', badEval, history.validation[badEval]];
    throw new Error(`loadCheckpoint: ${trainerPath} is damaged: history.${where}[${index}] is ${JSON.stringify(record)}, not a { step, loss${where === 'steps' ? ', lr, gradNorm' : ''} } record`);
  }
  const optimizerPath = path.join(target, OPTIMIZER_FILE);
  // Each moment read straight from the file into its own array (no copy of the whole file).
  const reader = await openSafetensors(optimizerPath);
  let optimizer: LoadedCheckpoint['optimizer'];
  try {
    const [mShape, vShape] = [reader.shapes.get('m'), reader.shapes.get('v')];
    const step = Number(reader.metadata.step);
    if (!mShape || !vShape || mShape.length !== 1 || vShape.length !== 1 || mShape[0] !== vShape[0] ||
        !Number.isSafeInteger(step) || step !== state.step) {
      throw new Error(`loadCheckpoint: ${optimizerPath} needs tensors m and v of equal length and step ${state.step}`);
    }
    optimizer = { step, m: await reader.read('m'), v: await reader.read('v') };
  } finally {
    await reader.close();
  }
  const model = await RetNet.load(target);
  return { model, state, optimizer };
}
