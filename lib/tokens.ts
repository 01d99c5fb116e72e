// Token batch validation: every entry point that takes tokens goes through here, so a
// bad id, a ragged batch or an empty sequence is an Error naming the problem.
import { formatValue, isTypedArray } from './typed';

/** A batch of token ids in row-major [B, T] order. */
export interface TokenBatch {
  data: Int32Array;
  shape: [number, number];
}

export type TokenInput = number[][] | TokenBatch;

function checkId(id: unknown, b: number, t: number, vocabSize: number): void {
  if (typeof id !== 'number' || !Number.isInteger(id)) {
    throw new Error(`token at [${b}][${t}] must be an integer, got ${formatValue(id)}`);
  }
  if (id < 0 || id >= vocabSize) {
    throw new Error(`token id ${id} at [${b}][${t}] is outside the vocabulary [0, ${vocabSize})`);
  }
}

/** Validates and packs tokens into an Int32Array [B, T]. */
export function toTokenBatch(tokens: TokenInput, vocabSize: number): TokenBatch {
  if (Array.isArray(tokens)) {
    const B = tokens.length;
    if (B === 0) throw new Error('tokens: the batch is empty');
    const first = tokens[0];
    if (!Array.isArray(first)) throw new Error('tokens must be number[][] (one array per batch row)');
    const T = first.length;
    if (T === 0) throw new Error('tokens: sequences must not be empty');
    const data = new Int32Array(B * T);
    for (let b = 0; b < B; b++) {
      const row = tokens[b];
      if (!Array.isArray(row)) throw new Error(`tokens[${b}] is not an array`);
      if (row.length !== T) {
        throw new Error(`tokens: ragged batch, row 0 has ${T} tokens but row ${b} has ${row.length}`);
      }
      for (let t = 0; t < T; t++) {
        checkId(row[t], b, t, vocabSize);
        data[b * T + t] = row[t];
      }
    }
    return { data, shape: [B, T] };
  }
  if (tokens === null || typeof tokens !== 'object' || !isTypedArray(tokens.data, 'Int32Array') || !Array.isArray(tokens.shape)) {
    throw new Error('tokens must be number[][] or { data: Int32Array, shape: [B, T] }');
  }
  const [B, T] = tokens.shape;
  if (tokens.shape.length !== 2 || !Number.isInteger(B) || !Number.isInteger(T) || B < 1 || T < 1) {
    throw new Error(`tokens.shape must be [B, T] with B, T >= 1, got ${JSON.stringify(tokens.shape)}`);
  }
  if (tokens.data.length !== B * T) {
    throw new Error(`tokens.data has ${tokens.data.length} ids but shape [${B}, ${T}] needs ${B * T}`);
  }
  // A copy, checked: the call uses the ids it was given even if the caller refills its array
  // before the (queued) native call reads them.
  const data = tokens.data.slice();
  for (let i = 0; i < data.length; i++) checkId(data[i], Math.floor(i / T), i % T, vocabSize);
  return { data, shape: [B, T] };
}
