// Seeded fuzzing of parseSafetensors + checkWeights, then the native model the weights are
// copied into (which finds non-finite values), with mutated copies of a real fixture. Every
// input must either load with the config's shapes or throw a plain Error that names its
// source; anything else (TypeError, RangeError, non-Error throws) is a bug.

import * as fs from 'fs';
import * as path from 'path';
import { parameterShapes, resolveConfig } from '../lib/config';
import { Rng } from '../lib/random';
import { parseSafetensors } from '../lib/safetensors';
import { checkWeights } from '../lib/weights';
import { RetNet } from '../lib/model';

const FIXTURE = path.join(__dirname, 'data', 'fixtures', 'base_gelu_s64_c16');
const ORIGINAL = new Uint8Array(fs.readFileSync(path.join(FIXTURE, 'model.safetensors')));
const CONFIG = resolveConfig(JSON.parse(fs.readFileSync(path.join(FIXTURE, 'config.json'), 'utf8')));
const EXPECTED_SIZES = new Map(parameterShapes(CONFIG).map(([name, shape]) => [name, shape.reduce((a, b) => a * b, 1)]));
const SOURCE = 'fuzzed.safetensors';

const HEADER_LENGTH = Number(new DataView(ORIGINAL.buffer).getBigUint64(0, true));
const HEADER: Record<string, any> = JSON.parse(Buffer.from(ORIGINAL.subarray(8, 8 + HEADER_LENGTH)).toString('utf8'));
const DATA = ORIGINAL.subarray(8 + HEADER_LENGTH);
const TENSOR_NAMES = Object.keys(HEADER).filter((k) => k !== '__metadata__');

type Outcome = 'accepted' | 'rejected';

async function runOne(file: Uint8Array): Promise<Outcome> {
  let source = SOURCE;
  try {
    const { tensors } = parseSafetensors(file, SOURCE);
    const weights = checkWeights(CONFIG, tensors, SOURCE);
    expect(weights.size).toBe(EXPECTED_SIZES.size);
    for (const [name, values] of weights) expect(values.length).toBe(EXPECTED_SIZES.get(name));
    source = 'state dict';
    (await RetNet.fromStateDict(CONFIG, weights)).dispose();
    return 'accepted';
  } catch (err) {
    // Our own errors are plain Errors with the source first; a subclass means an accidental crash.
    if (!(err instanceof Error) || err.constructor !== Error || !err.message.startsWith(`${source}: `)) {
      throw new Error(`unexpected throw: ${err instanceof Error ? `${err.constructor.name}: ${err.message}` : String(err)}`);
    }
    return 'rejected';
  }
}

