// Tokenizers: text <-> token ids, including an incremental decoder for streaming generation.

import { TextDecoder, TextEncoder } from 'node:util';

import { formatValue, optionsObject } from './typed';

export interface StreamDecoder {
  /** Adds one token; returns the text it completed (may be ''). */
  push(token: number): string;
  /** Ends the stream; returns what was still pending (incomplete input becomes U+FFFD). */
  flush(): string;
}

export interface Tokenizer {
  readonly vocabSize: number;
  encode(text: string): number[];
  decode(tokens: ArrayLike<number>): string;
  /**
   * Incremental decoder for streaming: push one token at a time, get back the text that is now
   * complete (may be ''), flush() at the end. The pieces joined equal decode() of all tokens.
   */
  createStreamDecoder(): StreamDecoder;
}

/** Throws unless `tokenizer` has the Tokenizer methods and a vocabSize in [1, modelVocab]. */
export function checkTokenizer(tokenizer: unknown, modelVocab: number): void {
  const t = tokenizer as Partial<Tokenizer> | null;
  if (t === null || typeof t !== 'object' || typeof t.encode !== 'function' || typeof t.decode !== 'function' || typeof t.createStreamDecoder !== 'function') {
    throw new Error('tokenizer must be an object with encode, decode and createStreamDecoder methods');
  }
  if (!Number.isInteger(t.vocabSize) || (t.vocabSize as number) < 1 || (t.vocabSize as number) > modelVocab) {
    throw new Error(`tokenizer.vocabSize must be an integer in [1, ${modelVocab}] (the model's vocab_size), got ${String(t.vocabSize)}`);
  }
}

export interface ByteTokenizerOptions {
  /** Total ids, >= 256. Ids 256 and up are specials (e.g. an end-of-sequence id). Default 256. */
  vocabSize?: number;
  /** An end-of-sequence special id, in [256, vocabSize). */
  eosId?: number;
}

const BYTE_IDS = 256;

/** Throws unless `token` is an integer id in [0, vocabSize); `position` locates it for the message. */
export function checkTokenId(token: number, position: number, vocabSize: number): void {
  if (!Number.isInteger(token) || token < 0 || token >= vocabSize) {
    throw new Error(`token id ${String(token)} at position ${position} is not an integer in [0, ${vocabSize})`);
  }
}

/**
 * UTF-8 byte-level tokenizer: ids 0..255 are the bytes themselves.
 *
 * Ids from 256 up to vocabSize - 1 are specials (such as `eosId`): they are valid ids, encode()
 * never produces them, and they decode to '' without adding bytes, so bytes on either side of a
 * special still join into one character.
 *
 * Decoding follows TextDecoder's UTF-8 rules (each maximal invalid subsequence becomes U+FFFD),
 * except that a leading byte-order mark is kept rather than stripped, so encode/decode round-trips.
 */
export class ByteTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly eosId: number | undefined;
  private readonly encoder = new TextEncoder();

  constructor(options: ByteTokenizerOptions = {}) {
    options = optionsObject(options, 'ByteTokenizer');
    const vocabSize = options.vocabSize ?? BYTE_IDS;
    if (!Number.isInteger(vocabSize) || vocabSize < BYTE_IDS) {
      throw new Error(`ByteTokenizer: vocabSize must be an integer >= ${BYTE_IDS}, got ${String(vocabSize)}`);
    }
    const eosId = options.eosId;
    if (eosId !== undefined && (!Number.isInteger(eosId) || eosId < BYTE_IDS || eosId >= vocabSize)) {
      throw new Error(`ByteTokenizer: eosId must be an integer in [${BYTE_IDS}, ${vocabSize}), got ${String(eosId)}`);
    }
    this.vocabSize = vocabSize;
    this.eosId = eosId;
  }

  encode(text: string): number[] {
    if (typeof text !== 'string') throw new Error(`ByteTokenizer.encode: expected a string, got ${typeof text}`);
    return Array.from(this.encoder.encode(text));
  }

  decode(tokens: ArrayLike<number>): string {
    if (tokens === null || typeof tokens !== 'object' || typeof tokens.length !== 'number') {
      throw new Error(`ByteTokenizer.decode: expected an array of token ids, got ${formatValue(tokens)}`);
    }
    const bytes = new Uint8Array(tokens.length);
    let byteCount = 0;
    for (let i = 0; i < tokens.length; i++) {
      const token = tokens[i];
      checkTokenId(token, i, this.vocabSize);
      if (token < BYTE_IDS) bytes[byteCount++] = token;
    }
    return utf8Decoder().decode(bytes.subarray(0, byteCount));
  }

  createStreamDecoder(): StreamDecoder {
    // A streaming TextDecoder buffers an incomplete character across calls and yields exactly the
    // same characters as decoding the whole byte string at once.
    const decoder = utf8Decoder();
    const vocabSize = this.vocabSize;
    const oneByte = new Uint8Array(1);
    let position = 0;
    return {
      push(token: number): string {
        checkTokenId(token, position++, vocabSize);
        if (token >= BYTE_IDS) return '';
        oneByte[0] = token;
        return decoder.decode(oneByte, { stream: true });
      },
      flush(): string {
        return decoder.decode();
      },
    };
  }
}

function utf8Decoder(): TextDecoder {
  return new TextDecoder('utf-8', { ignoreBOM: true });
}
