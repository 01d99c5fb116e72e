// `retnet train` (scripts/train.ts) as a user runs it: what it does with what is already on disk.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

const CLI = path.join(__dirname, '..', 'dist', 'scripts', 'cli.js');
const TEXT = 'pack my box with five dozen liquor jugs. '.repeat(40);

let dir: string;
let data: string;
beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-cli-'));
  data = path.join(dir, 'data.txt');
  fs.writeFileSync(data, TEXT);
});
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Runs `retnet train` on the tiny text with a tiny model; returns exit status and stderr. */
function train(...args: string[]): { status: number | null; stderr: string } {
  const tiny = ['--data', data, '--layers', '1', '--dim', '16', '--ffn', '32', '--value-dim', '32', '--batch', '2', '--seq-len', '16', '--eval-every', '0'];
  const run = spawnSync(process.execPath, [CLI, 'train', ...tiny, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: run.status, stderr: run.stderr };
}

function step(checkpoint: string): number {
  return JSON.parse(fs.readFileSync(path.join(checkpoint, 'trainer.json'), 'utf8')).step;
}

test('starting over where a checkpoint is moves that one aside; --resume past its end leaves it as it was', () => {
  const out = path.join(dir, 'run');
  expect(train('--steps', '6', '--out', out).status).toBe(0);
  const again = train('--steps', '3', '--out', out);
  expect(again.status).toBe(0);
  const aside = fs.readdirSync(dir).filter((n) => n.startsWith('run.replaced-'));
  expect(aside).toHaveLength(1);
  expect(again.stderr).toContain(`moved the checkpoint already in ${out} (step 6) to ${out}.replaced-`);
  expect([step(path.join(dir, aside[0])), step(out)]).toEqual([6, 3]);
  const done = train('--resume', '--steps', '2', '--lr', '5', '--out', out);
  expect(done.status).toBe(0);
  expect(done.stderr).toContain('ignoring --layers, --dim, --ffn, --value-dim, --seq-len, --lr');
  expect(done.stderr).toContain('no steps to run: the checkpoint is already at step 3 of 2; it is left as it was');
  expect(JSON.parse(fs.readFileSync(path.join(out, 'trainer.json'), 'utf8')).options.totalSteps).toBe(3);
});

test('starting over also moves aside a checkpoint an interrupted save left, and one whose trainer.json no longer reads', () => {
  const out = path.join(dir, 'run');
  expect(train('--steps', '6', '--out', out).status).toBe(0);
  // A crash between a save's two renames leaves only <out>.retnet-old.
  fs.renameSync(out, `${out}.retnet-old`);
  const fresh = train('--steps', '2', '--out', out);
  expect(fresh.status).toBe(0);
  expect(fresh.stderr).toContain(`moved the checkpoint already in ${out} (step 6) to ${out}.replaced-`);
  const aside = fs.readdirSync(dir).filter((n) => n.startsWith('run.replaced-'));
  expect([step(path.join(dir, aside[0])), step(out)]).toEqual([6, 2]);
  fs.writeFileSync(path.join(out, 'trainer.json'), '{"format": "retnet-train');
  const again = train('--steps', '1', '--out', out);
  expect(again.stderr).toContain(`moved the checkpoint already in ${out} (its trainer.json unreadable) to ${out}.replaced-`);
  expect(fs.readdirSync(dir).filter((n) => n.startsWith('run.replaced-'))).toHaveLength(2);
});

test('a second run on the same --out is refused while the first lives; a claim its holder left behind is taken over', () => {
  const out = path.join(dir, 'run');
  fs.writeFileSync(`${out}.retnet-run`, String(process.pid)); // this process is alive
  const refused = train('--steps', '2', '--out', out);
  expect(refused.status).toBe(1);
  expect(refused.stderr).toContain(`train: ${out} is in use by another training run (process ${process.pid}`);
  expect(fs.existsSync(out)).toBe(false);
  // A process id no process has (Linux pids stay below 2^22).
  fs.writeFileSync(`${out}.retnet-run`, String(2 ** 22 + 1));
  expect(train('--steps', '2', '--out', out).status).toBe(0);
  expect(fs.existsSync(`${out}.retnet-run`)).toBe(false);
});

test('bad input is refused before training: an empty prompt, a file that is not UTF-8, an --out that cannot be written', () => {
  const fails = (args: string[], message: string) => {
    const run = train(...args);
    expect([run.status, run.stderr]).toEqual([1, expect.stringContaining(message)]);
  };
  fails(['--prompt', '', '--out', path.join(dir, 'a')], 'error: --prompt must not be empty');
  const binary = path.join(dir, 'bin.dat');
  fs.writeFileSync(binary, Buffer.from([0xff, 0xfe, 0x00, 0x41]));
  fails(['--data', binary, '--out', path.join(dir, 'b')], `error: Dataset.fromFiles: ${binary} is not UTF-8 text`);
  // A model shape that cannot be is refused before any data is read.
  const badShape = train('--dim', '18', '--heads', '2', '--value-dim', '18', '--data', binary, '--out', path.join(dir, 'c'));
  expect([badShape.status, badShape.stderr]).toEqual([1, expect.stringContaining('must be even (rotation pairs)')]);
  const file = path.join(dir, 'afile');
  fs.writeFileSync(file, 'x');
  const run = train('--steps', '3', '--out', path.join(file, 'run'));
  expect(run.status).toBe(1);
  expect(run.stderr).toMatch(/error: checkpoint: cannot write .*afile\/run/);
  expect(run.stderr).not.toMatch(/step 1\//);
  expect(fs.readdirSync(dir).sort()).toEqual(['afile', 'bin.dat', 'data.txt']);
});

test('integer flags take decimal digits only, and a step has a size limit', () => {
  for (const [args, message] of [
    [['--steps', '0x4'], '--steps must be an integer >= 1, got 0x4'],
    [['--steps', '1e1'], '--steps must be an integer >= 1, got 1e1'],
    [['--batch', '100000000000'], '--batch x --seq-len must be at most 16777216 tokens a step, got 100000000000 x 16'],
  ] as const) {
    const run = train(...args, '--out', path.join(dir, 'x'));
    expect([run.status, run.stderr]).toEqual([1, expect.stringContaining(message)]);
  }
});

test('--resume on other data is refused, leaving the checkpoint as it was', () => {
  const out = path.join(dir, 'run');
  expect(train('--steps', '2', '--out', out).status).toBe(0);
  const saved = fs.readFileSync(path.join(out, 'model.safetensors'));
  const other = path.join(dir, 'other.txt');
  fs.writeFileSync(other, TEXT.toUpperCase());
  const run = spawnSync(process.execPath, [CLI, 'train', '--resume', '--out', out, '--steps', '4', '--batch', '2', '--eval-every', '0', '--data', other], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  expect([run.status, run.stderr]).toEqual([1, expect.stringContaining('Dataset.setState: the state is for other data')]);
  expect(fs.readFileSync(path.join(out, 'model.safetensors')).equals(saved)).toBe(true);
  expect(step(out)).toBe(2);
});

test('retnet serve checks its flags before it loads the model', () => {
  for (const [flag, message] of [
    ['--max-concurrent=0', '--max-concurrent must be an integer >= 1, got 0'],
    ['--max-queue=-1', '--max-queue must be an integer >= 0, got -1'],
    ['--port=99999', '--port must be an integer from 0 to 65535, got 99999'],
    ['--weights=fp8', '--weights must be one of f32, bf16, int8, got fp8'],
  ]) {
    const run = spawnSync(process.execPath, [CLI, 'serve', '--model', path.join(dir, 'missing'), flag], { encoding: 'utf8', timeout: 60_000 });
    expect([run.status, run.stderr]).toEqual([1, `error: ${message}\n`]);
  }
});
