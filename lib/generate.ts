// The text generation loop over a decode session: prefill, then sample -> yield -> step.

import { Sampler, SamplingOptions, validateSamplingOptions } from './sampling';
import { formatValue } from './typed';
import type { PrefillOptions, StepOptions } from './session';
import { Tokenizer, checkTokenId } from './tokenizer';

/** A draw a decode step may make itself, off the JS thread, with the generator's sampler. */
export interface StepSampling {
  sampler: Sampler;
  /** The ids so far, the step's input token included. */
  history: number[];
  /** Draw among the ids below this (the tokenizer's vocabulary). */
  vocabSize: number;
  /** Ids after whose draw the caller steps no further (its stopTokens). */
  stopTokens: Int32Array;
}

export interface DecodeStepOptions extends StepOptions {
  /**
   * Where the session supports it (the scheduler's batched steps), the step draws the next token
   * with this and resolves it as `token`, as sampler.sample on the logits would, and may leave
   * `logits` unwritten.
   */
  sample?: StepSampling;
  /**
   * With `sample`: the caller feeds each drawn token back as the next step's token, for at most
   * this many steps in all (this one included) and none after a draw in `sample.stopTokens`.
   * A session may take those steps before it is asked for them (the scheduler's decode runs),
   * and answers the calls that ask with the tokens they drew. Default 1.
   */
  feedSteps?: number;
}

/** A stateful decoder over a model (the native-backed session implements this). */
export interface DecodeSession {
  readonly batch: number;
  /** Number of tokens the session has consumed so far. */
  readonly position: number;
  /**
   * Consumes `tokens` (one row per batch entry); logits [batch, V] are for the next token. With
   * `options.sample`, a session may draw that token itself, as step's does.
   */
  prefill(tokens: number[][], options?: PrefillOptions & Pick<DecodeStepOptions, 'sample'>): Promise<{ logits: Float32Array; token?: number }>;
  /**
   * Consumes one token per batch entry; logits [batch, V] are for the next token, written into
   * `options.logits` where the session supports it and it is given.
   */
  step(tokenIds: number[], options?: DecodeStepOptions): Promise<{ logits: Float32Array; token?: number }>;
  dispose(): void;
}

export interface GenerateOptions extends SamplingOptions {
  /** Most tokens to sample, an integer >= 0 (0 samples nothing and makes no session call). Default 128. */
  maxTokens?: number;
  /** Stop sequences (non-empty text). Generation ends where one first appears; it is not emitted. */
  stop?: string | string[];
  /**
   * Aborting makes the iterator throw an Error named 'AbortError' (its `cause` is the signal's
   * reason). The signal is checked before every session call and between tokens; a session call
   * already in flight is not interrupted, so the abort takes effect when it returns.
   */
  signal?: AbortSignal;
  /** Ids that end generation when sampled (e.g. an end-of-sequence id); their text is not emitted. */
  stopTokens?: number[];
}

export interface GenerateChunk {
  /** The sampled id. */
  token: number;
  /** Text released by this token (may be ''): completed characters no longer held back by a stop sequence. */
  text: string;
}

const DEFAULT_MAX_TOKENS = 128;

function optionError(field: string, requirement: string, value: unknown): Error {
  return new Error(`invalid generate option: ${field} must be ${requirement}, got ${formatValue(value)}`);
}

/** Throws an Error naming the first invalid field (sampling fields included). */
export function validateGenerateOptions(o: GenerateOptions): void {
  validateSamplingOptions(o);
  const { maxTokens, stop, signal, stopTokens } = o;
  if (maxTokens !== undefined && !(Number.isSafeInteger(maxTokens) && maxTokens >= 0)) {
    throw optionError('maxTokens', 'an integer >= 0', maxTokens);
  }
  if (stop !== undefined) {
    const stops: unknown[] = Array.isArray(stop) ? stop : [stop];
    const bad = stops.find((s) => typeof s !== 'string' || s.length === 0);
    if (bad !== undefined) throw optionError('stop', 'a non-empty string or an array of them', bad);
  }
  const signalLike = signal as { aborted?: unknown; addEventListener?: unknown; removeEventListener?: unknown } | null | undefined;
  if (
    signal !== undefined &&
    (typeof signalLike?.aborted !== 'boolean' || typeof signalLike.addEventListener !== 'function' || typeof signalLike.removeEventListener !== 'function')
  ) {
    throw optionError('signal', 'an AbortSignal', signal);
  }
  if (stopTokens !== undefined) {
    if (!Array.isArray(stopTokens)) throw optionError('stopTokens', 'an array of token ids', stopTokens);
    const bad = stopTokens.find((t) => !(Number.isSafeInteger(t) && t >= 0));
    if (bad !== undefined) throw optionError('stopTokens', 'an array of integers >= 0', bad);
  }
}

function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) {
    const error = new Error('generation aborted', { cause: signal.reason });
    error.name = 'AbortError';
    throw error;
  }
}

/**
 * Holds back text that could be the start of a stop sequence until the next text decides it,
 * and cuts the stream where the earliest stop sequence begins.
 */
class StopSequenceFilter {
  stopped = false;
  private held = '';
  private readonly longestStop: number;

