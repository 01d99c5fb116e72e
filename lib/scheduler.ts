// Continuous batching for one model: concurrent generate() calls share one batched decode step
// per token. A request joins the batch at the first step after its prompt is prefilled and leaves
// when it finishes or is aborted; prompts are prefilled in pieces between decode steps, so a long
// prompt delays the running sequences by at most one piece per step. Each request keeps its own
// sampler, seed, stop sequences and AbortSignal in generateFromSession; only the model calls go
// through the scheduler, and each decode step also draws every sequence's next token with that
// sequence's sampler, on the step's worker. Decode steps run in native runs (model.decodeRun):
// each step's drawn tokens are fed straight back, with no trip through JS between steps, while
// the consumers take them up to RUN_LEAD steps behind.
import { DecodeSession, DecodeStepOptions, GenerateChunk, GenerateOptions, StepSampling, generateFromSession } from './generate';
import type { NativeDecodeRun, NativeSampler, NativeState, NativeStepSampling } from './native';
import { PrefixCache, PrefixCacheStats, prefixKeys } from './prefix_cache';
import { PrefillMode, PrefillOptions, Session, SessionOwner, checkPrefillOptions } from './session';
import { optionsObject } from './typed';
import type { Tokenizer } from './tokenizer';

export interface SchedulerOptions {
  /** Most sequences prefilling or decoding at once; later requests wait in the queue. Default 64. */
  maxConcurrent?: number;
  /** Most requests waiting for a slot; beyond it generate() fails with a SchedulerFullError. Default 256. */
  maxQueue?: number;
  /** Prompt tokens prefilled between two decode steps (pieces end at multiples of it). Default 256. */
  prefillChunkTokens?: number;
  /** Prefix states kept (LRU); 0 turns the prefix cache off. Default 16. */
  prefixCacheEntries?: number;
  /**
   * Prompt-prefix lengths, in multiples of this many tokens, at which a prefix seen in an earlier
   * prompt is cached automatically (e.g. a shared system prompt); 0 turns that off. Default 64.
   */
  autoPrefixTokens?: number;
}

export interface BatchingOptions {
  /**
   * false runs the request alone: its own decode steps, batched with no other request, outside
   * the model's scheduler (its limits, queue and prefix cache). Default true.
   */
  batching?: boolean;
  /**
   * Keep the state after the first N prompt tokens (e.g. a system prompt) in the prefix cache;
   * later requests giving the same N and the same first N tokens start from it.
   */
  cachePrefixTokens?: number;
}

export interface ScheduledGenerateOptions extends GenerateOptions, BatchingOptions {
  /** Prefill form for the prompt pieces (default 'chunkwise'). */
  prefillMode?: PrefillMode;
}

export interface SchedulerStats {
  /** Sequences holding a slot (prefilling or decoding). */
  active: number;
  /** Requests waiting for a slot. */
  queued: number;
  decodeSteps: number;
  /** Tokens decoded, summed over steps (decodedTokens / decodeSteps is the mean batch size). */
  decodedTokens: number;
  /** Prompt tokens run through prefill (not counting those taken from the prefix cache). */
  prefillTokens: number;
  /** Requests that started from a cached prefix, and the prompt tokens that saved. */
  prefixHits: number;
  prefixTokensReused: number;
  prefixCache: PrefixCacheStats;
}

/** Thrown by generate() when every slot is busy and the queue is full; retry later. */
export class SchedulerFullError extends Error {
  override readonly name = 'SchedulerFullError';
}

const DEFAULTS = {
  maxConcurrent: 64,
  maxQueue: 256,
  prefillChunkTokens: 256,
  prefixCacheEntries: 16,
  autoPrefixTokens: 64,
};
const NO_IDS = new Int32Array(0);
/**
 * How many steps a decode run may go ahead of the slowest consumer's last request. Two keeps the
 * worker busy while a consumer takes a token, and bounds the steps done for nothing when one
 * stops at a stop sequence.
 */
const RUN_LEAD = 2;
/**
 * A run holds one of libuv's threads (4 by default) while it lasts; it ends after this long, so
 * file reads and other calls queued behind busy threads wait at most that, at the cost of one
 * trip through JS (~0.4 ms on the 2-core VM) per slice.
 */
