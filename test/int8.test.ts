// The int8 product (a model's int8 projections) against its definition: the activations on a
// 16-bit grid (each row as integers |q| <= 32767 times a power-of-two step, 2^-14 to 2^-15 of
// the row's largest magnitude), the integer sum exact, then sum * (row scale * step) in double,
// rounded to fp32. The dot-product path (up to 256 rows) must match it bit for bit with every
// kernel set; the packed path (more rows) sums in fp32, so to rounding.
import { addon } from '../lib/native';
import { Rng } from '../lib/random';
import { runWithIsa } from './helpers/kernel_child';

interface Shape {
  M: number;
  N: number;
  K: number;
}
interface Case {
  weights: Int8Array;
  scales: Float32Array;
  x: Float32Array;
  o: Shape;
}

// The grid step of a row: 2^(floor(log2 max) - 14), at least 2^-126; 1 for zeros; NaN if the
// row holds a non-finite value.
function gridStep(row: Float32Array): number {
  let max = 0;
  for (const v of row) {
    if (!Number.isFinite(v)) return NaN;
    max = Math.max(max, Math.abs(v));
  }
  if (max === 0) return 1;
  let e = Math.floor(Math.log2(max));
  while (2 ** e > max) e--;
  while (2 ** (e + 1) <= max) e++;
  return 2 ** Math.max(e - 14, -126);
}

