// A decode session: owns one recurrent state (fixed size, whatever the context length)
// and serialises the calls made on it.
import type { DecodeSession } from './generate';
import type { NativeModel, NativeState } from './native';
import { TokenInput, toTokenBatch } from './tokens';
import { optionsObject } from './typed';

export type PrefillMode = 'parallel' | 'chunkwise' | 'recurrent';

export interface StepOptions {
  /** A Float32Array of batch * V floats to receive the logits (absent: a new array per step). */
  logits?: Float32Array;
}

export interface PrefillOptions {
  /**
   * How the prompt is chunked (default 'chunkwise': linear time and memory in its length;
   * 'parallel': one chunk; 'recurrent': token by token). Every mode computes the recurrent
   * form, so the state and logits it leaves are those of token-by-token decoding.
   */
  mode?: PrefillMode;
  /** Chunk size for 'chunkwise' (default: the config's recurrent_chunk_size). */
  chunkSize?: number;
}

/** What a session needs from its model; kept narrow so Session does not import RetNet. */
export interface SessionOwner {
  readonly vocabSize: number;
  readonly defaultChunkSize: number;
  native(): NativeModel;
  stateLayout(): { layers: number; heads: number; keyDim: number; valueDim: number };
}

const STATE_MAGIC = 'RNSTATE1';

/** `modeOption` names the mode in its error (generate() calls it prefillMode). */
export function checkPrefillOptions(options: PrefillOptions, defaultChunk: number, modeOption = 'mode'): { mode: PrefillMode; chunkSize: number } {
  const mode = options.mode ?? 'chunkwise';
  if (mode !== 'parallel' && mode !== 'chunkwise' && mode !== 'recurrent') {
    throw new Error(`${modeOption} must be 'parallel', 'chunkwise' or 'recurrent', got ${JSON.stringify(mode)}`);
  }
  const chunkSize = options.chunkSize ?? defaultChunk;
  if (!Number.isInteger(chunkSize) || chunkSize < 1) {
    throw new Error(`chunkSize must be an integer >= 1, got ${JSON.stringify(options.chunkSize)}`);
  }
  // A chunk longer than any sequence is one chunk: the native side takes a 32-bit size.
  return { mode, chunkSize: Math.min(chunkSize, 2 ** 31 - 1) };
}

export class Session implements DecodeSession {
  readonly batch: number;
  private state: NativeState | undefined;
  private queue: Promise<unknown> = Promise.resolve();
  /** Why the state could not be loaded (restoreSession): every call fails with it. */
  private loadError: Error | undefined;

  /**
   * @internal use model.createSession() or model.restoreSession(). `loading`, when given, fills
   * the state; calls wait for it.
   */
  constructor(
    private readonly owner: SessionOwner,
    state: NativeState,
    batch: number,
    loading?: Promise<void>,
  ) {
    this.state = state;
    this.batch = batch;
    if (loading) {
      this.queue = loading.catch((e: Error) => {
        this.loadError = e;
      });
    }
  }

  /** Tokens consumed so far (the same for every row). */
  get position(): number {
    return this.live().positions()[0];
  }

  get disposed(): boolean {
    return this.state === undefined;
  }

  /** Runs the prompt [batch, T] through the model; resolves the next-token logits [batch, V]. */
  prefill(tokens: TokenInput, options: PrefillOptions = {}): Promise<{ logits: Float32Array }> {
    options = optionsObject(options, 'prefill');
    const batch = toTokenBatch(tokens, this.owner.vocabSize);
    if (batch.shape[0] !== this.batch) {
      throw new Error(`prefill: tokens have batch ${batch.shape[0]} but the session has batch ${this.batch}`);
    }
    const { mode, chunkSize } = checkPrefillOptions(options, this.owner.defaultChunkSize);
    return this.enqueue(async (state) => ({
      logits: await this.owner.native().prefill(state, batch.data, batch.shape[1], mode, chunkSize),
    }));
  }

  /**
   * Consumes one token per row; resolves the next-token logits [batch, V]: a new array, or
   * `options.logits` filled in place. Reusing one buffer across a token stream spares a
   * fresh allocation per step (page faults: 2-8 % of a base-preset step on the 2-core VM).
   */
  step(tokenIds: ArrayLike<number>, options: StepOptions = {}): Promise<{ logits: Float32Array }> {
    options = optionsObject(options, 'step');
    if (!Array.isArray(tokenIds) && !ArrayBuffer.isView(tokenIds)) {
      throw new Error(`step: token ids must be an array (one id per batch row), got ${tokenIds === null ? 'null' : typeof tokenIds}`);
    }
    if (tokenIds.length !== this.batch) {
      throw new Error(`step: expected ${this.batch} token id(s), one per batch row, got ${tokenIds.length}`);
    }
    const into = options.logits;
    // By tag, not instanceof: arrays the addon makes belong to the main realm, not a vm context's.
    const isFloat32 = ArrayBuffer.isView(into) && (into as Float32Array)[Symbol.toStringTag] === 'Float32Array';
    if (into !== undefined && (!isFloat32 || into.length !== this.batch * this.owner.vocabSize)) {
      throw new Error(`step: options.logits must be a Float32Array of batch * vocab = ${this.batch * this.owner.vocabSize} floats`);
    }
    // A typed array becomes a plain row; an array is taken as it is (toTokenBatch copies either).
    const batch = toTokenBatch([Array.isArray(tokenIds) ? tokenIds : Array.from(tokenIds)], this.owner.vocabSize);
    return this.enqueue(async (state) => ({ logits: await this.owner.native().step(state, batch.data, into) }));
  }

