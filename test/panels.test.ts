// The f32-panels product (a model's 'f32-panels' projections) against its definition: each
// output one chain of fused multiply-adds from 0 over k in order, acc = fl(x[k] w[k] + acc)
// rounded once. The dot-product path (up to 256 rows) must match it bit for bit with every
// kernel set and any batch; the packed path (more rows) sums to rounding.
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
// multiple of 16), row counts around the 6-row and 2-row blocks, odd K.
const DOT_SHAPES: Shape[] = [
  { M: 1, N: 64, K: 64 },
  { M: 1, N: 300, K: 129 },
  { M: 5, N: 65, K: 3 },
  { M: 6, N: 128, K: 40 },
  { M: 7, N: 100, K: 37 },
  { M: 13, N: 1, K: 17 },
  { M: 16, N: 200, K: 96 },
];

describe('f32-panels product', () => {
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
  // K past one k block.
  test.each([
    { M: 300, N: 70, K: 90 },
    { M: 260, N: 100, K: 600 },
  ])('past 256 rows the packed path agrees to rounding: %o', async (o) => {
    const c = makeCase(o);
    const got = await run(c);
    const want = reference(c);
    for (let n = 0; n < got.length; n++) expect(Math.abs(got[n] - want[n])).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(want[n])));
  });

  // The sets below the one this CPU picks (on an AVX-512 machine: AVX2 and generic).
  test.each(['avx2', 'generic'])('RETNET_CPU_ISA=%s gives the same bits', (isa) => {
    const cases = DOT_SHAPES.map((o) => makeCase(o));
    const { outputs } = runWithIsa(isa, cases.map((c) => ({ panels: { weights: Array.from(c.weights), x: Array.from(c.x), o: c.o } })));
    cases.forEach((c, i) => expect(outputs[i]).toEqual(bitsOf(reference(c))));
  });

  test('bad arguments are errors', () => {
    expect(() => addon().panelLinear(new Float32Array(5), new Float32Array(3), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow(
      /weights must hold N\*K values/,
    );
    expect(() => addon().panelLinear(new Float32Array(6), new Float32Array(4), new Float32Array(2), { M: 1, N: 2, K: 3 })).toThrow(
      /x and y must hold M\*K and M\*N values/,
    );
  });
});