function roundHalfEven(v: number): number {
  const r = Math.round(v);
  return Math.abs(v - Math.trunc(v)) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// y as defined above; every sum here stays below 2^53, so float64 holds it exactly.
function reference({ weights, scales, x, o }: Case): Float32Array {
  const { M, N, K } = o;
  const y = new Float32Array(M * N);
  for (let i = 0; i < M; i++) {
    const row = x.subarray(i * K, (i + 1) * K);
    const step = gridStep(row);
    const q = Array.from(row, (v) => (Number.isNaN(step) ? 0 : Math.max(-32767, Math.min(32767, roundHalfEven(v / step)))));
    for (let j = 0; j < N; j++) {
      let sum = 0;
      for (let k = 0; k < K; k++) sum += weights[j * K + k] * q[k];
      y[i * N + j] = sum * (scales[j] * step);
    }
  }
  return y;
}

const rng = new Rng(11);
function makeCase(o: Shape, rowScale: (i: number) => number = () => 1): Case {
  const weights = Int8Array.from({ length: o.N * o.K }, () => Math.floor(rng.nextFloat() * 255) - 127);
  const scales = Float32Array.from({ length: o.N }, () => 1e-3 + rng.nextFloat() * 1e-2);
  const x = Float32Array.from({ length: o.M * o.K }, (_, n) => (rng.nextFloat() * 2 - 1) * rowScale(Math.floor(n / o.K)));
  return { weights, scales, x, o };
}

async function run(c: Case): Promise<Float32Array> {
  const y = new Float32Array(c.o.M * c.o.N);
  await addon().int8Linear(c.weights, c.scales, c.x, y, c.o);
  return y;
}

const bitsOf = (a: Float32Array): number[] => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

// Shapes for every kernel path: one row (two accumulators), a few rows, blocks of 4 weight
// rows x 6 activation rows from 8 rows on and their leftovers, K with tails past the vector
// widths and past a 2048-column integer block.
const DOT_SHAPES: Shape[] = [
  { M: 1, N: 37, K: 100 },
  { M: 1, N: 5, K: 2100 },
  { M: 2, N: 9, K: 33 },
  { M: 7, N: 13, K: 64 },
  { M: 8, N: 21, K: 300 },
  { M: 13, N: 6, K: 17 },
  { M: 16, N: 66, K: 1040 },
  { M: 17, N: 7, K: 4097 },
];

describe('int8 products', () => {
  it.each(DOT_SHAPES)('dot products, M $M N $N K $K: bit for bit the definition', async (o) => {
    // Rows of every size, down to 1e-38 (below 2^-112 the step stops at 2^-126).
    const c = makeCase(o, (i) => [1, 3e4, 2e-3, 1e-30, 1e-38][i % 5]);
    expect(bitsOf(await run(c))).toEqual(bitsOf(reference(c)));
  });

  it('rows past 256 (the packed path): the same function, to fp32 rounding; a non-finite row gives NaN', async () => {
    const c = makeCase({ M: 300, N: 40, K: 200 }, (i) => 1 + (i % 5));
    c.x[7 * 200 + 3] = Infinity;
    const got = await run(c);
    const want = reference(c);
    for (let n = 0; n < got.length; n++) {
      if (n >= 7 * 40 && n < 8 * 40) expect(got[n]).toBeNaN();
      else expect(Math.abs(got[n] - want[n])).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(want[n])));
    }
  });

  it('a batch does not change a row: each row alone gives the same bits', async () => {
    const c = makeCase({ M: 16, N: 30, K: 500 });
    const all = await run(c);
    for (const i of [0, 5, 15]) {
      const alone = await run({ ...c, x: c.x.slice(i * 500, (i + 1) * 500), o: { M: 1, N: 30, K: 500 } });
      expect(bitsOf(alone)).toEqual(bitsOf(all.subarray(i * 30, (i + 1) * 30)));
    }
  });

  it('sums past int32 stay exact; the grid clamps at 32767; zero and non-finite rows', async () => {
    const K = 4096;
    const o = { M: 5, N: 2, K };
    const weights = new Int8Array(2 * K).fill(127);
    weights.fill(-127, K);
    const x = new Float32Array(5 * K);
    x.fill(1.99999, 0, K); // 1.99999 / 2^-14 rounds to 32768: clamped to 32767
    x.fill(-0.75, K, 2 * K);
    // row 2 stays zero
    x.fill(0.5, 3 * K, 4 * K);
    x[3 * K + 7] = NaN;
    x.fill(0.5, 4 * K, 5 * K);
    x[4 * K + 9] = -Infinity;
    const c = { weights, scales: Float32Array.from([0.01, 0.02]), x, o };
    const y = await run(c);
    expect(bitsOf(y)).toEqual(bitsOf(reference(c)));
    expect(y[0]).toBe(Math.fround(127 * 32767 * K * Math.fround(0.01) * 2 ** -14)); // 1.7e10 before the scales
    expect(Array.from(y.subarray(4, 6))).toEqual([0, 0]);
    expect(Array.from(y.subarray(6))).toEqual([NaN, NaN, NaN, NaN]);
    // A NaN anywhere in a row (here in the columns past the vector widths, and first).
    for (const at of [20, 0]) {
      const tail = makeCase({ M: 2, N: 3, K: 21 });
      tail.x[21 + at] = NaN;
      const out = await run(tail);
      expect(Array.from(out.subarray(3))).toEqual([NaN, NaN, NaN]);
      expect(out.subarray(0, 3).every(Number.isFinite)).toBe(true);
    }
  });

  // The sets below the one this CPU picks (on an AVX-512 machine: AVX2 and generic).
  it.each(['avx2', 'generic'])('RETNET_CPU_ISA=%s gives the same bits', (isa) => {
    const cases = DOT_SHAPES.map((o) => makeCase(o, (i) => [1, 7e-3][i % 2]));
    const { outputs } = runWithIsa(isa, cases.map((c) => ({ int8: { weights: Array.from(c.weights), scales: Array.from(c.scales), x: Array.from(c.x), o: c.o } })));
    cases.forEach((c, i) => expect(outputs[i]).toEqual(bitsOf(reference(c))));
  });

  it('bad arguments are errors', () => {
    const w = new Int8Array(6);
    const s = new Float32Array(2);
    expect(() => addon().int8Linear(new Float32Array(6) as unknown as Int8Array, s, new Float32Array(3), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow(
      /weights must be an Int8Array/,
    );
    expect(() => addon().int8Linear(w, s, new Float32Array(4), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow('int8Linear: x must hold 3 values');
  });
});
