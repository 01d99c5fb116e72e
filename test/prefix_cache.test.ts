// The prefix-state cache: LRU bookkeeping, forking sessions, and the scheduler starting requests
// from a cached prefix (same output, prefix not recomputed).
import { PrefixCache, RetNet } from '../lib';
import { BYTE_MODEL_CONFIG as CONFIG, randomPrompt, tokensOf } from './helpers/byte_model';

class FakeState {
  disposed = false;
  constructor(readonly name: string) {}
  clone(): FakeState {
    return new FakeState(`${this.name}'`);
  }
  dispose(): void {
    this.disposed = true;
  }
}

test('LRU: the least recently used entry is disposed beyond maxEntries; fork copies', () => {
  const cache = new PrefixCache<FakeState>({ maxEntries: 2 });
  const [a, b, c] = ['a', 'b', 'c'].map((name) => new FakeState(name));
  cache.put('a', a);
  cache.put('b', b);
  expect(cache.fork('a')?.name).toBe("a'");
  cache.put('c', c);
  expect(b.disposed).toBe(true);
  expect([cache.has('a'), cache.has('b'), cache.has('c')]).toEqual([true, false, true]);
  expect(cache.fork('b')).toBeUndefined();
  expect(cache.stats()).toEqual({ entries: 2, hits: 1, misses: 1, evictions: 1 });
  const replacement = new FakeState('a2');
  cache.put('a', replacement);
  expect(a.disposed).toBe(true);
  // Putting the entry a key already holds keeps it alive; one object under two keys is refused.
  cache.put('a', replacement);
  expect(replacement.disposed).toBe(false);
  expect(() => cache.put('d', replacement)).toThrow(/already cached under another key/);
  expect(cache.has('d')).toBe(false);
  cache.maxEntries = 1;
  expect(c.disposed).toBe(true);
  expect(cache.size).toBe(1);
  cache.clear();
  expect(replacement.disposed).toBe(true);
  expect(() => new PrefixCache({ maxEntries: -1 })).toThrow(/maxEntries/);
});

describe('on a model', () => {
  let model: RetNet;
  let uncached: RetNet;
  beforeEach(async () => {
    model = await RetNet.create(CONFIG, { seed: 4 });
    uncached = await RetNet.create(CONFIG, { seed: 4 });
    uncached.scheduler({ prefixCacheEntries: 0 });
  });
  afterEach(() => {
    model.dispose();
    uncached.dispose();
  });

  test('sessions fork from a cached prefix; the state is the same size for any prefix length', async () => {
    const cache = new PrefixCache<Awaited<ReturnType<RetNet['createSession']>>>({ maxEntries: 4 });
    const sizes: number[] = [];
    // Equal digit counts keep the saved header (which records the position) the same length.
    for (const length of [100, 900]) {
      const session = model.createSession();
      await session.prefill([randomPrompt(length, length)]);
      cache.put(`p${length}`, await session.clone());
      const fork = (await cache.fork(`p${length}`))!;
      expect(fork.position).toBe(length);
      const expected = await session.step([65]);
      expect(Array.from((await fork.step([65])).logits)).toEqual(Array.from(expected.logits));
      sizes.push((await fork.save()).length);
      session.dispose();
      fork.dispose();
    }
    expect(sizes[0]).toBe(sizes[1]);
    cache.clear();
  });

  test('a change of the weights empties the cache: no request starts from a prefix the old weights made', async () => {
    const system = randomPrompt(1, 32);
    const prompt = [...system, ...randomPrompt(2, 10)];
    const options = { temperature: 0.7, seed: 9, maxTokens: 12, cachePrefixTokens: system.length };
    await tokensOf(model, prompt, options); // caches the prefix
    expect(model.scheduler().stats().prefixCache.entries).toBe(1);
    for (const m of [model, uncached]) m.native().setParam('layer_norm.weight', new Float32Array(CONFIG.decoder_embed_dim).fill(1.5));
    const hits = model.scheduler().stats().prefixHits;
    expect(await tokensOf(model, prompt, options)).toEqual(await tokensOf(uncached, prompt, options));
    expect(model.scheduler().stats().prefixHits).toBe(hits);
    // The new weights' prefix is cached again and used.
    expect(await tokensOf(model, prompt, options)).toEqual(await tokensOf(uncached, prompt, options));
    expect(model.scheduler().stats().prefixHits).toBe(hits + 1);
  });

  test('a request with cachePrefixTokens stores the prefix; the next one starts from it', async () => {
    const system = randomPrompt(1, 32);
    const first = [...system, ...randomPrompt(2, 10)];
    const second = [...system, ...randomPrompt(3, 12)];
    const options = { temperature: 0.7, seed: 9, maxTokens: 12, cachePrefixTokens: system.length };
    await tokensOf(model, first, options);
    const before = model.scheduler().stats();
    expect(before.prefillTokens).toBe(first.length);
    const tokens = await tokensOf(model, second, options);
    const after = model.scheduler().stats();
    expect(after.prefillTokens - before.prefillTokens).toBe(second.length - system.length);
    expect(after.prefixHits).toBe(1);
    expect(after.prefixTokensReused).toBe(system.length);
    expect(tokens).toEqual(await tokensOf(uncached, second, options));
    expect(uncached.scheduler().stats().prefixHits).toBe(0);
  });

  test('a prefix seen in earlier prompts is cached automatically', async () => {
    model.scheduler({ autoPrefixTokens: 16 });
    const system = randomPrompt(1, 40);
    const prompts = [4, 5, 6].map((seed) => [...system, ...randomPrompt(seed, 10)]);
    const options = { temperature: 0, maxTokens: 8 };
    const outputs: number[][] = [];
    const prefilled: number[] = [];
    for (const prompt of prompts) {
      const before = model.scheduler().stats().prefillTokens;
      outputs.push(await tokensOf(model, prompt, options));
      prefilled.push(model.scheduler().stats().prefillTokens - before);
    }
    // The second prompt sees the 32-token prefix again and caches it; the third starts from it.
    expect(prefilled).toEqual([50, 50, 50 - 32]);
    expect(model.scheduler().stats().prefixCache.entries).toBe(1);
    for (let i = 0; i < prompts.length; i++) expect(outputs[i]).toEqual(await tokensOf(uncached, prompts[i], options));
  });

  test('an identical prompt reuses its cached prefix but still prefills its last token', async () => {
    const prompt = randomPrompt(11, 24);
    const options = { temperature: 0, maxTokens: 6, cachePrefixTokens: 24 };
    const first = await tokensOf(model, prompt, options);
    const before = model.scheduler().stats().prefillTokens;
    expect(await tokensOf(model, prompt, options)).toEqual(first);
    // A cached state at the whole prompt has no logits, so the longest usable prefix is shorter.
    expect(model.scheduler().stats().prefillTokens - before).toBe(24);
  });
});
