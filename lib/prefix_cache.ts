// An LRU cache of recurrent states after prompt prefixes. A RetNet state has a fixed size
// whatever the prefix length, so each entry costs the same memory however long its prefix was;
// a new sequence forks (clones) an entry instead of recomputing the prefix.
import { createHash } from 'node:crypto';

/** A state that can be copied and freed: a Session (clone() resolves a Session) or a native decode state. */
export interface ForkableState {
  clone(): unknown;
  dispose(): void;
}

export interface PrefixCacheOptions {
  /** Most entries kept; the least recently used is disposed beyond it. Default 32. */
  maxEntries?: number;
}

export interface PrefixCacheStats {
  entries: number;
  hits: number;
  misses: number;
  evictions: number;
}

const DEFAULT_MAX_ENTRIES = 32;

export class PrefixCache<T extends ForkableState> {
  private limit: number;
  // A Map iterates in insertion order: re-inserting on use keeps the least recently used first.
  private readonly entries = new Map<string, T>();
  private hits = 0;
  private misses = 0;
  private evictions = 0;

  constructor(options: PrefixCacheOptions = {}) {
    this.limit = checkMaxEntries(options.maxEntries ?? DEFAULT_MAX_ENTRIES);
  }

  get maxEntries(): number {
    return this.limit;
  }

  /** Changes the capacity, evicting least recently used entries as needed. */
  set maxEntries(value: number) {
    this.limit = checkMaxEntries(value);
    this.evictBeyond(this.limit);
  }

  get size(): number {
    return this.entries.size;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /**
   * Stores `state` under `key` and takes ownership of it (pass a copy, e.g. `await session.clone()`,
   * to keep using yours); replaces and disposes an existing entry. With maxEntries 0 it is disposed.
   */
  put(key: string, state: T): void {
    for (const [other, entry] of this.entries) {
      if (entry === state && other !== key) throw new Error('PrefixCache.put: this state is already cached under another key; put a clone');
    }
    const previous = this.entries.get(key);
    // Putting the entry already held keeps it (disposing it would leave a dead state cached).
    if (previous !== state) previous?.dispose();
    this.entries.delete(key);
    this.entries.set(key, state);
    this.evictBeyond(this.limit);
  }

  /** A new copy of the state under `key` (what its clone() returns), or undefined when there is none. */
  fork(key: string): ReturnType<T['clone']> | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    this.entries.delete(key);
    this.entries.set(key, entry);
    return entry.clone() as ReturnType<T['clone']>;
  }

  delete(key: string): boolean {
    const entry = this.entries.get(key);
    if (entry === undefined) return false;
    entry.dispose();
    return this.entries.delete(key);
  }

  /** Disposes every entry. */
  clear(): void {
    for (const entry of this.entries.values()) entry.dispose();
    this.entries.clear();
  }

  stats(): PrefixCacheStats {
    return { entries: this.entries.size, hits: this.hits, misses: this.misses, evictions: this.evictions };
  }

  private evictBeyond(limit: number): void {
    for (const [key, entry] of this.entries) {
      if (this.entries.size <= limit) return;
      entry.dispose();
      this.entries.delete(key);
      this.evictions++;
    }
  }
}

function checkMaxEntries(value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) throw new Error(`maxEntries must be an integer >= 0, got ${String(value)}`);
  return value;
}

/**
 * Content keys for the prefixes tokens[0, length) at each of `lengths` (ascending, each in
 * [1, tokens.length]): a running SHA-256 over the ids, so all keys cost one pass over the prompt.
 */
export function prefixKeys(tokens: Int32Array, lengths: readonly number[]): string[] {
  const hash = createHash('sha256');
  const bytes = new Uint8Array(tokens.buffer, tokens.byteOffset, tokens.byteLength);
  const keys: string[] = [];
  let hashed = 0;
  for (const length of lengths) {
    hash.update(bytes.subarray(hashed * 4, length * 4));
    hashed = length;
    keys.push(`${length}:${hash.copy().digest('base64')}`);
  }
  return keys;
}
