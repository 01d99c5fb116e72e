// Safetensors reading and writing (spec §13): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON header, then the raw tensor data. Every tensor is decoded into a
// fresh Float32Array; every malformed input becomes an Error naming the file and the problem.

import { promises as fsp } from 'fs';
import * as path from 'path';
import { randomBytes } from 'crypto';

export interface TensorEntry {
  dtype: string;
  shape: number[];
  data: Float32Array;
}

export interface ParsedSafetensors {
  tensors: Map<string, TensorEntry>;
  metadata: Record<string, string>;
}

/** A header larger than this is treated as corrupt rather than allocated and parsed. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const METADATA_KEY = '__metadata__';
const PREFIX_BYTES = 8;

const ITEM_BYTES = new Map<string, number>([
  ['F32', 4],
  ['F16', 2],
  ['BF16', 2],
  ['F64', 8],
]);

const HOST_IS_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function fail(source: string, problem: string): never {
  throw new Error(`${source}: invalid safetensors file: ${problem}`);
}

/** JSON for an error message, cut short so a hostile header cannot produce a huge message. */
function brief(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

/** IEEE half → float, exact (every half value is representable in float32). */
function halfToFloat(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const mantissa = bits & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 0x1f) return mantissa === 0 ? sign * Infinity : NaN;
  return sign * (1024 + mantissa) * 2 ** (exponent - 25);
}

/** Decodes `count` little-endian elements of `dtype` starting at `bytes[0]` into `out` (a new Float32Array by default). */
function decodeToFloat32(bytes: Uint8Array, dtype: string, count: number, out: Float32Array = new Float32Array(count)): Float32Array {
  if (dtype === 'F32' && HOST_IS_LITTLE_ENDIAN) {
    // Copying makes unaligned offsets harmless and never aliases the input.
    new Uint8Array(out.buffer, out.byteOffset, 4 * count).set(bytes);
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case 'F32':
      for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
      return out;
    case 'F64':
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(8 * i, true);
      return out;
    case 'F16':
      for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
      return out;
    case 'BF16': {
      // bfloat16 is the top half of a float32 bit pattern.
      const outBits = new Uint32Array(out.buffer, out.byteOffset, count);
      for (let i = 0; i < count; i++) outBits[i] = view.getUint16(2 * i, true) << 16;
      return out;
    }
    default:
      throw new Error(`unreachable dtype ${dtype}`);
  }
}

interface HeaderEntry {
  name: string;
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}

function validateEntry(name: string, raw: unknown, dataBytes: number, source: string): HeaderEntry {
  const where = `tensor ${brief(name)}`;
  if (!isPlainObject(raw)) fail(source, `${where}: header entry must be an object`);
  const { dtype, shape, data_offsets: offsets } = raw;
  if (dtype === undefined) fail(source, `${where}: missing "dtype"`);
  if (shape === undefined) fail(source, `${where}: missing "shape"`);
  if (offsets === undefined) fail(source, `${where}: missing "data_offsets"`);
  if (typeof dtype !== 'string') fail(source, `${where}: "dtype" must be a string, got ${brief(dtype)}`);
  const itemBytes = ITEM_BYTES.get(dtype);
  if (itemBytes === undefined) {
    fail(source, `${where}: unsupported dtype ${brief(dtype)} (supported: ${[...ITEM_BYTES.keys()].join(', ')})`);
  }
  if (!Array.isArray(shape)) fail(source, `${where}: "shape" must be an array, got ${brief(shape)}`);
  let count = 1;
  for (const dim of shape) {
    if (typeof dim !== 'number' || !Number.isSafeInteger(dim) || dim < 0) {
      fail(source, `${where}: shape ${brief(shape)} has a dimension that is not a non-negative integer`);
    }
    count *= dim;
    // Bounding the running product by the data size keeps it exact and rejects absurd shapes early.
    if (count * itemBytes > dataBytes) {
      fail(source, `${where}: shape ${brief(shape)} needs more bytes than the file's ${dataBytes}-byte data section`);
    }
  }
  if (!Array.isArray(offsets) || offsets.length !== 2) {
    fail(source, `${where}: "data_offsets" must be an array [begin, end], got ${brief(offsets)}`);
  }
  const [begin, end] = offsets as unknown[];
  for (const offset of [begin, end]) {
    if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
      fail(source, `${where}: data_offsets ${brief(offsets)} must be non-negative integers`);
    }
  }
  const b = begin as number;
  const e = end as number;
  if (e < b) fail(source, `${where}: data_offsets [${b}, ${e}] are reversed`);
  if (e > dataBytes) fail(source, `${where}: data_offsets [${b}, ${e}] run past the ${dataBytes}-byte data section`);
  if (e - b !== count * itemBytes) {
    fail(
      source,
      `${where}: data_offsets [${b}, ${e}] span ${e - b} bytes but ${dtype} shape ${brief(shape)} needs ${count * itemBytes}`,
    );
  }
  return { name, dtype, shape: shape as number[], begin: b, end: e };
}

