import { TextDecoder } from 'node:util';
import { ByteTokenizer, Tokenizer } from '../lib/tokenizer';

function streamPieces(tokenizer: Tokenizer, tokens: number[]): string[] {
  const decoder = tokenizer.createStreamDecoder();
  const pieces = tokens.map((t) => decoder.push(t));
  pieces.push(decoder.flush());
  return pieces;
}

const referenceDecoder = new TextDecoder('utf-8', { ignoreBOM: true });

describe('ByteTokenizer', () => {
  const tokenizer = new ByteTokenizer();

  test('round-trips ASCII, CJK, emoji, combining marks and a BOM', () => {
    for (const text of ['', 'hello, world', '你好，世界', '😀👍🏽', 'e\u0301 ñ', '\uFEFFstart', 'mix 中文 and 🎉!']) {
      const tokens = tokenizer.encode(text);
      expect(tokens.every((t) => Number.isInteger(t) && t >= 0 && t < 256)).toBe(true);
      expect(tokenizer.decode(tokens)).toBe(text);
      expect(streamPieces(tokenizer, tokens).join('')).toBe(text);
    }
  });

  test('encodes UTF-8 bytes', () => {
    expect(tokenizer.encode('A')).toEqual([0x41]);
    expect(tokenizer.encode('中')).toEqual([0xe4, 0xb8, 0xad]);
    expect(tokenizer.encode('😀')).toEqual([0xf0, 0x9f, 0x98, 0x80]);
    expect(tokenizer.vocabSize).toBe(256);
  });

  test('decodes invalid bytes to U+FFFD per maximal subpart', () => {
    expect(tokenizer.decode([0xff])).toBe('\uFFFD');
    expect(tokenizer.decode([0xe4, 0xb8, 0x41])).toBe('\uFFFDA'); // truncated 3-byte sequence: one U+FFFD
    expect(tokenizer.decode([0xf0, 0x80, 0x41])).toBe('\uFFFD\uFFFDA'); // F0 needs 90..BF next
    expect(tokenizer.decode([0xc0, 0x80])).toBe('\uFFFD\uFFFD'); // overlong
    expect(tokenizer.decode([0xed, 0xa0, 0x80])).toBe('\uFFFD\uFFFD\uFFFD'); // UTF-16 surrogate
    expect(tokenizer.decode([0x41, 0xf0, 0x9f, 0x98])).toBe('A\uFFFD'); // truncated at the end
  });

  test('streaming emits a multi-byte character only once it is complete', () => {
    expect(streamPieces(tokenizer, [0xe4, 0xb8, 0xad, 0x41])).toEqual(['', '', '中', 'A', '']);
    expect(streamPieces(tokenizer, [0xf0, 0x9f, 0x98, 0x80])).toEqual(['', '', '', '😀', '']);
    expect(streamPieces(tokenizer, [0xe4, 0xb8, 0x41])).toEqual(['', '', '\uFFFDA', '']);
    expect(streamPieces(tokenizer, [0x41, 0xf0, 0x9f])).toEqual(['A', '', '', '\uFFFD']);
  });

  test('streamed pieces equal decode() on random byte strings rich in UTF-8 edge bytes', () => {
    // Bytes chosen around UTF-8 boundaries: ASCII, continuation ranges, lead bytes, invalid bytes.
    const pool = [0x41, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xad, 0xbb, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xe4, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff];
    let state = 7;
    const nextIndex = (n: number): number => {
      state = (Math.imul(state, 1103515245) + 12345) >>> 0;
      return (state >>> 8) % n;
    };
    const mismatches: number[][] = [];
    for (let trial = 0; trial < 3000; trial++) {
      const tokens = Array.from({ length: 1 + nextIndex(10) }, () => pool[nextIndex(pool.length)]);
      const expected = referenceDecoder.decode(Uint8Array.from(tokens));
      if (tokenizer.decode(tokens) !== expected || streamPieces(tokenizer, tokens).join('') !== expected) {
        mismatches.push(tokens);
      }
    }
    expect(mismatches).toEqual([]);
  });

  test('specials decode to nothing and do not split characters', () => {
    const withEos = new ByteTokenizer({ vocabSize: 258, eosId: 257 });
    expect(withEos.vocabSize).toBe(258);
    expect(withEos.eosId).toBe(257);
    expect(withEos.decode([0x48, 257, 0x69])).toBe('Hi');
    expect(withEos.decode([0xe4, 256, 0xb8, 0xad])).toBe('中');
    expect(streamPieces(withEos, [0xe4, 256, 0xb8, 0xad, 257])).toEqual(['', '', '', '中', '', '']);
  });

  test('rejects invalid token ids, naming the id and its position', () => {
    expect(() => tokenizer.decode([0x41, 256])).toThrow(/token id 256 at position 1/);
    expect(() => tokenizer.decode([1.5])).toThrow(/token id 1.5 at position 0/);
    expect(() => tokenizer.decode([-1])).toThrow(/token id -1 at position 0/);
    expect(() => tokenizer.decode([NaN])).toThrow(/token id NaN at position 0/);
    const decoder = tokenizer.createStreamDecoder();
    decoder.push(0x41);
    expect(() => decoder.push(300)).toThrow(/token id 300 at position 1/);
    expect(() => new ByteTokenizer({ vocabSize: 258 }).decode([258])).toThrow(/token id 258 at position 0.*\[0, 258\)/);
    expect(() => tokenizer.decode(null as unknown as number[])).toThrow(/decode: expected an array of token ids, got null/);
    expect(() => tokenizer.decode(65 as unknown as number[])).toThrow(/expected an array of token ids, got 65/);
  });

  test('validates constructor options', () => {
    expect(() => new ByteTokenizer({ vocabSize: 100 })).toThrow(/vocabSize/);
    expect(() => new ByteTokenizer({ vocabSize: 256.5 })).toThrow(/vocabSize/);
    expect(() => new ByteTokenizer({ eosId: 10 })).toThrow(/eosId/);
    expect(() => new ByteTokenizer({ vocabSize: 258, eosId: 258 })).toThrow(/eosId/);
    expect(() => new ByteTokenizer({ eosId: 256 })).toThrow(/eosId/); // no room for a special in 256 ids
    expect(new ByteTokenizer(null as unknown as undefined).vocabSize).toBe(256);
    expect(() => new ByteTokenizer(5 as unknown as undefined)).toThrow(/ByteTokenizer: options must be an object/);
  });
});
