// The CPU's fp32 products with the weights in panels of 64 output rows (how the CPU model keeps
// its projections) against their definition: each output one chain of fused multiply-adds from
// 0 over k in order, acc = fl(x[k] w[k] + acc) rounded once. The dot-product path (up to 256
// rows) must match it bit for bit with every kernel set and any batch; the packed path (more
// rows, or bf16 inputs) and the backward are the row-major GEMM's products bit for bit.
import { addon } from '../lib/native';
import { Rng } from '../lib/random';
import { runWithIsa } from './helpers/kernel_child';

interface Shape {
  M: number;
  N: number;
  K: number;
}
interface Case {
  weights: Float32Array;
  x: Float32Array;
  o: Shape;
}

const bits = new Float32Array(1);
const bitsView = new Int32Array(bits.buffer);

/** fl32(a * b + c) rounded once (a, b, c float32): the product is exact in double; the sum's
 * rounding error (TwoSum) breaks the one tie that rounding the double sum to float32 gets wrong. */
function fmaF32(a: number, b: number, c: number): number {
  const p = a * b;
  const s = p + c;
  const bv = s - p;
  const err = p - (s - bv) + (c - bv);
  const r = Math.fround(s);
  if (err === 0 || r === s || !Number.isFinite(s)) return r;
  // s lies strictly between r and its float32 neighbour n on s's side; only a tie is affected.
  bits[0] = r;
  bitsView[0] += s > r === r >= 0 ? 1 : -1;
  const n = bits[0];
  if (s - r !== n - s) return r;
  return err > 0 === n > r ? n : r;
}

function reference(c: Case): Float32Array {
  const { M, N, K } = c.o;
  const y = new Float32Array(M * N);
  for (let i = 0; i < M; i++) {
    for (let j = 0; j < N; j++) {
      let acc = 0;
      for (let k = 0; k < K; k++) acc = fmaF32(c.x[i * K + k], c.weights[j * K + k], acc);
      y[i * N + j] = acc;
    }
  }
  return y;
}

function makeCase(o: Shape, seed = o.M * 1000 + o.N * 10 + o.K): Case {
  const rng = new Rng(seed);
  const uniform = (n: number, scale: number) => Float32Array.from({ length: n }, () => (rng.nextFloat() - 0.5) * scale);
  return { weights: uniform(o.N * o.K, 0.2), x: uniform(o.M * o.K, 2), o };
}

async function run(c: Case): Promise<Float32Array> {
  const y = new Float32Array(c.o.M * c.o.N).fill(NaN);
  await addon().panelLinear(c.weights, c.x, y, c.o);
  return y;
}

const bitsOf = (a: Float32Array) => Array.from(new Uint32Array(a.buffer, a.byteOffset, a.length));

// Full panels and partial ones (widths 1 to 63 past the last multiple of 64, some not a
// multiple of 16), row counts around the blocks (AVX-512: 6 rows; AVX2: one row, then 3-row
// blocks on whole panels and 2-row ones on partial panels; from 16 to 64 rows, whole panels in
// chunks of 64 lines, the last one partial), odd K; one row against enough
// panels that the threads' pieces run them in pairs (the partial last one alone; pairs holding
// partial panels are in test/weights.test.ts's odd widths, a decode batch against each row alone).
const DOT_SHAPES: Shape[] = [
  { M: 1, N: 64, K: 64 },
  { M: 1, N: 300, K: 129 },
  { M: 1, N: 64 * 40 + 21, K: 35 },
  { M: 5, N: 65, K: 3 },
  { M: 6, N: 128, K: 40 },
  { M: 7, N: 100, K: 37 },
  { M: 13, N: 1, K: 17 },
  { M: 16, N: 200, K: 96 },
  { M: 17, N: 128, K: 200 },
  { M: 64, N: 70, K: 131 },
  { M: 65, N: 64, K: 70 },
];

