// The batcher behind model.generate(): batched decoding matches each request alone, aborts free
// their slot and state, and the concurrency and queue caps fail cleanly.
import { execFileSync } from 'child_process';
import * as path from 'path';

import { ByteTokenizer, RetNet, Scheduler, SchedulerFullError } from '../lib';
import type { NativeModel, NativeStepSampling } from '../lib/native';
import { BYTE_MODEL_CONFIG as CONFIG, randomPrompt, tokensOf } from './helpers/byte_model';
import { mulberry32 } from './reference/retnet_ref';

/** Resolves after the event loop has run pending immediates (the scheduler's turns). */
function settle(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 20));
}

let model: RetNet;
beforeEach(async () => {
  model = await RetNet.create(CONFIG, { seed: 3 });
  // Small pieces so the longer prompts are prefilled in several pieces between decode steps.
  model.scheduler({ prefillChunkTokens: 16 });
});
afterEach(() => model.dispose());

const REQUESTS = [
  { length: 5, maxTokens: 12 },
  { length: 40, maxTokens: 20 },
  { length: 1, maxTokens: 7 },
  { length: 70, maxTokens: 16 },
  { length: 23, maxTokens: 25 },
  { length: 9, maxTokens: 3 },
];

test.each([
  ['greedy', { temperature: 0 }],
  ['sampled', { temperature: 0.9, topK: 40, topP: 0.95, repetitionPenalty: 1.1 }],
])('batched decoding gives each request the tokens it gets alone (%s)', async (_name, sampling) => {
  const requests = REQUESTS.map((r, i) => ({
    prompt: randomPrompt(100 + i, r.length),
    options: { ...sampling, maxTokens: r.maxTokens, seed: 1000 + i },
  }));
  const alone: number[][] = [];
  for (const r of requests) alone.push(await tokensOf(model, r.prompt, { ...r.options, batching: false }));
  const before = model.scheduler().stats();
  const batched = await Promise.all(requests.map((r) => tokensOf(model, r.prompt, r.options)));
  expect(batched).toEqual(alone);
  const after = model.scheduler().stats();
  const steps = after.decodeSteps - before.decodeSteps;
  const decoded = after.decodedTokens - before.decodedTokens;
  // Every token but each request's first comes from a decode step; steps were shared.
  expect(decoded).toBe(REQUESTS.reduce((sum, r) => sum + r.maxTokens - 1, 0));
  expect(steps).toBeLessThan(decoded / 2);
  expect(after.active).toBe(0);
});

test('stop sequences and requests that join later keep their own results', async () => {
  const prompt = randomPrompt(7, 12);
  const options = { temperature: 0.8, seed: 5, maxTokens: 30 };
  const full = await tokensOf(model, prompt, { ...options, batching: false });
  const long = tokensOf(model, randomPrompt(8, 30), { temperature: 0, maxTokens: 40 });
  await settle();
  // Joins while the other request is decoding.
  expect(await tokensOf(model, prompt, options)).toEqual(full);
  await long;
  const text = model.tokenizer!.decode(full);
  const stop = text.slice(10, 12);
  const cut = text.slice(0, text.indexOf(stop));
  expect(await model.generateText(prompt, { ...options, stop })).toBe(cut);
});

test('aborting a running request frees its slot and state at once; the others finish', async () => {
  const controller = new AbortController();
  const seen: number[] = [];
  const aborted = (async () => {
    for await (const chunk of model.generate(randomPrompt(1, 10), { maxTokens: 1000, signal: controller.signal, seed: 1 })) {
      seen.push(chunk.token);
      if (seen.length === 3) controller.abort();
    }
  })();
  const others = [2, 3].map((seed) => model.generateText(randomPrompt(seed, 10), { maxTokens: 40, seed }));
  await expect(aborted).rejects.toMatchObject({ name: 'AbortError' });
  expect(seen).toHaveLength(3);
  expect(model.scheduler().stats().active).toBe(2);
  await Promise.all(others);
  expect(model.scheduler().stats().active).toBe(0);
});

test('a request aborted while it waits in the queue leaves it without running', async () => {
  model.scheduler({ maxConcurrent: 1 });
  const running = model.generate(randomPrompt(1, 4), { maxTokens: 50 });
  await running.next();
  const controller = new AbortController();
  const waiting = model.generateText(randomPrompt(2, 4), { signal: controller.signal });
  await settle();
  expect(model.scheduler().stats()).toMatchObject({ active: 1, queued: 1 });
  const prefilled = model.scheduler().stats().prefillTokens;
  controller.abort();
  await expect(waiting).rejects.toMatchObject({ name: 'AbortError' });
  expect(model.scheduler().stats()).toMatchObject({ active: 1, queued: 0, prefillTokens: prefilled });
  await running.return(undefined);
  expect(model.scheduler().stats().active).toBe(0);
});

