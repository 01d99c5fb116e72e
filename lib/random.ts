// Seeded pseudo-random numbers: xoshiro128** (Blackman & Vigna), seeded through a
// splitmix32-style sequence. Small, fast in 32-bit integer arithmetic, and its whole state is
// four uint32s, so training can checkpoint and resume the exact stream.

/** murmur3's 32-bit finaliser: a bijection that spreads every input bit over the output. */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

const TWO_POW_32 = 2 ** 32;

export class Rng {
  private s0 = 0;
  private s1 = 0;
  private s2 = 0;
  private s3 = 0;

  /** Any safe integer seed (negative values included) gives its own stream. */
  constructor(seed: number) {
    if (!Number.isSafeInteger(seed)) throw new Error(`Rng seed must be a safe integer, got ${seed}`);
    const low = seed >>> 0;
    const high = Math.floor(seed / TWO_POW_32) >>> 0;
    // Consecutive golden-ratio steps through a bijective mixer give four distinct words,
    // so the state is never all zero.
    let x = (low ^ mix32(high)) >>> 0;
    const words: number[] = [];
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) >>> 0;
      words.push(mix32(x));
    }
    this.setState(words);
  }

  /** Uniform uint32. */
  nextUint32(): number {
    // ×5 and ×9 as shift-and-add wrap mod 2^32 exactly and avoid a builtin call on the hot path.
    const times5 = ((this.s1 << 2) + this.s1) | 0;
    const rotated = rotl(times5, 7);
    const result = ((rotated << 3) + rotated) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits (two draws). */
  nextFloat(): number {
    const high = this.nextUint32() >>> 5; // 27 bits
    const low = this.nextUint32() >>> 6; // 26 bits
    return (high * 2 ** 26 + low) / 2 ** 53;
  }

  /** Standard normal by Box-Muller; one value per call keeps the state just the four words. */
  nextNormal(): number {
    const u1 = 1 - this.nextFloat(); // (0, 1], so the log is finite
    const u2 = this.nextFloat();
    return Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2);
  }

  /** The four uint32 state words; pass them to setState to resume the exact stream. */
  getState(): number[] {
    return [this.s0 >>> 0, this.s1 >>> 0, this.s2 >>> 0, this.s3 >>> 0];
  }

  setState(state: readonly number[]): void {
    if (
      !Array.isArray(state) ||
      state.length !== 4 ||
      !state.every((w) => Number.isInteger(w) && w >= 0 && w < TWO_POW_32)
    ) {
      throw new Error(`Rng state must be four uint32 integers, got ${JSON.stringify(state)}`);
    }
    if (state.every((w) => w === 0)) throw new Error('Rng state must not be all zero (xoshiro would only output zeros)');
    [this.s0, this.s1, this.s2, this.s3] = state.map((w) => w | 0);
  }
}