const RUN_SLICE_MS = 100;
/** Prefix keys remembered for automatic caching (a key is ~60 bytes). */
const SEEN_PREFIX_LIMIT = 4096;

type Phase = 'idle' | 'queued' | 'prefill' | 'ready' | 'running';

/** Decode steps one native call takes for some sequences (model.decodeRun). */
interface DecodeRun {
  readonly sequences: Sequence[];
  control?: NativeDecodeRun;
  /** Settles once the run's worker let go of the model and its tokens were handed out. */
  readonly ended: Promise<void>;
}

function abortError(signal: AbortSignal): Error {
  const error = new Error('generation aborted', { cause: signal.reason });
  error.name = 'AbortError';
  return error;
}

function checkCount(value: number, field: keyof SchedulerOptions, min: number): number {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new Error(`invalid scheduler option: ${field} must be an integer >= ${min}, got ${String(value)}`);
  }
  return value;
}

/** One request as the DecodeSession that generateFromSession drives; the scheduler makes its model calls. */
class Sequence implements DecodeSession {
  readonly batch = 1;
  position = 0;
  phase: Phase = 'idle';
  released = false;
  /** Holds a concurrency slot. */
  admitted = false;
  session: Session | undefined;
  state: NativeState | undefined;
  /** Prompt tokens consumed so far (from the prefix cache or prefill). */
  prefilled = 0;
  /** Prompt length after which the state goes into the prefix cache (0: none), and its key. */
  snapshotAt = 0;
  snapshotKey = '';
  /** The model's weight version when this sequence started: its snapshot is cached only under it. */
  weightVersion = -1;
  /** The token the next decode step consumes. */
  nextToken = 0;
  /** Where decode steps write this sequence's logits; it reads them before its next step. */
  logits: Float32Array | undefined;
  /** The draw the next decode step makes for this sequence (its generator's sampler), if any. */
  draw: StepSampling | undefined;
  /** Steps the consumer may feed back from the next one on (its step call's feedSteps). */
  feedSteps = 1;
  /** The decode run stepping this sequence, until it ends. */
  run: DecodeRun | undefined;
  /** Tokens a run drew for steps the consumer has not asked for yet, oldest first. */
  readonly ahead: number[] = [];
  /** The last token handed to the consumer: the one a run feeds next. */
  handedOut = -1;
  /** Step calls the consumer made during the current run (the first one started it). */
  runCalls = 0;
  /** The error of the run this sequence was in, for its next step call. */
  runError: Error | undefined;
  private resolveWait: ((result: { logits: Float32Array; token?: number }) => void) | undefined;
  private rejectWait: ((error: Error) => void) | undefined;

  constructor(
    private readonly scheduler: Scheduler,
    readonly prompt: Int32Array,
    readonly options: ScheduledGenerateOptions,
  ) {}

  // The prompt is the one given at construction; its pieces are prefilled as views of it.
  prefill(_tokens?: number[][], options?: PrefillOptions & Pick<DecodeStepOptions, 'sample'>): Promise<{ logits: Float32Array; token?: number }> {
    const result = this.wait();
    this.draw = options?.sample;
    this.scheduler.admit(this);
    return result;
  }

  step(tokenIds: number[], options?: DecodeStepOptions): Promise<{ logits: Float32Array; token?: number }> {
    const result = this.wait();
    this.draw = options?.sample;
    this.feedSteps = options?.feedSteps ?? 1;
    this.scheduler.enqueueStep(this, tokenIds[0]);
    return result;
  }

  /** Whether the consumer waits for a token. */
  get waiting(): boolean {
    return this.resolveWait !== undefined;
  }

  dispose(): void {
    this.scheduler.release(this);
  }

  settle(logits: Float32Array, token?: number): void {
    const resolve = this.resolveWait;
    this.resolveWait = this.rejectWait = undefined;
    this.phase = 'idle';
    if (token !== undefined) this.handedOut = token;
    resolve?.(token === undefined ? { logits } : { logits, token });
  }

  fail(error: Error): void {
    const reject = this.rejectWait;
    this.resolveWait = this.rejectWait = undefined;
    this.phase = 'idle';
    reject?.(error);
  }

  private wait(): Promise<{ logits: Float32Array; token?: number }> {
    return new Promise((resolve, reject) => {
      this.resolveWait = resolve;
      this.rejectWait = reject;
    });
  }
}