test('beyond maxConcurrent requests queue; beyond maxQueue they fail with SchedulerFullError', async () => {
  model.scheduler({ maxConcurrent: 1, maxQueue: 1 });
  const first = model.generate(randomPrompt(1, 4), { maxTokens: 20, seed: 1 });
  await first.next();
  const queued = model.generateText(randomPrompt(2, 4), { maxTokens: 5, seed: 2 });
  await settle();
  const rejected = model.generateText(randomPrompt(3, 4), { maxTokens: 5 });
  await expect(rejected).rejects.toThrow(SchedulerFullError);
  await expect(rejected).rejects.toThrow(/maxConcurrent 1.*maxQueue 1/);
  expect(model.scheduler().stats()).toMatchObject({ active: 1, queued: 1 });
  // Finishing the running request admits the queued one.
  for await (const _chunk of first);
  expect(await queued).toBe(await model.generateText(randomPrompt(2, 4), { maxTokens: 5, seed: 2, batching: false }));
  expect(model.scheduler().stats()).toMatchObject({ active: 0, queued: 0 });
});

test('invalid scheduler options and cachePrefixTokens are errors naming the field', async () => {
  expect(() => model.scheduler({ maxConcurrent: 0 })).toThrow(/maxConcurrent must be an integer >= 1/);
  expect(() => model.scheduler({ maxQueue: -1 })).toThrow(/maxQueue/);
  expect(() => model.scheduler({ prefillChunkTokens: 1.5 })).toThrow(/prefillChunkTokens/);
  await expect(model.generateText([1, 2, 3], { cachePrefixTokens: 4 })).rejects.toThrow(/cachePrefixTokens must be an integer in \[1, 3\]/);
  await expect(model.generateText([1, 2, 3], { batching: 'no' as unknown as boolean })).rejects.toThrow(
    'invalid generate option: batching must be true or false, got "no"',
  );
  for (const batching of [true, false]) {
    await expect(model.generateText([1, 2, 3], { batching, prefillMode: 'fast' as never })).rejects.toThrow(
      `invalid generate option: prefillMode must be 'parallel', 'chunkwise' or 'recurrent', got "fast"`,
    );
  }
});

test('options are read once: getters that answer differently later change nothing, and fail nothing else', async () => {
  const prompt = randomPrompt(31, 20);
  const plain = await tokensOf(model, prompt, { temperature: 0, maxTokens: 6, cachePrefixTokens: 10 });
  // Valid when checked, fractional or the other mode when read again: before, the first broke
  // the scheduler's loop (an unhandled rejection) and the second left the request waiting.
  let prefixReads = 0;
  let modeReads = 0;
  const flipping = { temperature: 0, maxTokens: 6 };
  Object.defineProperty(flipping, 'cachePrefixTokens', { get: () => (prefixReads++ === 0 ? 10 : 19.5), enumerable: true });
  Object.defineProperty(flipping, 'prefillMode', { get: () => (modeReads++ % 2 ? 'parallel' : 'chunkwise'), enumerable: true });
  expect(await tokensOf(model, prompt, flipping)).toEqual(plain);
  expect([prefixReads, modeReads]).toEqual([1, 1]);
  expect(model.scheduler().stats()).toMatchObject({ active: 0, queued: 0 });
});

test('a signal is taken only with removeEventListener, and one that throws there still gives the slot back', async () => {
  const noRemove = { aborted: false, addEventListener: () => undefined };
  await expect(model.generateText([1, 2], { maxTokens: 2, signal: noRemove as never })).rejects.toThrow(/signal must be an AbortSignal/);
  model.scheduler({ maxConcurrent: 1 });
  const throwing = {
    aborted: false,
    addEventListener: () => undefined,
    removeEventListener: () => {
      throw new Error('removeEventListener failed');
    },
  };
  for (let i = 0; i < 3; i++) {
    await expect(model.generateText([1, 2], { maxTokens: 2, signal: throwing as never })).rejects.toThrow('removeEventListener failed');
  }
  expect(model.scheduler().stats()).toMatchObject({ active: 0, queued: 0 });
  expect(await model.generateText([1, 2], { maxTokens: 2, temperature: 0 })).toBe(await model.generateText([1, 2], { maxTokens: 2, temperature: 0, batching: false }));
});