describe('fp32 products on weights in panels', () => {
  test('the fused multiply-add reference rounds once', () => {
    // (1 + 2^-18) * 2^-24 (1 - 2^-18) + (1 + 2^-23) is 1 + 2^-23 + 2^-24 - 2^-60: just under the
    // tie, so 1 + 2^-23. The double sum rounds to the tie itself, which fround sends to even.
    const [a, b, c] = [1 + 2 ** -18, 2 ** -24 * (1 - 2 ** -18), 1 + 2 ** -23];
    expect(fmaF32(a, b, c)).toBe(1 + 2 ** -23);
    expect(Math.fround(a * b + c)).toBe(1 + 2 ** -22);
    expect(fmaF32(2 ** -12, 2 ** -12, 1)).toBe(1); // exactly the tie 1 + 2^-24: to even
    expect(fmaF32(3, 5, 7)).toBe(22);
  });

  test.each(DOT_SHAPES)('dot-product path is the FMA chain bit for bit: %o', async (o) => {
    const c = makeCase(o);
    expect(bitsOf(await run(c))).toEqual(bitsOf(reference(c)));
  });

  test('a batch does not change a row: each row alone gives the same bits', async () => {
    const c = makeCase({ M: 16, N: 150, K: 200 });
    const all = await run(c);
    for (const i of [0, 5, 6, 15]) {
      const alone = await run({ ...c, x: c.x.slice(i * 200, (i + 1) * 200), o: { M: 1, N: 150, K: 200 } });
      expect(bitsOf(alone)).toEqual(bitsOf(all.subarray(i * 150, (i + 1) * 150)));
    }
  });

  // The packed path copies each panel's lines as B's packed blocks: a partial last panel, and
  // K past one k block. It is the GEMM on the row-major weights, bit for bit.
  test.each([
    { M: 300, N: 70, K: 90, precision: 'fp32' },
    { M: 260, N: 100, K: 600, precision: 'fp32' },
    { M: 20, N: 130, K: 70, precision: 'bf16' },
  ] as const)('past 256 rows (or bf16) the packed path is the row-major GEMM: %o', async ({ precision, ...o }) => {
    const c = makeCase(o);
    const y = new Float32Array(o.M * o.N).fill(NaN);
    await addon().panelLinear(c.weights, c.x, y, { ...o, precision });
    const want = new Float32Array(o.M * o.N);
    await addon().gemm(c.x, c.weights, want, { ...o, bTransposed: true, precision });
    expect(bitsOf(y)).toEqual(bitsOf(want));
    if (precision === 'fp32') {
      const fma = reference(c);
      for (let n = 0; n < y.length; n++) expect(Math.abs(y[n] - fma[n])).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(fma[n])));
    }
  });

  // The backward reads the panels as W's rows (dx = dy W) and writes dW's panels through the
  // GEMM's output tiles: both must be what the row-major GEMM gives (the training path on rows).
  test.each([
    { M: 7, N: 65, K: 33, accumulateDx: false, precision: 'fp32' },
    { M: 300, N: 130, K: 200, accumulateDx: true, precision: 'fp32' },
    { M: 40, N: 100, K: 450, accumulateDx: false, precision: 'bf16' },
  ] as const)('backward: dx and dw are what the row-major GEMM gives, dw accumulated: %o', async (o) => {
    const { M, N, K } = o;
    const rng = new Rng(M + N + K);
    const uniform = (n: number) => Float32Array.from({ length: n }, () => rng.nextFloat() - 0.5);
    const [w, x, dy, dx0, dw0] = [uniform(N * K), uniform(M * K), uniform(M * N), uniform(M * K), uniform(N * K)];
    const dx = dx0.slice();
    const dw = dw0.slice();
    await addon().panelLinearBackward(w, x, dy, dx, dw, o);
    const wantDx = o.accumulateDx ? dx0.slice() : new Float32Array(M * K);
    await addon().gemm(dy, w, wantDx, { M, N: K, K: N, accumulate: o.accumulateDx, precision: o.precision });
    const wantDw = dw0.slice();
    await addon().gemm(dy, x, wantDw, { M: N, N: K, K: M, aTransposed: true, accumulate: true, precision: o.precision });
    expect(bitsOf(dx)).toEqual(bitsOf(wantDx));
    expect(bitsOf(dw)).toEqual(bitsOf(wantDw));
  });

  // The sets below the one this CPU picks (on an AVX-512 machine: AVX2 and generic).
  test.each(['avx2', 'generic'])('RETNET_CPU_ISA=%s gives the same bits', (isa) => {
    const cases = DOT_SHAPES.map((o) => makeCase(o));
    const { outputs } = runWithIsa(isa, cases.map((c) => ({ panels: { weights: Array.from(c.weights), x: Array.from(c.x), o: c.o } })));
    cases.forEach((c, i) => expect(outputs[i]).toEqual(bitsOf(reference(c))));
  });

  test('bad arguments are errors', () => {
    expect(() => addon().panelLinear(new Float32Array(5), new Float32Array(3), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow(
      'panelLinear: weights must hold 6 values',
    );
    expect(() => addon().panelLinear(new Float32Array(6), new Float32Array(4), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow(
      'panelLinear: x must hold 3 values',
    );
    const f = (n: number) => new Float32Array(n);
    expect(() => addon().panelLinearBackward(f(6), f(3), f(2), f(3), f(5), { M: 1, N: 2, K: 3 })).toThrow(
      'panelLinearBackward: dw must hold 6 values',
    );
  });
});
