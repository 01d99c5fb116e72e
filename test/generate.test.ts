import {
  DecodeSession,
  GenerateChunk,
  GenerateOptions,
  collectText,
  generateFromSession,
  validateGenerateOptions,
} from '../lib/generate';
import { ByteTokenizer, Tokenizer } from '../lib/tokenizer';

type NextLogits = (history: readonly number[], promptLength: number) => Float32Array;

/** A batch-1 session whose logits are a deterministic function of everything it has consumed. */
class FakeSession implements DecodeSession {
  readonly batch = 1;
  readonly consumed: number[] = [];
  prefillCalls = 0;
  stepCalls = 0;
  disposed = false;
  /** Runs inside the next prefill/step call, as if something happened while native code ran. */
  duringCall?: () => void;
  private promptLength = 0;

  constructor(private readonly nextLogits: NextLogits) {}

  get position(): number {
    return this.consumed.length;
  }

  async prefill(tokens: number[][]): Promise<{ logits: Float32Array }> {
    expect(tokens).toHaveLength(1);
    this.prefillCalls++;
    this.consumed.push(...tokens[0]);
    this.promptLength = tokens[0].length;
    this.duringCall?.();
    return { logits: this.nextLogits(this.consumed, this.promptLength) };
  }

  async step(tokenIds: number[]): Promise<{ logits: Float32Array }> {
    expect(tokenIds).toHaveLength(1);
    this.stepCalls++;
    this.consumed.push(tokenIds[0]);
    this.duringCall?.();
    return { logits: this.nextLogits(this.consumed, this.promptLength) };
  }

  dispose(): void {
    this.disposed = true;
  }
}

/** Greedy-friendly logits that make the session continue with `script`, then repeat `filler`. */
function scripted(script: number[], vocabSize: number, filler = 0x2e): NextLogits {
  return (history, promptLength) => {
    const logits = new Float32Array(vocabSize);
    logits[script[history.length - promptLength] ?? filler] = 20;
    return logits;
  };
}

/** A fixed pseudo-random bigram table: the next-token logits depend on the last token only. */
function bigram(vocabSize: number): NextLogits {
  const table = new Float32Array(vocabSize * vocabSize);
  let state = 12345;
  for (let i = 0; i < table.length; i++) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    table[i] = (state / 2 ** 32) * 6;
  }
  return (history) => {
    const last = history[history.length - 1];
    return table.slice(last * vocabSize, (last + 1) * vocabSize);
  };
}

/** Test tokenizer whose tokens are whole strings, so one token can carry several characters. */
class PieceTokenizer implements Tokenizer {
  constructor(private readonly pieces: string[]) {}
  get vocabSize(): number {
    return this.pieces.length;
  }
  encode(text: string): number[] {
    const tokens: number[] = [];
    for (let at = 0; at < text.length; ) {
      const id = this.pieces.findIndex((p) => p.length > 0 && text.startsWith(p, at));
      if (id < 0) throw new Error(`no piece for ${text.slice(at)}`);
      tokens.push(id);
      at += this.pieces[id].length;
    }
    return tokens;
  }
  decode(tokens: ArrayLike<number>): string {
    return Array.from(tokens, (t) => this.pieces[t]).join('');
  }
  createStreamDecoder(): { push(token: number): string; flush(): string } {
    return { push: (token) => this.pieces[token], flush: () => '' };
  }
}

const bytes = new ByteTokenizer();
const withEos = new ByteTokenizer({ vocabSize: 257, eosId: 256 });
const greedy: GenerateOptions = { temperature: 0 };

async function chunksOf(iterator: AsyncIterable<GenerateChunk>): Promise<GenerateChunk[]> {
  const chunks: GenerateChunk[] = [];
  for await (const chunk of iterator) chunks.push(chunk);
  return chunks;
}