/**
 * The `sampling` of a prefillBatch call over `sequences`: each one with a pending
 * draw that `draws` picks has its next token drawn on the call's worker (both threads, instead
 * of one by one on this thread) and its draw taken. Undefined when none draws.
 */
function drawsOnWorker(sequences: Sequence[], draws: (sequence: Sequence, i: number) => boolean): NativeStepSampling | undefined {
  let sampling: NativeStepSampling | undefined;
  sequences.forEach((sequence, i) => {
    const draw = sequence.draw;
    if (!draw || !draws(sequence, i)) return;
    sampling ??= {
      samplers: new Array<NativeSampler | null>(sequences.length).fill(null),
      histories: new Array<Int32Array>(sequences.length).fill(NO_IDS),
      vocab: new Int32Array(sequences.length).fill(1),
      sampled: new Int32Array(sequences.length),
    };
    const { sampler, history } = draw.sampler.drawArgs(draw.history, draw.vocabSize);
    sampling.samplers[i] = sampler;
    sampling.histories[i] = history;
    sampling.vocab[i] = draw.vocabSize;
    sequence.draw = undefined;
  });
  return sampling;
}

/** The token call `sampling` drew for sequence `i`, if it drew one. */
function drawnToken(sampling: NativeStepSampling | undefined, i: number): number | undefined {
  return sampling?.samplers[i] ? sampling.sampled[i] : undefined;
}

/** What a dropped stream's finalizer needs: its sequence, once it has one (never the stream itself). */
interface AbandonTicket {
  sequence?: Sequence;
}

export class Scheduler {
  private maxConcurrent = DEFAULTS.maxConcurrent;
  private maxQueue = DEFAULTS.maxQueue;
  private prefillChunkTokens = DEFAULTS.prefillChunkTokens;
  private autoPrefixTokens = DEFAULTS.autoPrefixTokens;
  private readonly prefixCache = new PrefixCache<NativeState>({ maxEntries: DEFAULTS.prefixCacheEntries });
  /** Prefix keys of earlier prompts, oldest first: a prefix seen again is worth caching. */
  private readonly seenPrefixes = new Set<string>();
  /** The weight version the cached prefix states were computed with. */
  private cacheWeightVersion = -1;

  private active = 0;
  private readonly queue: Sequence[] = [];
  private readonly prefilling: Sequence[] = [];
  // Sequences waiting for the next decode run.
  private ready: Sequence[] = [];
  private running: DecodeRun | undefined;
  private looping = false;
  private isDisposed = false;
  // A stream suspended at a token its consumer never asks past holds a slot that only its
  // finally block frees; when the consumer drops the stream instead, this frees it.
  private readonly abandoned = new FinalizationRegistry<AbandonTicket>((ticket) => {
    // Nothing may escape a finalizer: an exception there would end the process.
    try {
      if (ticket.sequence) this.release(ticket.sequence);
    } catch {
      // The slot stays taken; the model's dispose() still frees everything.
    }
  });

  private decodeSteps = 0;
  private decodedTokens = 0;
  private prefillTokens = 0;
  private prefixHits = 0;
  private prefixTokensReused = 0;

  constructor(
    private readonly owner: SessionOwner,
    options: SchedulerOptions = {},
  ) {
    this.configure(options);
  }

  /** Changes the limits; absent fields keep their current values. Running requests are unaffected. */
  configure(options: SchedulerOptions): void {
    const maxConcurrent = checkCount(options.maxConcurrent ?? this.maxConcurrent, 'maxConcurrent', 1);
    const maxQueue = checkCount(options.maxQueue ?? this.maxQueue, 'maxQueue', 0);
    const prefillChunkTokens = checkCount(options.prefillChunkTokens ?? this.prefillChunkTokens, 'prefillChunkTokens', 1);
    const prefixCacheEntries = checkCount(options.prefixCacheEntries ?? this.prefixCache.maxEntries, 'prefixCacheEntries', 0);
    const autoPrefixTokens = checkCount(options.autoPrefixTokens ?? this.autoPrefixTokens, 'autoPrefixTokens', 0);
    this.maxConcurrent = maxConcurrent;
    this.maxQueue = maxQueue;
    this.prefillChunkTokens = prefillChunkTokens;
    this.prefixCache.maxEntries = prefixCacheEntries;
    this.autoPrefixTokens = autoPrefixTokens;
    this.admitWaiting();
  }