test("a failure of the scheduler's own loop fails the requests it was serving, not the process", async () => {
  const scheduler = model.scheduler();
  // A bug in the loop, outside any model call (as a prefix length read twice once was).
  const internals = scheduler as unknown as { prefillPieces: (budget: number) => Promise<number> };
  const prefillPieces = internals.prefillPieces;
  internals.prefillPieces = () => Promise.reject(new Error('a bug in the loop'));
  await expect(model.generateText([1, 2, 3], { maxTokens: 3 })).rejects.toThrow('a bug in the loop');
  internals.prefillPieces = prefillPieces;
  expect(scheduler.stats()).toMatchObject({ active: 0, queued: 0 });
  expect(await model.generateText([1, 2, 3], { maxTokens: 3, temperature: 0 })).toBe(
    await model.generateText([1, 2, 3], { maxTokens: 3, temperature: 0, batching: false }),
  );
});

test('a disposed scheduler is replaced by the next model.scheduler() call, so the model keeps serving', async () => {
  const first = model.scheduler();
  first.dispose();
  expect(first.disposed).toBe(true);
  expect(model.scheduler()).not.toBe(first);
  expect(await model.generateText(randomPrompt(3, 4), { maxTokens: 3, temperature: 0 })).toBe(
    await model.generateText(randomPrompt(3, 4), { maxTokens: 3, temperature: 0, batching: false }),
  );
});

test('disposing the model fails waiting requests and refuses new ones', async () => {
  model.scheduler({ maxConcurrent: 1 });
  const running = model.generate(randomPrompt(1, 4), { maxTokens: 50 });
  await running.next();
  const waiting = model.generateText(randomPrompt(2, 4));
  await settle();
  model.dispose();
  await expect(waiting).rejects.toThrow(/disposed/);
  await expect(running.next()).rejects.toThrow(/disposed/);
  await expect(model.generateText([1, 2])).rejects.toThrow(/disposed/);
});

test('a stream dropped after its first token gives its slot back once collected', () => {
  // In a child with --expose-gc: a collection is what frees the slot.
  const lib = JSON.stringify(path.join(__dirname, '..', 'dist', 'lib'));
  const script = `
    const { RetNet } = require(${lib});
    (async () => {
      const model = await RetNet.create(${JSON.stringify(CONFIG)}, { seed: 3 });
      model.scheduler({ maxConcurrent: 2, maxQueue: 4 });
      for (let i = 0; i < 2; i++) await model.generate([1, 2, 3], { maxTokens: 50 }).next(); // then dropped
      console.log('active', model.scheduler().stats().active);
      for (let i = 0; i < 5; i++) { gc(); await new Promise((resolve) => setTimeout(resolve, 10)); }
      console.log('active', model.scheduler().stats().active);
      let tokens = 0;
      for await (const _ of model.generate([1, 2, 3], { maxTokens: 4 })) tokens++;
      console.log('tokens', tokens);
      model.dispose();
    })();`;
  const out = execFileSync(process.execPath, ['--expose-gc', '-e', script], { encoding: 'utf8', timeout: 60_000 });
  expect(out.split('\n')).toEqual(['active 2', 'active 0', 'tokens 4', '']);
});

test('a consumer slower than the decode steps gets the tokens it gets alone, and the fast one too', async () => {
  const options = { temperature: 0.9, topK: 40, repetitionPenalty: 1.1, maxTokens: 24 };
  const prompts = [randomPrompt(11, 6), randomPrompt(12, 9)];
  const alone = await Promise.all(prompts.map((p, i) => tokensOf(model, p, { ...options, seed: i, batching: false })));
  const slow = (async () => {
    const tokens: number[] = [];
    // Pauses of several steps: the run goes ahead of this consumer until it may go no further.
    for await (const chunk of model.generate(prompts[0], { ...options, seed: 0 })) {
      tokens.push(chunk.token);
      if (tokens.length % 3 === 0) await settle();
    }
    return tokens;
  })();
  const fast = tokensOf(model, prompts[1], { ...options, seed: 1 });
  expect(await Promise.all([slow, fast])).toEqual(alone);
});

