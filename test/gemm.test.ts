// The CPU GEMM (every path: packed micro-kernel, edge tiles, vector and scalar packing, the
// few-rows dot path) against the simplest correct product, in float64, with the kernel set
// this CPU picks and again with each other set it can run (RETNET_CPU_ISA, in a child process).
import { addon, type NativeAddon } from '../lib/native';
import { Rng } from '../lib/random';
import { runWithIsa } from './helpers/kernel_child';

// One product: the addon's gemm options, precision given.
type Case = Required<Parameters<NativeAddon['gemm']>[3]>;

// x rounded to the nearest bf16 (ties to even), as the bf16 products round their inputs.
const bits = new Uint32Array(1);
const asFloat = new Float32Array(bits.buffer);
function bf16(x: number): number {
  asFloat[0] = x;
  bits[0] = (bits[0] + 0x7fff + ((bits[0] >>> 16) & 1)) & 0xffff0000;
  return asFloat[0];
}

function reference(a: Float32Array, b: Float32Array, c0: Float32Array, o: Case): { c: Float64Array; scale: Float64Array } {
  const { M, N, K } = o;
  const c = new Float64Array(M * N);
  const scale = new Float64Array(M * N); // sum |a||b|: the size of the rounding error to expect
  for (let i = 0; i < M; i++) {
    for (let j = 0; j < N; j++) {
      let s = o.accumulate ? c0[i * N + j] : 0;
      let m = Math.abs(s);
      for (let k = 0; k < K; k++) {
        let x = o.aTransposed ? a[k * M + i] : a[i * K + k];
        let y = o.bTransposed ? b[j * K + k] : b[k * N + j];
        if (o.precision === 'bf16') [x, y] = [bf16(x), bf16(y)];
        s += x * y;
        m += Math.abs(x * y);
      }
      c[i * N + j] = s;
      scale[i * N + j] = m;
    }
  }
  return { c, scale };
}

const rng = new Rng(7);
const random = (n: number): Float32Array => Float32Array.from({ length: n }, () => 2 * rng.nextFloat() - 1);

// Shapes around every blocking edge: tiles of 6 x 16 (generic, AVX2) and 12 x 32 (AVX-512),
// K blocks of 384 and 256, row blocks of 72 and 96, the 8-wide packing, the dot path for
// M <= 4 and the AVX-512 path for up to 64 rows against a weight (blocks of 8 or 6 outputs).
const SHAPES: Array<[number, number, number]> = [
  [1, 1, 1],
  [1, 33, 300],
  [3, 17, 9],
  [4, 64, 512],
  [5, 16, 8],
  [6, 16, 16],
  [7, 15, 7],
  [12, 48, 257],
  [13, 31, 255],
  [72, 16, 256],
  [73, 50, 264],
  [80, 40, 520],
  [12, 32, 256],
  [24, 64, 512],
  [96, 32, 300],
  [97, 65, 513],
  [16, 40, 1024],
  [15, 9, 600],
  [17, 24, 300],
  [40, 13, 1030],
  [64, 31, 264],
  [65, 7, 64],
];
const CASES: Case[] = [];
for (const [M, N, K] of SHAPES) {
  for (const aTransposed of [false, true]) {
    for (const bTransposed of [false, true]) {
      const accumulate = (M + N + K) % 2 === 0;
      CASES.push({ M, N, K, aTransposed, bTransposed, accumulate, precision: 'fp32' });
      // bf16 in the three layouts training uses: X W^T, dY W and dY^T X.
      if (!(aTransposed && bTransposed)) CASES.push({ M, N, K, aTransposed, bTransposed, accumulate, precision: 'bf16' });
    }
  }
}

// Worst error relative to sum |a||b|. fp32 accumulation: a few units of 2^-24 per term in the
// worst case, far less in practice.
function worstError(got: ArrayLike<number>, want: Float64Array, scale: Float64Array): number {
  let worst = 0;
  for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / (scale[i] + 1e-30));
  return worst;
}