/** Generates greedily from a session scripted to continue the prompt with `continuation`. */
function generateScripted(continuation: number[] | string, options: GenerateOptions = {}, tokenizer: Tokenizer = bytes) {
  const script = typeof continuation === 'string' ? tokenizer.encode(continuation) : continuation;
  const session = new FakeSession(scripted(script, tokenizer.vocabSize));
  const prompt = tokenizer.encode('>');
  return { session, chunks: chunksOf(generateFromSession(session, prompt, tokenizer, { ...greedy, ...options })) };
}

const texts = (chunks: GenerateChunk[]): string[] => chunks.map((c) => c.text);
const joined = (chunks: GenerateChunk[]): string => texts(chunks).join('');

describe('generateFromSession', () => {
  test("a custom stream decoder's non-string text is an Error, not garbage", async () => {
    const odd = Object.assign(new ByteTokenizer(), { createStreamDecoder: () => ({ push: () => 7 as unknown as string, flush: () => '' }) });
    await expect(generateScripted('abc', {}, odd).chunks).rejects.toThrow("the tokenizer's stream decoder push() returned 7, not a string");
  });

  test('prefills the prompt, then alternates sample and step, and respects maxTokens', async () => {
    const { session, chunks } = generateScripted('abcdefgh', { maxTokens: 5 });
    const result = await chunks;
    expect(result.map((c) => c.token)).toEqual(bytes.encode('abcde'));
    expect(joined(result)).toBe('abcde');
    expect(session.prefillCalls).toBe(1);
    // The last sampled token is not fed back.
    expect(session.stepCalls).toBe(4);
    expect(session.consumed).toEqual(bytes.encode('>abcd'));
    expect(session.disposed).toBe(false);
  });

  test('defaults to 128 tokens; maxTokens 0 makes no session call', async () => {
    expect(await (await generateScripted('', {}).chunks).length).toBe(128);
    const { session, chunks } = generateScripted('abc', { maxTokens: 0 });
    expect(await chunks).toEqual([]);
    expect(session.prefillCalls + session.stepCalls).toBe(0);
  });

  test('streams text as characters complete; the pieces join to the decoded tokens', async () => {
    const text = 'héllo 🌍 世界';
    const result = await generateScripted(text, { maxTokens: bytes.encode(text).length }).chunks;
    expect(joined(result)).toBe(text);
    expect(bytes.decode(result.map((c) => c.token))).toBe(text);
    // 🌍 is 4 bytes: three chunks with '' and then the whole character.
    const globe = texts(result).indexOf('🌍');
    expect(texts(result).slice(globe - 3, globe)).toEqual(['', '', '']);
  });

  test('an incomplete character at the end is flushed as U+FFFD', async () => {
    const result = await generateScripted([0x41, 0xe4, 0xb8], { maxTokens: 3 }).chunks;
    expect(texts(result)).toEqual(['A', '', '\uFFFD']);
  });

  test('a stop sequence spanning tokens ends generation without being emitted', async () => {
    const { session, chunks } = generateScripted('Hello, world\nUser: more', { stop: '\nUser:' });
    const result = await chunks;
    expect(joined(result)).toBe('Hello, world');
    // The chunk list ends with the token that completed the stop sequence.
    expect(bytes.decode(result.map((c) => c.token))).toBe('Hello, world\nUser:');
    expect(session.stepCalls).toBe(result.length - 1);
  });

  test('text that may start a stop sequence is held back, then released when it does not', async () => {
    const result = await generateScripted('abABxABCz', { stop: 'ABC' }).chunks;
    expect(texts(result)).toEqual(['a', 'b', '', '', 'ABx', '', '', '']);
    // Held-back text is also released when generation ends for another reason.
    expect(joined(await generateScripted('abAB', { stop: 'ABC', maxTokens: 4 }).chunks)).toBe('abAB');
  });

  test('the earliest of several stop sequences wins; multi-byte stops work', async () => {
    expect(joined(await generateScripted('Hello, world', { stop: ['world', 'lo, w'] }).chunks)).toBe('Hel');
    expect(joined(await generateScripted('你好世界!', { stop: ['界', '世界'] }).chunks)).toBe('你好');
  });

  test('stop sequences inside and across multi-character tokens', async () => {
    const pieces = new PieceTokenizer(['>', 'Hel', 'lo\n', '\nUs', 'er: x', 'a<EN', 'D>b', 'a<END>b', '.']);
    const across = await generateScripted('Hello\n\nUser: x', { stop: '\n\nUser' }, pieces).chunks;
    expect(texts(across)).toEqual(['Hel', 'lo', '', '']); // '\n' and then '\n\nUs' are held back
    expect(joined(await generateScripted('a<END>b', { stop: '<END>' }, pieces).chunks)).toBe('a');
    const split = await generateScripted([5, 6], { stop: '<END>' }, pieces).chunks;
    expect(texts(split)).toEqual(['a', '']);
  });

  test('a stop token ends generation; its text is not emitted but held text is flushed', async () => {
    const eos = 256;
    const { session, chunks } = generateScripted([...withEos.encode('hi'), eos, 0x41], { stopTokens: [eos] }, withEos);
    const result = await chunks;
    expect(result).toEqual([
      { token: 0x68, text: 'h' },
      { token: 0x69, text: 'i' },
      { token: eos, text: '' },
    ]);
    expect(session.stepCalls).toBe(2);

    const held = await generateScripted([...withEos.encode('abAB'), eos], { stopTokens: [eos], stop: 'ABC' }, withEos).chunks;
    expect(texts(held)).toEqual(['a', 'b', '', '', 'AB']);
    // A byte token as stop token: its own text is dropped, the pending partial character is not.
    const byteStop = await generateScripted([0x41, 0xe4, 0x0a], { stopTokens: [0x0a] }).chunks;
    expect(texts(byteStop)).toEqual(['A', '', '\uFFFD']);
  });

  test('only ids the tokenizer knows are sampled from padded logits', async () => {
    const session = new FakeSession(() => {
      const logits = new Float32Array(300);
      logits[299] = 50; // a padded id beyond the byte vocabulary
      logits[0x7a] = 10;
      return logits;
    });
    const result = await chunksOf(generateFromSession(session, [0x41], bytes, { ...greedy, maxTokens: 3 }));
    expect(result.map((c) => c.token)).toEqual([0x7a, 0x7a, 0x7a]);
  });

  test('the same seed reproduces a sampled run; another seed differs', async () => {
    const run = async (seed: number) => {
      const session = new FakeSession(bigram(256));
      return (await chunksOf(generateFromSession(session, [1, 2, 3], bytes, { seed, maxTokens: 40, topK: 50 }))).map((c) => c.token);
    };
    const first = await run(42);
    expect(await run(42)).toEqual(first);
    expect(await run(43)).not.toEqual(first);
    expect(new Set(first).size).toBeGreaterThan(5); // actually sampled, not stuck on one id
  });

  test('the repetition penalty sees the prompt', async () => {
    const session = new FakeSession(() => Float32Array.of(2, 1.9));
    const twoIds = new PieceTokenizer(['a', 'b']);
    const result = await chunksOf(generateFromSession(session, [0], twoIds, { ...greedy, repetitionPenalty: 2, maxTokens: 1 }));
    expect(result[0].token).toBe(1);
  });

  test('aborting between tokens throws an AbortError before the next session call', async () => {
    const controller = new AbortController();
    const session = new FakeSession(scripted([], 256));
    const received: GenerateChunk[] = [];
    const run = async () => {
      for await (const chunk of generateFromSession(session, [0x3e], bytes, { ...greedy, signal: controller.signal })) {
        received.push(chunk);
        if (received.length === 3) controller.abort('user cancelled');
      }
    };
    await expect(run()).rejects.toMatchObject({ name: 'AbortError', cause: 'user cancelled' });
    expect(received).toHaveLength(3);
    expect(session.stepCalls).toBe(2);
  });

  test('an abort during a session call takes effect when the call returns', async () => {
    const controller = new AbortController();
    const session = new FakeSession(scripted([], 256));
    session.duringCall = () => {
      if (session.stepCalls === 2) controller.abort();
    };
    const received: GenerateChunk[] = [];
    const run = async () => {
      for await (const chunk of generateFromSession(session, [0x3e], bytes, { ...greedy, signal: controller.signal })) {
        received.push(chunk);
      }
    };
    await expect(run()).rejects.toMatchObject({ name: 'AbortError' });
    expect(received).toHaveLength(2);
    expect(session.stepCalls).toBe(2);

    const duringPrefill = new AbortController();
    const prefillSession = new FakeSession(scripted([], 256));
    prefillSession.duringCall = () => duringPrefill.abort();
    const iterator = generateFromSession(prefillSession, [0x3e], bytes, { signal: duringPrefill.signal });
    await expect(iterator.next()).rejects.toMatchObject({ name: 'AbortError' });
    expect(prefillSession.stepCalls).toBe(0);
  });

  test('an already-aborted signal throws before any work', async () => {
    const session = new FakeSession(scripted([], 256));
    const iterator = generateFromSession(session, [0x3e], bytes, { signal: AbortSignal.abort() });
    await expect(iterator.next()).rejects.toThrow(expect.objectContaining({ name: 'AbortError' }));
    expect(session.prefillCalls + session.stepCalls).toBe(0);
  });

  test('rejects bad prompts, sessions and stop tokens before calling the session', async () => {
    const session = new FakeSession(scripted([], 256));
    const firstError = (promptTokens: number[], options: GenerateOptions = {}, target: DecodeSession = session) =>
      generateFromSession(target, promptTokens, bytes, options).next();
    await expect(firstError([])).rejects.toThrow(/promptTokens must be non-empty/);
    await expect(firstError([0x41, 256])).rejects.toThrow(/token id 256 at position 1/);
    await expect(firstError([0x41], { stopTokens: [300] })).rejects.toThrow(/stopTokens/);
    await expect(firstError([0x41], { temperature: -1 })).rejects.toThrow(/temperature/);
    const batch2 = Object.assign(new FakeSession(scripted([], 256)), { batch: 2 });
    await expect(firstError([0x41], {}, batch2)).rejects.toThrow(/batch 1/);
    expect(session.prefillCalls + batch2.prefillCalls).toBe(0);
  });
});