// Steps of about a millisecond here, far longer than a consumer takes to ask for the next one:
// decode runs go on until a limit ends them, not because the consumers fall behind.
const SLOWER = { ...CONFIG, decoder_embed_dim: 384, decoder_value_embed_dim: 384, decoder_ffn_embed_dim: 768, decoder_layers: 4 };

test('decode runs take no step past maxTokens or a stop token, and few past a consumer that stops asking', async () => {
  const slower = await RetNet.create(SLOWER, { seed: 4 });
  const prompt = randomPrompt(13, 5);
  const full = await tokensOf(slower, prompt, { temperature: 0, maxTokens: 40, batching: false });
  const stopToken = full[20];
  const stopAt = full.indexOf(stopToken);
  const steps = (): number => slower.scheduler().stats().decodeSteps;
  let before = steps();
  expect(await tokensOf(slower, prompt, { temperature: 0, maxTokens: 40, stopTokens: [stopToken] })).toEqual(full.slice(0, stopAt + 1));
  expect(steps() - before).toBe(stopAt);
  before = steps();
  expect(await tokensOf(slower, prompt, { temperature: 0, maxTokens: 9 })).toEqual(full.slice(0, 9));
  expect(steps() - before).toBe(8);
  // Asked for 4 tokens (3 steps), the run goes at most 2 steps further while the consumer waits.
  before = steps();
  const stream = slower.generate(prompt, { temperature: 0, maxTokens: 40 });
  for (let i = 0; i < 4; i++) expect((await stream.next()).value.token).toBe(full[i]);
  await new Promise((resolve) => setTimeout(resolve, 100));
  expect(steps() - before).toBeGreaterThanOrEqual(3);
  expect(steps() - before).toBeLessThanOrEqual(5);
  await stream.return(undefined);
  slower.dispose();
});

test('when generate() returns, no decode run holds the model: it can change weights at once', async () => {
  const slower = await RetNet.create(SLOWER, { seed: 4 });
  const native = slower.native();
  const name = native.paramNames()[0];
  const weights = native.getParam(name);
  for (const options of [{ stop: 'e' }, {}]) {
    let tokens = 0;
    // A run goes ahead of the consumer; breaking out (or a stop sequence) must wait for its step.
    for await (const _chunk of slower.generate(randomPrompt(14, 5), { temperature: 1, seed: 3, maxTokens: 500, ...options })) {
      if (++tokens === 30) break;
    }
    expect(() => native.setParam(name, weights)).not.toThrow();
  }
  slower.dispose();
});

test('mixed requests (late joins, pauses, breaks, aborts, stop tokens) each get their tokens alone, or a prefix', async () => {
  const rand = mulberry32(77);
  const pick = (n: number): number => Math.floor(rand() * n);
  for (let wave = 0; wave < 8; wave++) {
    const requests = Array.from({ length: 1 + pick(10) }, (_, i) => ({
      prompt: randomPrompt(wave * 100 + i, 1 + pick(40)),
      options: {
        temperature: rand() < 0.3 ? 0 : 0.9,
        topK: rand() < 0.5 ? 0 : 40,
        repetitionPenalty: rand() < 0.5 ? 1 : 1.1,
        maxTokens: 1 + pick(50),
        seed: wave * 100 + i,
        ...(rand() < 0.3 ? { stopTokens: [pick(256)] } : {}),
      },
      breakAt: rand() < 0.3 ? 1 + pick(30) : -1,
      abortAt: rand() < 0.2 ? 1 + pick(30) : -1,
      pauses: rand() < 0.3,
      delay: rand() < 0.5 ? pick(20) : 0,
    }));
    const alone = [];
    for (const r of requests) alone.push(await tokensOf(model, r.prompt, { ...r.options, batching: false }));
    const batched = await Promise.all(
      requests.map(async (r) => {
        await new Promise((resolve) => setTimeout(resolve, r.delay));
        const controller = new AbortController();
        const tokens: number[] = [];
        try {
          for await (const chunk of model.generate(r.prompt, { ...r.options, signal: controller.signal })) {
            tokens.push(chunk.token);
            if (tokens.length === r.breakAt) break;
            if (tokens.length === r.abortAt) controller.abort();
            if (r.pauses && tokens.length % 4 === 0) await new Promise((resolve) => setTimeout(resolve, 3));
          }
        } catch (e) {
          if ((e as Error).name !== 'AbortError') throw e;
        }
        return tokens;
      }),
    );
    requests.forEach((r, i) => {
      const ends = r.breakAt < 0 && r.abortAt < 0;
      expect([wave, i, batched[i]]).toEqual([wave, i, ends ? alone[i] : alone[i].slice(0, batched[i].length)]);
      if (!ends) expect(batched[i].length).toBeLessThanOrEqual(Math.min(...[r.breakAt, r.abortAt].filter((n) => n > 0)));
    });
  }
  expect(model.scheduler().stats().active).toBe(0);
});