describe('CPU gemm', () => {
  it.each(CASES)('M=$M N=$N K=$K aT=$aTransposed bT=$bTransposed acc=$accumulate $precision', async (o) => {
    const a = random(o.M * o.K);
    const b = random(o.K * o.N);
    const c = random(o.M * o.N);
    const { c: want, scale } = reference(a, b, c, o);
    await addon().gemm(a, b, c, o);
    expect(worstError(c, want, scale)).toBeLessThan(4e-6);
  });

  // The sets below the one this CPU picks (on an AVX-512 machine: AVX2 and generic).
  it.each([
    ['avx2', ['avx2-fma', 'generic']],
    ['generic', ['generic']],
  ])('RETNET_CPU_ISA=%s runs every case with that kernel set', (isa, names) => {
    const inputs = CASES.map((o) => ({ a: random(o.M * o.K), b: random(o.K * o.N), c: random(o.M * o.N), o }));
    const { gemm, outputs } = runWithIsa(isa, inputs.map(({ a, b, c, o }) => ({ a: Array.from(a), b: Array.from(b), c: Array.from(c), o })));
    expect(names).toContain(gemm);
    inputs.forEach(({ a, b, c, o }, i) => {
      const { c: want, scale } = reference(a, b, c, o);
      expect(worstError(outputs[i], want, scale)).toBeLessThan(4e-6);
    });
  });

  // Up to 64 rows against a weight (X W^T) skip the packing on AVX-512 but must sum as the
  // packed path does: a row's numbers don't depend on how many rows come with it.
  it.each([5, 8, 16, 17, 33, 48, 49, 64])('X W^T: the first %i rows of an 80-row product, bit for bit', async (M) => {
    for (const [N, K, accumulate] of [[37, 300, false], [64, 520, true], [9, 1024, false]] as const) {
      const o = { N, K, aTransposed: false, bTransposed: true, accumulate, precision: 'fp32' as const };
      const a = random(80 * K), b = random(N * K), c0 = random(80 * N);
      const all = Float32Array.from(c0);
      await addon().gemm(a, b, all, { ...o, M: 80 });
      const few = c0.slice(0, M * N);
      await addon().gemm(a.subarray(0, M * K), b, few, { ...o, M });
      expect(Buffer.from(few.buffer).equals(Buffer.from(all.buffer, 0, M * N * 4))).toBe(true);
    }
  });

  it('bf16 rounds its inputs: a product whose inputs are not bf16 values differs from fp32', async () => {
    // 1 + 2^-9 is not a bf16 value (7 fraction bits): it rounds to 1.
    const o = { M: 8, N: 40, K: 24, aTransposed: false, bTransposed: true, accumulate: false };
    const a = new Float32Array(o.M * o.K).fill(1 + 2 ** -9);
    const b = new Float32Array(o.N * o.K).fill(1);
    const c32 = new Float32Array(o.M * o.N);
    const c16 = new Float32Array(o.M * o.N);
    await addon().gemm(a, b, c32, { ...o, precision: 'fp32' });
    await addon().gemm(a, b, c16, { ...o, precision: 'bf16' });
    expect(c32[0]).toBeCloseTo(24 * (1 + 2 ** -9), 5);
    expect(Array.from(new Set(c16))).toEqual([24]);
  });

  it('rejects an unknown precision', () => {
    const o = { M: 2, N: 3, K: 4, aTransposed: false, bTransposed: false, accumulate: false, precision: 'fp8' };
    expect(() => addon().gemm(new Float32Array(8), new Float32Array(12), new Float32Array(6), o as never)).toThrow(/precision must be 'fp32' or 'bf16'/);
  });

  it('rejects mismatched sizes', async () => {
    const o = { M: 2, N: 3, K: 4, aTransposed: false, bTransposed: false, accumulate: false };
    expect(() => addon().gemm(new Float32Array(8), new Float32Array(11), new Float32Array(6), o)).toThrow(/M\*K, K\*N and M\*N/);
  });
});