function validateMetadata(raw: unknown, source: string): Record<string, string> {
  if (!isPlainObject(raw)) fail(source, `"${METADATA_KEY}" must be an object of strings`);
  for (const [key, value] of Object.entries(raw)) {
    if (typeof value !== 'string') {
      fail(source, `"${METADATA_KEY}" value for ${brief(key)} must be a string, got ${typeof value}`);
    }
  }
  // Object.fromEntries defines properties, so a key such as "__proto__" stays an ordinary key.
  return Object.fromEntries(Object.entries(raw as Record<string, string>));
}

interface ParsedHeader {
  entries: HeaderEntry[];
  metadata: Record<string, string>;
  /** Byte offset of the data section in the file. */
  dataStart: number;
}

/** Reads the 8-byte header length from the first bytes of a file of `fileBytes` bytes and checks it. */
function headerLength(prefix: Uint8Array, fileBytes: number, source: string): number {
  if (fileBytes < PREFIX_BYTES) {
    fail(source, `file is ${fileBytes} bytes, shorter than the 8-byte header length prefix`);
  }
  const headerBytes = new DataView(prefix.buffer, prefix.byteOffset, PREFIX_BYTES).getBigUint64(0, true);
  const available = fileBytes - PREFIX_BYTES;
  if (headerBytes > BigInt(available)) {
    fail(source, `header length ${headerBytes} exceeds the ${available} bytes after the prefix`);
  }
  if (headerBytes > BigInt(MAX_HEADER_BYTES)) {
    fail(source, `header length ${headerBytes} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  }
  return Number(headerBytes);
}

/** Validates the JSON header (`headerBytes`, found after the prefix) of a file of `fileBytes` bytes. */
function parseHeader(headerBytes: Uint8Array, fileBytes: number, source: string): ParsedHeader {
  let headerText: string;
  try {
    headerText = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    fail(source, 'header is not valid UTF-8');
  }
  let header: unknown;
  try {
    header = JSON.parse(headerText);
  } catch (err) {
    fail(source, `header is not valid JSON (${(err as Error).message})`);
  }
  if (!isPlainObject(header)) fail(source, 'header must be a JSON object');

  const dataStart = PREFIX_BYTES + headerBytes.byteLength;
  const dataBytes = fileBytes - dataStart;
  let metadata: Record<string, string> = {};
  const entries: HeaderEntry[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === METADATA_KEY) metadata = validateMetadata(raw, source);
    else entries.push(validateEntry(name, raw, dataBytes, source));
  }

  // Like the reference implementation, the tensors must tile the data section exactly:
  // no overlaps, no holes, no trailing bytes. This also catches a shifted header length.
  const nonEmpty = entries.filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin);
  let covered = 0;
  for (let i = 0; i < nonEmpty.length; i++) {
    const current = nonEmpty[i];
    if (current.begin < covered) {
      const previous = nonEmpty[i - 1];
      fail(
        source,
        `tensors ${brief(previous.name)} [${previous.begin}, ${previous.end}] and ` +
          `${brief(current.name)} [${current.begin}, ${current.end}] overlap`,
      );
    }
    if (current.begin > covered) {
      fail(source, `data bytes [${covered}, ${current.begin}) belong to no tensor (before ${brief(current.name)})`);
    }
    covered = current.end;
  }
  if (covered !== dataBytes) {
    fail(source, `data section is ${dataBytes} bytes but the tensors cover only the first ${covered}`);
  }
  return { entries, metadata, dataStart };
}

function elementCount(entry: HeaderEntry): number {
  return (entry.end - entry.begin) / (ITEM_BYTES.get(entry.dtype) as number);
}

/** Parses a safetensors image. Throws an Error naming `source` and the problem on any malformed input. */
export function parseSafetensors(buf: Uint8Array, source = '<buffer>'): ParsedSafetensors {
  const headerBytes = headerLength(buf, buf.byteLength, source);
  const { entries, metadata, dataStart } = parseHeader(buf.subarray(PREFIX_BYTES, PREFIX_BYTES + headerBytes), buf.byteLength, source);
  const tensors = new Map<string, TensorEntry>();
  for (const entry of entries) {
    const bytes = buf.subarray(dataStart + entry.begin, dataStart + entry.end);
    tensors.set(entry.name, {
      dtype: entry.dtype,
      shape: entry.shape.slice(),
      data: decodeToFloat32(bytes, entry.dtype, elementCount(entry)),
    });
  }
  return { tensors, metadata };
}

/**
 * A safetensors file opened for reading one tensor at a time, so loading a model never holds
 * the whole file in memory. The header is validated on open; `read` checks the file still
 * holds the bytes it promised.
 */
export interface SafetensorsReader {
  metadata: Record<string, string>;
  /** Tensor shapes by name, in header order. */
  shapes: Map<string, number[]>;
  /** A tensor's values, in `into` (its first elements) when given: a loader reuses one buffer. */
  read(name: string, into?: Float32Array): Promise<Float32Array>;
  close(): Promise<void>;
}

export async function openSafetensors(filePath: string): Promise<SafetensorsReader> {
  const handle = await fsp.open(filePath, 'r');
  try {
    const fileBytes = (await handle.stat()).size;
    const prefix = new Uint8Array(PREFIX_BYTES);
    await handle.read(prefix, 0, Math.min(PREFIX_BYTES, fileBytes), 0);
    const headerBytes = headerLength(prefix, fileBytes, filePath);
    const headerBuf = new Uint8Array(headerBytes);
    await readExactly(handle, headerBuf, PREFIX_BYTES, filePath);
    const { entries, metadata, dataStart } = parseHeader(headerBuf, fileBytes, filePath);
    const byName = new Map(entries.map((e) => [e.name, e]));
    return {
      metadata,
      shapes: new Map(entries.map((e) => [e.name, e.shape.slice()])),
      async read(name: string, into?: Float32Array): Promise<Float32Array> {
        const entry = byName.get(name);
        if (entry === undefined) throw new Error(`${filePath}: no tensor ${brief(name)}`);
        const count = elementCount(entry);
        if (into !== undefined && into.length < count) throw new Error(`read: ${brief(name)} needs ${count} values, the buffer holds ${into.length}`);
        const out = into === undefined ? new Float32Array(count) : into.subarray(0, count);
        if (entry.dtype === 'F32' && HOST_IS_LITTLE_ENDIAN) {
          await readExactly(handle, new Uint8Array(out.buffer, out.byteOffset, 4 * count), dataStart + entry.begin, filePath);
          return out;
        }
        const bytes = new Uint8Array(entry.end - entry.begin);
        await readExactly(handle, bytes, dataStart + entry.begin, filePath);
        return decodeToFloat32(bytes, entry.dtype, count, out);
      },
      close: () => handle.close(),
    };
  } catch (err) {
    await handle.close();
    throw err;
  }
}

/** Fills `out` from `position`; a file that shrank since it was opened is an error, not zeros. */
async function readExactly(handle: fsp.FileHandle, out: Uint8Array, position: number, source: string): Promise<void> {
  let done = 0;
  while (done < out.byteLength) {
    const { bytesRead } = await handle.read(out, done, out.byteLength - done, position + done);
    if (bytesRead === 0) fail(source, `file ended at byte ${position + done} while reading ${out.byteLength} bytes at ${position}`);
    done += bytesRead;
  }
}

/** The prefix and space-padded JSON header for F32 tensors stored contiguously in the given order. */
function safetensorsHeader(tensors: ReadonlyArray<{ name: string; shape: number[] }>, metadata?: Record<string, string>): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== 'string') throw new Error(`safetensors metadata value for ${JSON.stringify(key)} must be a string`);
    }
    header[METADATA_KEY] = metadata;
  }
  let offset = 0;
  const seen = new Set<string>();
  for (const { name, shape } of tensors) {
    if (name === METADATA_KEY) throw new Error(`safetensors tensor name ${METADATA_KEY} is reserved`);
    if (seen.has(name)) throw new Error(`safetensors tensor ${JSON.stringify(name)} appears twice`);
    seen.add(name);
    if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new Error(`safetensors tensor ${JSON.stringify(name)}: bad shape ${JSON.stringify(shape)}`);
    }
    const count = shape.reduce((a, b) => a * b, 1);
    // Define the property explicitly so a name like "__proto__" is stored as a key.
    Object.defineProperty(header, name, {
      value: { dtype: 'F32', shape, data_offsets: [offset, offset + 4 * count] },
      enumerable: true,
      writable: true,
      configurable: true,
    });
    offset += 4 * count;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const headerBytes = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(PREFIX_BYTES + headerBytes, 0x20);
  out.writeBigUInt64LE(BigInt(headerBytes), 0);
  json.copy(out, PREFIX_BYTES);
  return out;
}

/** A tensor's little-endian bytes, checked against its shape (a view on little-endian hosts). */
function tensorBytes(name: string, shape: number[], data: Float32Array): Uint8Array {
  if (shape.reduce((a, b) => a * b, 1) !== data.length) {
    throw new Error(`safetensors tensor ${JSON.stringify(name)}: shape ${JSON.stringify(shape)} does not match ${data.length} values`);
  }
  if (HOST_IS_LITTLE_ENDIAN) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const out = new Uint8Array(data.byteLength);
  const view = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) view.setFloat32(4 * i, data[i], true);
  return out;
}

/** Serialises F32 tensors in the given order, contiguously, with the header space-padded to a multiple of 8. */
export function serializeSafetensors(
  tensors: Array<{ name: string; shape: number[]; data: Float32Array }>,
  metadata?: Record<string, string>,
): Buffer {
  const header = safetensorsHeader(tensors, metadata);
  return Buffer.concat([header, ...tensors.map(({ name, shape, data }) => tensorBytes(name, shape, data))]);
}

/** What writes F32 tensors as a safetensors file, asking `values` for one tensor at a time. */
export function safetensorsWriter(
  tensors: Array<{ name: string; shape: number[] }>,
  values: (name: string) => Float32Array | Promise<Float32Array>,
  metadata?: Record<string, string>,
): (handle: fsp.FileHandle) => Promise<void> {
  const header = safetensorsHeader(tensors, metadata);
  return async (handle) => {
    await handle.writeFile(header);
    for (const { name, shape } of tensors) await handle.writeFile(tensorBytes(name, shape, await values(name)));
  };
}

/**
 * Writes F32 tensors as a safetensors file, atomically (writeFileAtomic), one tensor at a time
 * so the whole file is never held in memory.
 */
export async function writeSafetensorsFile(
  filePath: string,
  tensors: Array<{ name: string; shape: number[] }>,
  values: (name: string) => Float32Array | Promise<Float32Array>,
  metadata?: Record<string, string>,
): Promise<void> {
  await writeFileAtomic(filePath, safetensorsWriter(tensors, values, metadata));
}

type FileData = Buffer | Uint8Array | ((handle: fsp.FileHandle) => Promise<void>);

/** Writes `data` to a new temp file beside `filePath` and fsyncs it; removes it on failure. */
async function writeTemp(filePath: string, data: FileData): Promise<string> {
  const tempPath = path.join(path.dirname(filePath), `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    const handle = await fsp.open(tempPath, 'wx');
    try {
      if (typeof data === 'function') await data(handle);
      else await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    return tempPath;
  } catch (err) {
    await fsp.rm(tempPath, { force: true }).catch(() => undefined);
    throw err;
  }
}

/** The journal of a replacement of several files in one directory (writeFilesAtomic). */
export const REPLACE_JOURNAL = '.retnet-replace.json';

/**
 * Writes files that belong together (a model's config.json and weights, in one directory):
 * every one is written in full to a temp file first, so a failure while writing (a full disk,
 * an exception from `data`) leaves every previous file as it was. Then a journal listing the
 * renames is written, the renames run, and the journal goes: a crash among the renames (one
 * file new, the other old) is finished by finishInterruptedReplace, which every load and save
 * of the directory runs first.
 */
export async function writeFilesAtomic(files: Array<{ path: string; data: FileData }>): Promise<void> {
  const dir = path.dirname(path.resolve(files[0].path));
  if (files.some((f) => path.dirname(path.resolve(f.path)) !== dir)) throw new Error('writeFilesAtomic: the files must share one directory');
  await finishInterruptedReplace(dir);
  const temps: string[] = [];
  try {
    for (const file of files) temps.push(await writeTemp(file.path, file.data));
  } catch (err) {
    await Promise.all(temps.map((temp) => fsp.rm(temp, { force: true }).catch(() => undefined)));
    throw err;
  }
  const journal = path.join(dir, REPLACE_JOURNAL);
  let renamed = 0;
  try {
    if (files.length > 1) {
      const renames = files.map((f, i) => ({ from: path.basename(temps[i]), to: path.basename(f.path) }));
      await fsp.rename(await writeTemp(journal, Buffer.from(JSON.stringify(renames))), journal);
    }
    for (; renamed < files.length; renamed++) await fsp.rename(temps[renamed], files[renamed].path);
  } catch (err) {
    // A rename that fails (not a crash) ends the replacement where it is.
    await Promise.all(temps.slice(renamed).map((temp) => fsp.rm(temp, { force: true }).catch(() => undefined)));
    if (files.length > 1) await fsp.rm(journal, { force: true }).catch(() => undefined);
    throw err;
  }
  if (files.length > 1) await fsp.rm(journal, { force: true });
}

/**
 * Completes a replacement of several files in `dir` that a crash cut short among its renames
 * (see writeFilesAtomic): the temp files it names that are still there are renamed over their
 * targets. Without write access that is an Error saying so, rather than a load of one new
 * file beside an old one.
 */
export async function finishInterruptedReplace(dir: string): Promise<void> {
  const journal = path.join(dir, REPLACE_JOURNAL);
  let text: string;
  try {
    text = await fsp.readFile(journal, 'utf8');
  } catch {
    return;
  }
  let renames: Array<{ from: string; to: string }>;
  try {
    renames = JSON.parse(text);
    // Only a temp file of writeTemp's, onto the name it was written for, inside `dir`.
    const ours = (r: { from?: unknown; to?: unknown }) =>
      typeof r?.to === 'string' && typeof r.from === 'string' && !r.to.includes('/') && !r.to.includes('\\') &&
      r.to !== '.' && r.to !== '..' && r.from.startsWith(`.${r.to}.`) && /^\.\d+\.[0-9a-f]+\.tmp$/.test(r.from.slice(r.to.length + 1));
    if (!Array.isArray(renames) || !renames.every(ours)) throw new Error('not a list of renames of its temp files');
  } catch (e) {
    throw new Error(`${journal}: an interrupted save's journal is unreadable (${(e as Error).message}); check the directory's files by hand`);
  }
  try {
    for (const { from, to } of renames) {
      await fsp.rename(path.join(dir, from), path.join(dir, to)).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'ENOENT') throw e; // already renamed before the crash
      });
    }
    await fsp.rm(journal, { force: true });
  } catch (e) {
    throw new Error(`${dir}: a save was interrupted while replacing its files, and finishing it failed: ${(e as Error).message}`);
  }
}

/**
 * Writes `data` (or whatever `data(handle)` writes) to `filePath` so that readers see either
 * the old file or the complete new one: write a temp file in the same directory, fsync it,
 * then rename over the target. On any failure the temp file is removed and the previous file
 * is left untouched.
 */
export async function writeFileAtomic(filePath: string, data: FileData): Promise<void> {
  await writeFilesAtomic([{ path: filePath, data }]);
}