test('a decode run is stopped after RUN_SLICE_MS (100 ms), and is granted steps as its consumer asks', async () => {
  // A fake native model: the test plays the run's worker, so the timing is the test's.
  let onStep: ((tokens: Int32Array) => void) | undefined;
  let finish: ((steps: number) => void) | undefined;
  const calls = { stops: 0, grants: [] as number[], granted: 0 };
  const native = {
    weightVersion: () => 0,
    createState: () => ({ dispose: () => undefined }),
    prefillBatch: async (_s: unknown, _t: unknown, _l: unknown, _m: unknown, _c: unknown, outputs: Float32Array[], sampling: NativeStepSampling) => {
      sampling.sampled.fill(65);
      return outputs;
    },
    decodeRun: (_s: unknown, _t: unknown, _d: unknown, _m: unknown, _x: unknown, granted: number, step: (tokens: Int32Array) => void) => {
      onStep = step;
      calls.granted = granted;
      return {
        done: new Promise<number>((resolve) => (finish = resolve)),
        grant: (steps: number) => calls.grants.push(steps),
        stop: () => calls.stops++,
      };
    },
  };
  const owner = { vocabSize: 256, defaultChunkSize: 8, native: () => native as unknown as NativeModel, stateLayout: () => ({ layers: 1, heads: 1, keyDim: 2, valueDim: 2 }) };
  const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
  jest.useFakeTimers({ doNotFake: ['setImmediate', 'nextTick', 'queueMicrotask'] });
  try {
    const stream = new Scheduler(owner).generate([1, 2, 3], new ByteTokenizer(), { maxTokens: 100 });
    expect((await stream.next()).value.token).toBe(65); // drawn by the prefill
    const second = stream.next(); // its step starts a run
    while (!onStep) await turn();
    expect(calls.granted).toBe(3); // the step asked for and two ahead
    onStep(Int32Array.of(66));
    expect((await second).value.token).toBe(66);
    const third = stream.next(); // asks for the run's next step: two more are granted
    await turn();
    expect(calls.grants).toEqual([4]);
    jest.advanceTimersByTime(99);
    expect(calls.stops).toBe(0);
    jest.advanceTimersByTime(1);
    expect(calls.stops).toBe(1);
    onStep(Int32Array.of(67));
    expect((await third).value.token).toBe(67);
    finish!(2);
    await stream.return(undefined);
  } finally {
    jest.useRealTimers();
  }
});

test('generate(), alone and batched, in every prefill mode, draws what a session stepped by hand draws', async () => {
  const prompt = randomPrompt(21, 37);
  const argmax = (logits: Float32Array): number => logits.reduce((best, x, i) => (x > logits[best] ? i : best), 0);
  for (const mode of ['chunkwise', 'parallel', 'recurrent'] as const) {
    const session = model.createSession();
    let { logits } = await session.prefill([prompt], { mode });
    const byHand: number[] = [];
    for (let k = 0; k < 12; k++) {
      byHand.push(argmax(logits));
      if (k < 11) ({ logits } = await session.step([byHand[k]]));
    }
    session.dispose();
    const options = { temperature: 0, maxTokens: 12, prefillMode: mode };
    expect([mode, await tokensOf(model, prompt, { ...options, batching: false })]).toEqual([mode, byHand]);
    expect([mode, await tokensOf(model, prompt, options)]).toEqual([mode, byHand]);
  }
});

test("batching: false runs outside the model's scheduler: none of its limits, none of its steps", async () => {
  model.scheduler({ maxConcurrent: 1, maxQueue: 0 });
  const running = model.generate(randomPrompt(1, 4), { maxTokens: 50 });
  await running.next();
  await expect(model.generateText(randomPrompt(2, 4), { maxTokens: 5 })).rejects.toThrow(SchedulerFullError);
  const steps = model.scheduler().stats().decodeSteps;
  expect(await tokensOf(model, randomPrompt(2, 4), { maxTokens: 5, seed: 2, batching: false })).toHaveLength(5);
  expect(model.scheduler().stats()).toMatchObject({ active: 1, decodeSteps: steps });
  await running.return(undefined);
});