  /** An independent copy of this session at the same position (waits for pending calls). */
  async clone(): Promise<Session> {
    return this.enqueue(async (state) => new Session(this.owner, state.clone(), this.batch));
  }

  /**
   * Serialises the state (layout, positions, every layer's S and scale) into a Buffer that
   * model.restoreSession() accepts, in this process or another. Waits for pending calls.
   */
  async save(): Promise<Buffer> {
    return this.enqueue(async (state) => {
      const json = JSON.stringify({ ...this.owner.stateLayout(), batch: this.batch, positions: state.positions() });
      // Padded with spaces (still JSON) so that the floats start 4-byte aligned.
      const header = Buffer.from(json.padEnd(json.length + ((4 - (Buffer.byteLength(json) % 4)) % 4)), 'utf8');
      const prefix = Buffer.alloc(8 + 4 + header.length + 4);
      let off = prefix.write(STATE_MAGIC, 0, 'latin1');
      off = prefix.writeUInt32LE(header.length, off);
      off += header.copy(prefix, off);
      prefix.writeUInt32LE(0, off); // reserved
      // The state's floats follow, copied in on a worker (a medium state is 28 MB).
      return state.saveState(prefix);
    });
  }

  /** Frees the native state once pending calls finish. Further calls throw. */
  dispose(): void {
    const state = this.state;
    if (!state) return;
    this.state = undefined;
    void this.queue.finally(() => state.dispose());
  }

  private live(): NativeState {
    if (!this.state) throw new Error('session was disposed');
    return this.state;
  }

  private enqueue<T>(work: (state: NativeState) => Promise<T>): Promise<T> {
    const state = this.live();
    const run = this.queue.then(() => {
      if (this.loadError) throw this.loadError;
      return work(state);
    });
    this.queue = run.catch(() => undefined);
    return run;
  }
}

/**
 * Parses a Buffer from session.save() and loads it into a fresh native state. The header, sizes,
 * scales and positions are checked now; the state's floats are checked and copied off the JS
 * thread, before the session's first call runs (which rejects if they are not finite).
 */
export function restoreSessionState(owner: SessionOwner, buffer: Uint8Array): Session {
  let buf: Buffer;
  try {
    buf = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  } catch {
    throw new Error('restoreSession: the buffer was detached (transferred)');
  }
  if (buf.length < 16 || buf.toString('latin1', 0, 8) !== STATE_MAGIC) {
    throw new Error('restoreSession: not a saved retnet session (bad magic)');
  }
  const headerLength = buf.readUInt32LE(8);
  if (headerLength > buf.length - 16) throw new Error('restoreSession: truncated header');
  let header: { layers: number; heads: number; keyDim: number; valueDim: number; batch: number; positions: number[] };
  try {
    header = JSON.parse(buf.toString('utf8', 12, 12 + headerLength));
  } catch {
    throw new Error('restoreSession: header is not valid JSON');
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) throw new Error('restoreSession: header is not a JSON object');
  const layout = owner.stateLayout();
  for (const key of ['layers', 'heads', 'keyDim', 'valueDim'] as const) {
    if (header[key] !== layout[key]) {
      throw new Error(`restoreSession: saved state has ${key}=${JSON.stringify(header[key])} but this model has ${layout[key]}`);
    }
  }
  const batch = header.batch;
  if (!Number.isInteger(batch) || batch < 1 || !Array.isArray(header.positions) || header.positions.length !== batch) {
    throw new Error('restoreSession: bad batch or positions in header');
  }
  // A session's rows advance together (save() writes one position per row, all equal).
  if (header.positions.some((p) => p !== header.positions[0])) {
    const shown = header.positions.slice(0, 8).join(', ') + (batch > 8 ? ', ...' : '');
    throw new Error(`restoreSession: the rows are at different positions (${shown}); a session's rows share one`);
  }
  const kvCount = layout.layers * batch * layout.heads * layout.valueDim * layout.keyDim;
  const scaleCount = layout.layers * batch * layout.heads;
  const dataStart = 16 + headerLength;
  if (buf.length !== dataStart + 4 * (kvCount + scaleCount)) {
    throw new Error(`restoreSession: expected ${dataStart + 4 * (kvCount + scaleCount)} bytes, got ${buf.length}`);
  }
  // A view where the floats are aligned (as save() writes them), else a copy; a copy too of a
  // resizable buffer, which could shrink under the load (the addon refuses one).
  const offset = buf.byteOffset + dataStart;
  let floats: Float32Array;
  if (offset % 4 === 0 && !(buf.buffer as { resizable?: boolean }).resizable) {
    floats = new Float32Array(buf.buffer, offset, kvCount + scaleCount);
  } else {
    floats = new Float32Array(kvCount + scaleCount);
    Buffer.from(floats.buffer).set(buf.subarray(dataStart));
  }
  const state = owner.native().createState(batch);
  let loading: Promise<void>;
  try {
    loading = state.importState(floats.subarray(0, kvCount), floats.subarray(kvCount), header.positions);
  } catch (e) {
    state.dispose();
    throw new Error(`restoreSession: ${(e as Error).message}`);
  }
  return new Session(
    owner,
    state,
    batch,
    loading.catch((e: Error) => {
      throw new Error(`restoreSession: ${e.message}`);
    }),
  );
}