  constructor(private readonly stops: readonly string[]) {
    this.longestStop = Math.max(0, ...stops.map((s) => s.length));
  }

  /** Returns the text that is now safe to emit. */
  push(text: string): string {
    if (this.stopped) return '';
    const buffered = this.held + text;
    let stopAt = -1;
    for (const stop of this.stops) {
      const at = buffered.indexOf(stop);
      if (at !== -1 && (stopAt === -1 || at < stopAt)) stopAt = at;
    }
    if (stopAt !== -1) {
      this.stopped = true;
      this.held = '';
      return buffered.slice(0, stopAt);
    }
    const heldLength = this.partialStopLength(buffered);
    this.held = buffered.slice(buffered.length - heldLength);
    return buffered.slice(0, buffered.length - heldLength);
  }

  /** At the end of the stream a partial stop sequence is just text. */
  finish(): string {
    const rest = this.held;
    this.held = '';
    return rest;
  }

  /** Length of the longest suffix of `text` that is a proper prefix of some stop sequence. */
  private partialStopLength(text: string): number {
    for (let length = Math.min(text.length, this.longestStop - 1); length > 0; length--) {
      const suffix = text.slice(text.length - length);
      if (this.stops.some((stop) => stop.startsWith(suffix))) return length;
    }
    return 0;
  }
}

/**
 * Generates tokens after `promptTokens` (non-empty: there is no implicit BOS) on a batch-1 session,
 * yielding one chunk per sampled token, including the token that ends generation.
 *
 * The joined chunk texts equal tokenizer.decode() of the sampled tokens (minus a final stop token),
 * cut where the first stop sequence begins. Only ids below tokenizer.vocabSize are sampled, so
 * padded logits beyond the tokenizer's vocabulary are ignored. The last sampled token is not fed
 * back to the session. The caller owns the session and disposes it.
 */
export async function* generateFromSession(
  session: DecodeSession,
  promptTokens: number[],
  tokenizer: Tokenizer,
  options: GenerateOptions = {},
): AsyncGenerator<GenerateChunk> {
  validateGenerateOptions(options);
  const { signal } = options;
  throwIfAborted(signal);
  if (session.batch !== 1) throw new Error(`generateFromSession: the session must have batch 1, got ${session.batch}`);
  if (promptTokens.length === 0) throw new Error('generateFromSession: promptTokens must be non-empty (there is no implicit BOS)');
  promptTokens.forEach((token, i) => checkTokenId(token, i, tokenizer.vocabSize));
  const stopTokens = new Set(options.stopTokens ?? []);
  for (const token of stopTokens) {
    if (token >= tokenizer.vocabSize) {
      throw optionError('stopTokens', `ids below the tokenizer's vocabSize ${tokenizer.vocabSize}`, token);
    }
  }
  const stops = options.stop === undefined ? [] : Array.isArray(options.stop) ? options.stop : [options.stop];
  const maxTokens = options.maxTokens ?? DEFAULT_MAX_TOKENS;
  if (maxTokens === 0) return;

  const sampler = new Sampler(options);
  const streamDecoder = tokenizer.createStreamDecoder();
  // A custom tokenizer's text is checked: anything but a string would turn into garbage text.
  const decoded = (text: unknown, call: string): string => {
    if (typeof text !== 'string') throw new Error(`the tokenizer's stream decoder ${call} returned ${formatValue(text)}, not a string`);
    return text;
  };
  const decoder = { push: (token: number) => decoded(streamDecoder.push(token), 'push()'), flush: () => decoded(streamDecoder.flush(), 'flush()') };
  const stopFilter = new StopSequenceFilter(stops);
  const endOfText = (): string => stopFilter.push(decoder.flush()) + stopFilter.finish();
  const history = promptTokens.slice();
  const draw: StepSampling = { sampler, history, vocabSize: tokenizer.vocabSize, stopTokens: Int32Array.from(stopTokens) };
  // drawn: the token the last session call drew itself, where it could.
  let { logits, token: drawn } = await session.prefill([promptTokens], { sample: draw });
  // A session that does not draw gets one buffer for every step's logits: the sampler reads
  // each before the next step. One that draws (the scheduler's) needs none.
  const stepLogits = drawn === undefined ? new Float32Array(logits.length) : undefined;
  for (let produced = 1; ; produced++) {
    throwIfAborted(signal);
    const vocabLogits = logits.length > tokenizer.vocabSize ? logits.subarray(0, tokenizer.vocabSize) : logits;
    const token = drawn ?? sampler.sample(vocabLogits, history);
    history.push(token);
    if (stopTokens.has(token)) {
      yield { token, text: endOfText() };
      return;
    }
    const text = stopFilter.push(decoder.push(token));
    if (stopFilter.stopped) {
      yield { token, text };
      return;
    }
    if (produced === maxTokens) {
      yield { token, text: text + endOfText() };
      return;
    }
    yield { token, text };
    throwIfAborted(signal);
    ({ logits, token: drawn } = await session.step([token], { logits: stepLogits, sample: draw, feedSteps: maxTokens - produced }));
  }
}

/** Joins the text of every chunk. */
export async function collectText(chunks: AsyncIterable<GenerateChunk>): Promise<string> {
  let text = '';
  for await (const chunk of chunks) text += chunk.text;
  return text;
}