function withHeader(header: unknown, data: Uint8Array = DATA): Uint8Array {
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

function pick<T>(rng: Rng, items: readonly T[]): T {
  return items[Math.floor(rng.nextFloat() * items.length)];
}

function randInt(rng: Rng, below: number): number {
  return Math.floor(rng.nextFloat() * below);
}

const ODD_VALUES: unknown[] = [null, -1, 0.5, 1e20, 2 ** 53, '8', [], {}, true, -0, 1e-300];
const DTYPES: unknown[] = ['F16', 'BF16', 'F64', 'I64', 'U8', 'f32', '', 'F32 ', 'constructor', 4, null];

/** One random semantic edit of the JSON header (a deep copy is edited). */
function mutateHeader(rng: Rng): unknown {
  const header = JSON.parse(JSON.stringify(HEADER));
  const name = pick(rng, TENSOR_NAMES);
  const entry = header[name];
  switch (randInt(rng, 12)) {
    case 0:
      entry.dtype = pick(rng, DTYPES);
      break;
    case 1: {
      const i = randInt(rng, entry.shape.length);
      entry.shape[i] += pick(rng, [-1, 1, -entry.shape[i], entry.shape[i]]);
      break;
    }
    case 2:
      entry.shape = pick(rng, [[...entry.shape].reverse(), [...entry.shape, 1], entry.shape.slice(1), [pick(rng, ODD_VALUES)], pick(rng, ODD_VALUES)]);
      break;
    case 3: {
      const i = randInt(rng, 2);
      entry.data_offsets[i] += pick(rng, [-4, 4, -1, 1, 1 << 20, -entry.data_offsets[i]]);
      break;
    }
    case 4:
      entry.data_offsets = pick(rng, [[...entry.data_offsets].reverse(), [entry.data_offsets[0]], [0, 0], pick(rng, ODD_VALUES)]);
      break;
    case 5:
      entry.data_offsets[randInt(rng, 2)] = pick(rng, ODD_VALUES);
      break;
    case 6:
      delete entry[pick(rng, ['dtype', 'shape', 'data_offsets'])];
      break;
    case 7:
      delete header[name];
      break;
    case 8:
      header[`${name}.extra`] = { ...entry };
      break;
    case 9:
      header[name] = pick(rng, ODD_VALUES);
      break;
    case 10:
      header.__metadata__ = pick(rng, [{ config: 5 }, 'text', ['x'], null, { ok: 'yes' }]);
      break;
    default: {
      // Swap two tensors' offsets: same size pairs load (with wrong values), others must be rejected.
      const other = header[pick(rng, TENSOR_NAMES)];
      [entry.data_offsets, other.data_offsets] = [other.data_offsets, entry.data_offsets];
    }
  }
  return header;
}

/** Flips `flips` distinct bits inside bytes [begin, end), so the result always differs from `file`. */
function flipBits(file: Uint8Array, begin: number, end: number, flips: number, rng: Rng): Uint8Array {
  const out = file.slice();
  const chosen = new Set<number>();
  while (chosen.size < flips) chosen.add(begin * 8 + randInt(rng, (end - begin) * 8));
  for (const bit of chosen) out[bit >> 3] ^= 1 << (bit & 7);
  return out;
}

function setHeaderLength(length: bigint): Uint8Array {
  const out = ORIGINAL.slice();
  new DataView(out.buffer).setBigUint64(0, length, true);
  return out;
}

describe('fuzzed safetensors files', () => {
  it('the unmodified fixture loads', async () => {
    expect(await runOne(ORIGINAL)).toBe('accepted');
  });

  it('1,200 seeded mutations either load correctly or throw a named Error, and most are rejected', async () => {
    const rng = new Rng(20240411);
    const counts: Record<string, Record<Outcome, number>> = {};
    const record = (kind: string, outcome: Outcome) => {
      counts[kind] ??= { accepted: 0, rejected: 0 };
      counts[kind][outcome]++;
    };
    const headerEnd = 8 + HEADER_LENGTH;
    for (let i = 0; i < 1200; i++) {
      switch (i % 6) {
        case 0: {
          // Truncation, biased toward the prefix and header where the parser does the most work.
          const limit = rng.nextFloat() < 0.5 ? headerEnd + 16 : ORIGINAL.length;
          record('truncated', await runOne(ORIGINAL.subarray(0, randInt(rng, limit))));
          break;
        }
        case 1:
          record('header byte flips', await runOne(flipBits(ORIGINAL, 8, headerEnd, 1 + randInt(rng, 4), rng)));
          break;
        case 2:
          record('length prefix flips', await runOne(flipBits(ORIGINAL, 0, 8, 1 + randInt(rng, 3), rng)));
          break;
        case 3: {
          const huge = pick(rng, [2n ** 64n - 1n, 2n ** 63n, 2n ** 53n + 1n, 2n ** 32n, BigInt(ORIGINAL.length), 100n * 1024n * 1024n + 1n]);
          record('huge header length', await runOne(setHeaderLength(huge - BigInt(randInt(rng, 8)))));
          break;
        }
        case 4:
          record('JSON edits', await runOne(withHeader(mutateHeader(rng))));
          break;
        default:
          // Data edits: random bit flips almost always keep values finite (load); planted
          // NaN/±Inf values must be rejected (by the native model's setParams).
          if (i % 12 === 5) {
            record('data byte flips', await runOne(flipBits(ORIGINAL, headerEnd, ORIGINAL.length, 1 + randInt(rng, 8), rng)));
          } else {
            const out = ORIGINAL.slice();
            const at = headerEnd + 4 * randInt(rng, (ORIGINAL.length - headerEnd) / 4);
            new DataView(out.buffer).setFloat32(at, pick(rng, [NaN, Infinity, -Infinity]), true);
            record('planted non-finite', await runOne(out));
          }
      }
    }
    const total = Object.values(counts).reduce((n, c) => n + c.accepted + c.rejected, 0);
    const rejected = Object.values(counts).reduce((n, c) => n + c.rejected, 0);
    expect(total).toBe(1200);
    expect(counts['huge header length'].accepted).toBe(0);
    expect(counts['length prefix flips'].accepted).toBe(0);
    expect(counts['truncated'].accepted).toBe(0);
    expect(counts['JSON edits'].rejected).toBeGreaterThan(0.8 * 200);
    expect(counts['data byte flips'].accepted).toBeGreaterThan(0);
    expect(counts['planted non-finite'].accepted).toBe(0);
    expect(rejected).toBeGreaterThan(0.6 * total);
  });
});
