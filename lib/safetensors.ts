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

/** Decodes `count` little-endian elements of `dtype` starting at `bytes[0]` into a new Float32Array. */
function decodeToFloat32(bytes: Uint8Array, dtype: string, count: number): Float32Array {
  if (dtype === 'F32' && HOST_IS_LITTLE_ENDIAN) {
    // Copying into a fresh buffer makes unaligned offsets harmless and never aliases the input.
    return new Float32Array(new Uint8Array(bytes).buffer, 0, count);
  }
  const out = new Float32Array(count);
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
      const outBits = new Uint32Array(out.buffer);
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

/** Parses a safetensors image. Throws an Error naming `source` and the problem on any malformed input. */
export function parseSafetensors(buf: Uint8Array, source = '<buffer>'): ParsedSafetensors {
  if (buf.byteLength < PREFIX_BYTES) {
    fail(source, `file is ${buf.byteLength} bytes, shorter than the 8-byte header length prefix`);
  }
  const headerBytesBig = new DataView(buf.buffer, buf.byteOffset, PREFIX_BYTES).getBigUint64(0, true);
  const available = buf.byteLength - PREFIX_BYTES;
  if (headerBytesBig > BigInt(available)) {
    fail(source, `header length ${headerBytesBig} exceeds the ${available} bytes after the prefix`);
  }
  if (headerBytesBig > BigInt(MAX_HEADER_BYTES)) {
    fail(source, `header length ${headerBytesBig} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  }
  const headerBytes = Number(headerBytesBig);
  let headerText: string;
  try {
    headerText = new TextDecoder('utf-8', { fatal: true }).decode(
      buf.subarray(PREFIX_BYTES, PREFIX_BYTES + headerBytes),
    );
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

  const dataStart = PREFIX_BYTES + headerBytes;
  const dataBytes = buf.byteLength - dataStart;
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

  const tensors = new Map<string, TensorEntry>();
  for (const entry of entries) {
    const count = (entry.end - entry.begin) / (ITEM_BYTES.get(entry.dtype) as number);
    const bytes = buf.subarray(dataStart + entry.begin, dataStart + entry.end);
    tensors.set(entry.name, {
      dtype: entry.dtype,
      shape: entry.shape.slice(),
      data: decodeToFloat32(bytes, entry.dtype, count),
    });
  }
  return { tensors, metadata };
}

/** Serialises F32 tensors in the given order, contiguously, with the header space-padded to a multiple of 8. */
export function serializeSafetensors(
  tensors: Array<{ name: string; shape: number[]; data: Float32Array }>,
  metadata?: Record<string, string>,
): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== 'string') throw new Error(`safetensors metadata value for ${JSON.stringify(key)} must be a string`);
    }
    header[METADATA_KEY] = metadata;
  }
  let offset = 0;
  const seen = new Set<string>();
  for (const { name, shape, data } of tensors) {
    if (name === METADATA_KEY) throw new Error(`safetensors tensor name ${METADATA_KEY} is reserved`);
    if (seen.has(name)) throw new Error(`safetensors tensor ${JSON.stringify(name)} appears twice`);
    seen.add(name);
    const count = shape.reduce((a, b) => a * b, 1);
    if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0) || count !== data.length) {
      throw new Error(`safetensors tensor ${JSON.stringify(name)}: shape ${JSON.stringify(shape)} does not match ${data.length} values`);
    }
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
  const out = Buffer.alloc(PREFIX_BYTES + headerBytes + offset, 0x20);
  out.writeBigUInt64LE(BigInt(headerBytes), 0);
  json.copy(out, PREFIX_BYTES);
  let position = PREFIX_BYTES + headerBytes;
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (const { data } of tensors) {
    if (HOST_IS_LITTLE_ENDIAN) {
      out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), position);
    } else {
      for (let i = 0; i < data.length; i++) view.setFloat32(position + 4 * i, data[i], true);
    }
    position += data.byteLength;
  }
  return out;
}

/**
 * Writes `data` to `filePath` so that readers see either the old file or the complete new one:
 * write a temp file in the same directory, fsync it, then rename over the target.
 * On any failure the temp file is removed and the previous file is left untouched.
 */
export async function writeFileAtomic(filePath: string, data: Buffer | Uint8Array): Promise<void> {
  const directory = path.dirname(filePath);
  const tempPath = path.join(directory, `.${path.basename(filePath)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    const handle = await fsp.open(tempPath, 'wx');
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsp.rename(tempPath, filePath);
  } catch (err) {
    await fsp.rm(tempPath, { force: true }).catch(() => undefined);
    throw err;
  }
}

export async function readSafetensorsFile(filePath: string): Promise<ParsedSafetensors> {
  return parseSafetensors(await fsp.readFile(filePath), filePath);
}