describe('validateGenerateOptions', () => {
  test('accepts valid options', () => {
    expect(() =>
      validateGenerateOptions({
        maxTokens: 0,
        stop: ['a', 'bc'],
        signal: new AbortController().signal,
        stopTokens: [0, 256],
        temperature: 0.8,
        topK: 40,
        topP: 0.95,
        repetitionPenalty: 1.1,
        seed: 1,
      }),
    ).not.toThrow();
    expect(() => validateGenerateOptions({ stop: 'x' })).not.toThrow();
  });

  test.each([
    ['maxTokens', { maxTokens: -1 }],
    ['maxTokens', { maxTokens: 2.5 }],
    ['stop', { stop: '' }],
    ['stop', { stop: ['ok', ''] }],
    ['stop', { stop: [7] as unknown as string[] }],
    ['signal', { signal: {} as AbortSignal }],
    ['stopTokens', { stopTokens: [-1] }],
    ['stopTokens', { stopTokens: 5 as unknown as number[] }],
    ['topP', { topP: 2 }],
  ])('rejects bad %s: %p', (field, options) => {
    expect(() => validateGenerateOptions(options)).toThrow(new RegExp(`invalid (generate|sampling) option: ${field} must be`));
  });
});

describe('collectText', () => {
  test('joins the streamed text', async () => {
    const { chunks } = generateScripted('stream me', { maxTokens: 9 });
    async function* replay() {
      yield* await chunks;
    }
    expect(await collectText(replay())).toBe('stream me');
    const session = new FakeSession(scripted(bytes.encode('one two'), 256));
    expect(await collectText(generateFromSession(session, [0x3e], bytes, { ...greedy, stop: ' ' }))).toBe('one');
  });
});