  stats(): SchedulerStats {
    return {
      active: this.active,
      queued: this.queue.length,
      decodeSteps: this.decodeSteps,
      decodedTokens: this.decodedTokens,
      prefillTokens: this.prefillTokens,
      prefixHits: this.prefixHits,
      prefixTokensReused: this.prefixTokensReused,
      prefixCache: this.prefixCache.stats(),
    };
  }

  /**
   * Streams the continuation of `promptTokens` like generateFromSession, with this request's model
   * calls batched with the other running requests. Fails with a SchedulerFullError when every slot
   * is busy and the queue is full. A stream dropped without being finished or closed (return())
   * gives its slot back when it is garbage-collected.
   */
  generate(promptTokens: number[], tokenizer: Tokenizer, options: ScheduledGenerateOptions = {}): AsyncGenerator<GenerateChunk> {
    const ticket: AbandonTicket = {};
    const stream = this.stream(promptTokens, tokenizer, optionsObject(options, 'generate'), ticket);
    this.abandoned.register(stream, ticket, ticket);
    return stream;
  }

  private async *stream(
    promptTokens: number[],
    tokenizer: Tokenizer,
    options: ScheduledGenerateOptions,
    ticket: AbandonTicket,
  ): AsyncGenerator<GenerateChunk> {
    if (this.isDisposed) throw new Error('the scheduler was disposed');
    checkPrefillOptions({ mode: options.prefillMode }, this.owner.defaultChunkSize, 'invalid generate option: prefillMode');
    const { cachePrefixTokens } = options;
    if (cachePrefixTokens !== undefined && !(Number.isSafeInteger(cachePrefixTokens) && cachePrefixTokens >= 1 && cachePrefixTokens <= promptTokens.length)) {
      throw new Error(
        `invalid generate option: cachePrefixTokens must be an integer in [1, ${promptTokens.length}] (the prompt length), got ${String(cachePrefixTokens)}`,
      );
    }
    const sequence = new Sequence(this, Int32Array.from(promptTokens), options);
    ticket.sequence = sequence;
    const { signal } = options;
    const onAbort = (): void => this.cancelWaiting(sequence, abortError(signal!));
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      yield* generateFromSession(sequence, promptTokens, tokenizer, options);
    } finally {
      try {
        signal?.removeEventListener('abort', onAbort);
      } finally {
        // Even when a signal-like object's removeEventListener throws: the slot comes back.
        this.release(sequence);
        this.abandoned.unregister(ticket);
        // A run still stepping this sequence stops after its step: the model is free when this returns.
        await sequence.run?.ended;
      }
    }
  }

  /** Whether dispose() ran (model.scheduler() then makes a new one). */
  get disposed(): boolean {
    return this.isDisposed;
  }

  /** Fails every waiting request, frees the cached prefixes and refuses new requests. */
  dispose(): void {
    this.isDisposed = true;
    const error = new Error('the scheduler was disposed');
    for (const sequence of [...this.queue, ...this.prefilling, ...this.ready]) this.cancelWaiting(sequence, error);
    this.running?.control?.stop();
    this.prefixCache.clear();
  }

  /** @internal A sequence's prompt is ready to prefill: take a slot, or queue for one. */
  admit(sequence: Sequence): void {
    if (this.isDisposed) {
      sequence.fail(new Error('the scheduler was disposed'));
    } else if (this.active < this.maxConcurrent) {
      this.active++;
      sequence.admitted = true;
      sequence.phase = 'prefill';
      this.prefilling.push(sequence);
      this.wake();
    } else if (this.queue.length < this.maxQueue) {
      sequence.phase = 'queued';
      this.queue.push(sequence);
    } else {
      sequence.fail(
        new SchedulerFullError(
          `too many requests: ${this.active} sequences running (maxConcurrent ${this.maxConcurrent}) and ${this.queue.length} waiting (maxQueue ${this.maxQueue})`,
        ),
      );
    }
  }

  /** @internal */
  enqueueStep(sequence: Sequence, token: number): void {
    if (sequence.run || sequence.ahead.length > 0 || sequence.runError) {
      this.continueRun(sequence, token);
      return;
    }
    sequence.nextToken = token;
    sequence.phase = 'ready';
    this.ready.push(sequence);
    this.wake();
  }

  /** A step call of a sequence that a run stepped ahead of its consumer, or is stepping. */
  private continueRun(sequence: Sequence, token: number): void {
    const { run, runError } = sequence;
    if (runError) {
      sequence.runError = undefined;
      sequence.fail(runError);
      return;
    }
    // The run feeds back the token it drew; generateFromSession asks for exactly that one.
    if (token !== sequence.handedOut) {
      sequence.fail(new Error(`scheduler: step(${token}) after the run drew ${sequence.handedOut}`));
      return;
    }
    if (sequence.ahead.length > 0) {
      sequence.settle(sequence.logits!, sequence.ahead.shift());
    } else {
      sequence.phase = 'running';
    }
    if (!run) return;
    sequence.runCalls++;
    let slowest = Infinity;
    for (const s of run.sequences) if (!s.released) slowest = Math.min(slowest, s.runCalls);
    run.control?.grant(slowest + RUN_LEAD);
  }

  /** @internal Frees the sequence's state and slot, whatever it was doing. */
  release(sequence: Sequence): void {
    if (sequence.released) return;
    sequence.released = true;
    sequence.run?.control?.stop();
    this.removeFromLists(sequence);
    sequence.session?.dispose();
    sequence.session = sequence.state = undefined;
    if (sequence.admitted) {
      sequence.admitted = false;
      this.active--;
      this.admitWaiting();
    }
  }

  /** Ends a request that is waiting for its turn (not one whose model call is running). */
  private cancelWaiting(sequence: Sequence, error: Error): void {
    if (sequence.phase === 'running' || sequence.phase === 'idle') return;
    this.removeFromLists(sequence);
    sequence.fail(error);
  }

  private removeFromLists(sequence: Sequence): void {
    for (const list of [this.queue, this.prefilling, this.ready]) {
      const at = list.indexOf(sequence);
      if (at !== -1) list.splice(at, 1);
    }
  }

  private admitWaiting(): void {
    while (this.active < this.maxConcurrent && this.queue.length > 0) this.admit(this.queue.shift()!);
  }

  private wake(): void {
    // New work ends a run after its step: the next one takes every sequence that is ready.
    this.running?.control?.stop();
    if (this.looping) return;
    this.looping = true;
    setImmediate(() => this.loop().catch((error: unknown) => this.failInFlight(error)));
  }

  // The loop's own failure (a bug, since the model calls' errors go to their sequences): the
  // requests it was serving get the error, later ones are served, and nothing is left to fail
  // the process as an unhandled rejection.
  private failInFlight(error: unknown): void {
    const failure = error instanceof Error ? error : new Error(`scheduler: ${String(error)}`);
    for (const sequence of [...this.prefilling, ...this.ready]) this.cancelWaiting(sequence, failure);
  }

  // One decode step for every sequence waiting for one, then up to prefillChunkTokens of prompt,
  // repeated while there is work. A macrotask turn between rounds lets the consumers of the last
  // step's tokens ask for the next one, so they all join the same step.
  private async loop(): Promise<void> {
    try {
      while (this.ready.length > 0 || this.prefilling.length > 0) {
        if (this.ready.length > 0) await this.decodeRun();
        let budget = this.prefillChunkTokens;
        while (budget > 0 && this.prefilling.length > 0) budget -= await this.prefillPieces(budget);
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.looping = false;
    }
  }

  // Decode steps for every ready sequence in one native run, one step only while prompts wait
  // to prefill (they interleave step by step). The run hands each step's tokens to the waiting
  // consumers and keeps the others' for their next step calls.
  private async decodeRun(): Promise<void> {
    const batch = this.ready;
    this.ready = [];
    let endRun!: () => void;
    const run: DecodeRun = { sequences: batch, ended: new Promise<void>((resolve) => (endRun = resolve)) };
    let error: Error | undefined;
    let slice: NodeJS.Timeout | undefined;
    try {
      const count = batch.length;
      const tokens = new Int32Array(count);
      const sampling = { samplers: new Array<NativeSampler>(count), histories: new Array<Int32Array>(count), vocab: new Int32Array(count) };
      const maxSteps = new Int32Array(count);
      const stopTokens = new Array<Int32Array>(count);
      batch.forEach((sequence, i) => {
        sequence.phase = 'running';
        sequence.run = run;
        sequence.runCalls = 1;
        const draw = sequence.draw;
        if (!draw) throw new Error("scheduler: a decode step needs the sequence's sampler");
        sequence.draw = undefined;
        ({ sampler: sampling.samplers[i], history: sampling.histories[i] } = draw.sampler.drawArgs(draw.history, draw.vocabSize));
        sampling.vocab[i] = draw.vocabSize;
        tokens[i] = sequence.nextToken;
        maxSteps[i] = Math.min(sequence.feedSteps, 2 ** 31 - 1);
        stopTokens[i] = draw.stopTokens;
      });
      const granted = this.prefilling.length > 0 ? 1 : 1 + RUN_LEAD;
      const states = batch.map((sequence) => sequence.state!);
      run.control = this.owner.native().decodeRun(states, tokens, sampling, maxSteps, stopTokens, granted, (drawn) => this.handOut(run, drawn));
      this.running = run;
      slice = setTimeout(() => run.control?.stop(), RUN_SLICE_MS).unref();
      await run.control.done;
    } catch (e) {
      error = e as Error;
    } finally {
      clearTimeout(slice);
      this.running = undefined;
      for (const sequence of batch) {
        sequence.run = undefined;
        if (sequence.released) continue;
        if (error) {
          sequence.ahead.length = 0;
          if (sequence.waiting) sequence.fail(error);
          else sequence.runError = error;
        } else if (sequence.waiting) {
          // Its consumer asked for a step the run did not take.
          this.enqueueStep(sequence, sequence.handedOut);
        }
      }
      endRun();
    }
  }

  /** One step of `run`: its drawn tokens to the consumers waiting for them, or kept for their next call. */
  private handOut(run: DecodeRun, drawn: Int32Array): void {
    this.decodeSteps++;
    this.decodedTokens += drawn.length;
    run.sequences.forEach((sequence, i) => {
      sequence.position++;
      if (sequence.released) return;
      if (sequence.waiting) sequence.settle(sequence.logits!, drawn[i]);
      else sequence.ahead.push(drawn[i]);
    });
  }

  /**
   * Prefills the next piece of waiting prompts, in order, until `budget` tokens are taken (at
   * least one piece), in one native call per prefill mode: the products of every piece run
   * together, each state as if alone. Resolves how many tokens that took. Pieces end at
   * multiples of prefillChunkTokens (and where the prefix cache takes a snapshot), so a prompt
   * is cut the same way however many other requests are running. A prompt not started yet
   * waits for a call that caches no prefix: it may start from that prefix.
   */
  private async prefillPieces(budget: number): Promise<number> {
    const pieces: Array<{ sequence: Sequence; start: number; end: number }> = [];
    let taken = 0;
    let snapshotting = false;
    for (const sequence of [...this.prefilling]) {
      if (taken >= budget) break;
      if (!sequence.session) {
        if (snapshotting) break;
        try {
          this.startFromPrefixCache(sequence);
        } catch (e) {
          this.removeFromLists(sequence);
          sequence.fail(e as Error);
          continue;
        }
      }
      const start = sequence.prefilled;
      let end = Math.min(sequence.prompt.length, (Math.floor(start / this.prefillChunkTokens) + 1) * this.prefillChunkTokens);
      if (sequence.snapshotAt > start && sequence.snapshotAt < end) end = sequence.snapshotAt;
      snapshotting ||= end === sequence.snapshotAt;
      sequence.phase = 'running';
      pieces.push({ sequence, start, end });
      taken += end - start;
    }
    for (const mode of new Set(pieces.map((p) => p.sequence.options.prefillMode ?? 'chunkwise'))) {
      const group = pieces.filter((p) => (p.sequence.options.prefillMode ?? 'chunkwise') === mode);
      const tokens = new Int32Array(group.reduce((n, p) => n + p.end - p.start, 0));
      let offset = 0;
      for (const p of group) {
        tokens.set(p.sequence.prompt.subarray(p.start, p.end), offset);
        offset += p.end - p.start;
      }
      const outputs = group.map((p) => (p.sequence.logits ??= new Float32Array(this.owner.vocabSize)));
      // A piece that ends its prompt draws the first token too.
      const sampling = drawsOnWorker(
        group.map((p) => p.sequence),
        (sequence, i) => group[i].end === sequence.prompt.length,
      );
      try {
        await this.owner.native().prefillBatch(
          group.map((p) => p.sequence.state!),
          tokens,
          Int32Array.from(group, (p) => p.end - p.start),
          mode,
          this.owner.defaultChunkSize,
          outputs,
          sampling,
        );
      } catch (e) {
        for (const { sequence } of group) {
          this.removeFromLists(sequence);
          sequence.fail(e as Error);
        }
        continue;
      }
      group.forEach((piece, i) => {
        this.prefillTokens += piece.end - piece.start;
        this.finishPiece(piece.sequence, piece.end, drawnToken(sampling, i));
      });
    }
    return Math.max(1, taken);
  }

  /**
   * After a prefilled piece that ends at `end`: the prefix snapshot, then the first logits (and
   * `token`, when the piece drew it) or the next piece.
   */
  private finishPiece(sequence: Sequence, end: number, token: number | undefined): void {
    sequence.prefilled = end;
    sequence.position = end;
    if (sequence.released) return;
    if (end === sequence.snapshotAt && !this.isDisposed && this.refreshPrefixCache() === sequence.weightVersion) {
      this.prefixCache.put(sequence.snapshotKey, sequence.state!.clone());
    }
    if (end === sequence.prompt.length) {
      this.prefilling.splice(this.prefilling.indexOf(sequence), 1);
      sequence.settle(sequence.logits!, token);
    } else {
      sequence.phase = 'prefill';
      // An abort during the piece found it running; stop before the next one.
      const { signal } = sequence.options;
      if (signal?.aborted) this.cancelWaiting(sequence, abortError(signal));
    }
  }

  /**
   * Empties the prefix cache if the weights changed since its states were computed (a training
   * step, setParam): those states belong to the old weights. Returns the weight version it now holds.
   */
  private refreshPrefixCache(): number {
    const version = this.owner.native().weightVersion();
    if (version !== this.cacheWeightVersion) {
      this.prefixCache.clear();
      this.seenPrefixes.clear();
      this.cacheWeightVersion = version;
    }
    return version;
  }

  /**
   * Gives `sequence` its state: a copy of the longest cached prefix of its prompt (leaving at least
   * one token to prefill, whose logits start sampling) or a fresh one, and picks the prefix length
   * whose state its prefill should cache.
   */
  private startFromPrefixCache(sequence: Sequence): void {
    sequence.weightVersion = this.refreshPrefixCache();
    const prompt = sequence.prompt;
    const explicit = sequence.options.cachePrefixTokens;
    const cacheOn = this.prefixCache.maxEntries > 0;
    const autoLengths: number[] = [];
    if (cacheOn && this.autoPrefixTokens > 0) {
      for (let length = this.autoPrefixTokens; length <= prompt.length; length += this.autoPrefixTokens) autoLengths.push(length);
    }
    const lengths = explicit !== undefined && cacheOn ? [...new Set([...autoLengths, explicit])].sort((a, b) => a - b) : autoLengths;
    const keys = prefixKeys(prompt, lengths);

    let state: NativeState | undefined;
    for (let i = lengths.length - 1; i >= 0 && state === undefined; i--) {
      if (lengths[i] >= prompt.length || !this.prefixCache.has(keys[i])) continue;
      state = this.prefixCache.fork(keys[i]);
      sequence.prefilled = sequence.position = lengths[i];
      this.prefixHits++;
      this.prefixTokensReused += lengths[i];
    }
    state ??= this.owner.native().createState(1);
    sequence.state = state;
    sequence.session = new Session(this.owner, state, 1);

    for (let i = lengths.length - 1; i >= 0; i--) {
      const length = lengths[i];
      if (length <= sequence.prefilled) break;
      const wanted = length === explicit || this.seenPrefixes.has(keys[i]);
      if (wanted && !this.prefixCache.has(keys[i])) {
        sequence.snapshotAt = length;
        sequence.snapshotKey = keys[i];
        break;
      }
    }
    for (let i = 0; i < lengths.length; i++) {
      if (lengths[i] === explicit && lengths[i] % this.autoPrefixTokens !== 0) continue;
      this.seenPrefixes.delete(keys[i]);
      this.seenPrefixes.add(keys[i]);
    }
    for (const key of this.seenPrefixes) {
      if (this.seenPrefixes.size <= SEEN_PREFIX_LIMIT) break;
      this.seenPrefixes.delete(key);
    }
  }
}
