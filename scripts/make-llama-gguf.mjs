#!/usr/bin/env node
// Writes a GGUF v3 file for a llama-architecture Transformer with random weights, the same size
// as a RetNet preset, so llama.cpp can be timed on it next to our decode (scripts/llamacpp-bench.mjs,
// scripts/decode-vs-llamacpp.sh). No dependencies; the tensor data is streamed to the file in
// chunks, so the medium twin (about 1 GB in f32) never sits in memory.
//
//   node scripts/make-llama-gguf.mjs --preset base|medium [--type f32|f16] [--seed 1]
//     [--context-length 32768] --out FILE.gguf
//
// Layout (GGUF v3, little-endian): magic "GGUF", version 3, tensor count (u64), metadata count
// (u64), the metadata key/value pairs, the tensor infos (name, dims with ne0 the fastest-varying,
// ggml type, offset from the start of the data section), zero padding to general.alignment, then
// each tensor's data at its offset, padded to the alignment.
//
// Weights are N(0, std) (default 0.02) from a seeded PRNG, so activations and logits stay finite;
// the RMSNorm weights are 1. With --type f16 the 2-D tensors are f16 and the norms stay f32, as
// llama.cpp's converters do. The tokenizer is a SentencePiece ("llama") vocabulary of synthetic
// pieces: <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then unique filler pieces.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const PRESETS = {
  // RetNet base: D 512, 6 layers; the twin has 8 heads of 64 and a SwiGLU FFN of 1396.
  base: { nEmbd: 512, nLayer: 6, nHead: 8, nHeadKv: 8, nFf: 1396, nVocab: 32000 },
  // RetNet medium: D 1024, 16 layers; the twin has 16 heads of 64 and a SwiGLU FFN of 2765.
  medium: { nEmbd: 1024, nLayer: 16, nHead: 16, nHeadKv: 16, nFf: 2765, nVocab: 32000 },
};

const ALIGNMENT = 32;

// gguf_metadata_value_type
const T = { U8: 0, I8: 1, U16: 2, I16: 3, U32: 4, I32: 5, F32: 6, BOOL: 7, STRING: 8, ARRAY: 9, U64: 10, I64: 11, F64: 12 };
// ggml_type
const GGML_F32 = 0;
const GGML_F16 = 1;

// ---------------------------------------------------------------------------------------------
// A growable little-endian byte buffer for the header (metadata and tensor infos).

class ByteWriter {
  constructor(initial = 1 << 16) {
    this.buf = Buffer.alloc(initial);
    this.len = 0;
  }
  reserve(n) {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = Buffer.alloc(size);
    this.buf.copy(next, 0, 0, this.len);
    this.buf = next;
  }
  u8(v) { this.reserve(1); this.buf.writeUInt8(v, this.len); this.len += 1; }
  u32(v) { this.reserve(4); this.buf.writeUInt32LE(v, this.len); this.len += 4; }
  i32(v) { this.reserve(4); this.buf.writeInt32LE(v, this.len); this.len += 4; }
  u64(v) { this.reserve(8); this.buf.writeBigUInt64LE(BigInt(v), this.len); this.len += 8; }
  f32(v) { this.reserve(4); this.buf.writeFloatLE(v, this.len); this.len += 4; }
  bytes(b) { this.reserve(b.length); b.copy(this.buf, this.len); this.len += b.length; }
  str(s) {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.bytes(b);
  }
  pad(alignment) {
    const n = (alignment - (this.len % alignment)) % alignment;
    this.reserve(n);
    this.buf.fill(0, this.len, this.len + n);
    this.len += n;
  }
  result() { return this.buf.subarray(0, this.len); }
}

function writeKv(w, key, type, value) {
  w.str(key);
  w.u32(type);
  writeValue(w, type, value);
}

function writeValue(w, type, value) {
  switch (type) {
    case T.U32: w.u32(value); break;
    case T.I32: w.i32(value); break;
    case T.F32: w.f32(value); break;
    case T.U64: w.u64(value); break;
    case T.BOOL: w.u8(value ? 1 : 0); break;
    case T.STRING: w.str(value); break;
    case T.ARRAY: {
      const { elementType, values } = value;
      w.u32(elementType);
      w.u64(values.length);
      for (const v of values) writeValue(w, elementType, v);
      break;
    }
    default: throw new Error(`unsupported metadata type ${type}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Seeded normal numbers: sfc32 for uniforms, Box-Muller for pairs of normals.

function sfc32(a, b, c, d) {
  return () => {
    a |= 0; b |= 0; c |= 0; d |= 0;
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
}

function normalSource(seed, stream) {
  const rand = sfc32(0x9e3779b9 ^ seed, 0x243f6a88 ^ stream, 0xb7e15162 ^ (seed * 31 + stream), 0x85a308d3);
  for (let i = 0; i < 16; i++) rand(); // mix the seed in
  let spare = null;
  return () => {
    if (spare !== null) {
      const s = spare;
      spare = null;
      return s;
    }
    let u = rand();
    while (u <= 0) u = rand();
    const v = rand();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
}

// float32 -> IEEE half, round to nearest even (no NaN inputs here).
const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);
export function toHalf(x) {
  f32Scratch[0] = x;
  const bits = u32Scratch[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow -> inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow -> signed zero
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && (half & 1))) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (half & 1))) half++; // may carry into the exponent: still correct
  return sign | half;
}

// ---------------------------------------------------------------------------------------------
// The model description.

function tensorList(p, type) {
  const hd = p.nEmbd / p.nHead;
  const qDim = hd * p.nHead;
  const kvDim = hd * p.nHeadKv;
  const mat = type === 'f16' ? GGML_F16 : GGML_F32;
  const list = [];
  // dims are ggml's ne: ne0 (the input / row length) first.
  list.push({ name: 'token_embd.weight', dims: [p.nEmbd, p.nVocab], type: mat, init: 'normal' });
  for (let i = 0; i < p.nLayer; i++) {
    const b = `blk.${i}.`;
    list.push({ name: b + 'attn_norm.weight', dims: [p.nEmbd], type: GGML_F32, init: 'ones' });
    list.push({ name: b + 'attn_q.weight', dims: [p.nEmbd, qDim], type: mat, init: 'normal' });
    list.push({ name: b + 'attn_k.weight', dims: [p.nEmbd, kvDim], type: mat, init: 'normal' });
    list.push({ name: b + 'attn_v.weight', dims: [p.nEmbd, kvDim], type: mat, init: 'normal' });
    list.push({ name: b + 'attn_output.weight', dims: [qDim, p.nEmbd], type: mat, init: 'normal' });
    list.push({ name: b + 'ffn_norm.weight', dims: [p.nEmbd], type: GGML_F32, init: 'ones' });
    list.push({ name: b + 'ffn_gate.weight', dims: [p.nEmbd, p.nFf], type: mat, init: 'normal' });
    list.push({ name: b + 'ffn_up.weight', dims: [p.nEmbd, p.nFf], type: mat, init: 'normal' });
    list.push({ name: b + 'ffn_down.weight', dims: [p.nFf, p.nEmbd], type: mat, init: 'normal' });
  }
  list.push({ name: 'output_norm.weight', dims: [p.nEmbd], type: GGML_F32, init: 'ones' });
  list.push({ name: 'output.weight', dims: [p.nEmbd, p.nVocab], type: mat, init: 'normal' });
  return list;
}

// Bijective base-26 word for n >= 0: a, b, ..., z, aa, ab, ...
function word(n) {
  let s = '';
  n += 1;
  while (n > 0) {
    n -= 1;
    s = String.fromCharCode(97 + (n % 26)) + s;
    n = Math.floor(n / 26);
  }
  return s;
}

function vocabulary(nVocab) {
  const tokens = ['<unk>', '<s>', '</s>'];
  const types = [2, 3, 3]; // UNKNOWN, CONTROL, CONTROL
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(6); // BYTE
  }
  let k = 0;
  while (tokens.length < nVocab) {
    // alternate word-initial ("▁" = U+2581, SentencePiece's space) and word-internal pieces
    const n = k++;
    tokens.push(n % 2 === 0 ? '\u2581' + word(n >> 1) : word(n >> 1));
    types.push(1); // NORMAL
  }
  const scores = tokens.map((_, i) => (i < 259 ? 0 : -(i - 259)));
  return { tokens, scores, types };
}

function parseArgs(argv) {
  const o = { preset: 'base', type: 'f32', seed: 1, std: 0.02, contextLength: 32768, out: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = argv[i + 1];
    const need = () => {
      if (v === undefined) throw new Error(`${a} needs a value`);
      i++;
      return v;
    };
    if (a === '--preset') o.preset = need();
    else if (a === '--type') o.type = need();
    else if (a === '--seed') o.seed = Number(need());
    else if (a === '--std') o.std = Number(need());
    else if (a === '--context-length') o.contextLength = Number(need());
    else if (a === '--out') o.out = need();
    else if (a === '-h' || a === '--help') {
      console.log('usage: node scripts/make-llama-gguf.mjs --preset base|medium [--type f32|f16] [--seed 1] [--std 0.02] [--context-length 32768] --out FILE.gguf');
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  if (!(o.preset in PRESETS)) throw new Error(`--preset must be one of ${Object.keys(PRESETS).join(', ')}`);
  if (o.type !== 'f32' && o.type !== 'f16') throw new Error('--type must be f32 or f16');
  if (!Number.isSafeInteger(o.seed)) throw new Error('--seed must be an integer');
  if (!(o.std > 0)) throw new Error('--std must be > 0');
  if (!Number.isSafeInteger(o.contextLength) || o.contextLength < 16384) throw new Error('--context-length must be an integer >= 16384');
  if (!o.out) throw new Error('--out FILE.gguf is required');
  return o;
}

export function writeGguf({ preset, type, seed, std, contextLength, out }) {
  const p = PRESETS[preset];
  const hd = p.nEmbd / p.nHead;
  const tensors = tensorList(p, type);
  const vocab = vocabulary(p.nVocab);

  const meta = [
    ['general.architecture', T.STRING, 'llama'],
    ['general.name', T.STRING, `retnet-twin-${preset}-${type}`],
    ['general.alignment', T.U32, ALIGNMENT],
    ['general.file_type', T.U32, type === 'f16' ? 1 : 0], // ALL_F32 / MOSTLY_F16
    ['llama.context_length', T.U32, contextLength],
    ['llama.embedding_length', T.U32, p.nEmbd],
    ['llama.block_count', T.U32, p.nLayer],
    ['llama.feed_forward_length', T.U32, p.nFf],
    ['llama.attention.head_count', T.U32, p.nHead],
    ['llama.attention.head_count_kv', T.U32, p.nHeadKv],
    ['llama.attention.layer_norm_rms_epsilon', T.F32, 1e-5],
    ['llama.rope.dimension_count', T.U32, hd],
    ['llama.rope.freq_base', T.F32, 10000],
    ['llama.vocab_size', T.U32, p.nVocab],
    ['tokenizer.ggml.model', T.STRING, 'llama'],
    ['tokenizer.ggml.tokens', T.ARRAY, { elementType: T.STRING, values: vocab.tokens }],
    ['tokenizer.ggml.scores', T.ARRAY, { elementType: T.F32, values: vocab.scores }],
    ['tokenizer.ggml.token_type', T.ARRAY, { elementType: T.I32, values: vocab.types }],
    ['tokenizer.ggml.unknown_token_id', T.U32, 0],
    ['tokenizer.ggml.bos_token_id', T.U32, 1],
    ['tokenizer.ggml.eos_token_id', T.U32, 2],
    ['tokenizer.ggml.add_bos_token', T.BOOL, true],
    ['tokenizer.ggml.add_eos_token', T.BOOL, false],
  ];

  // Offsets of each tensor's data, relative to the data section, each aligned.
  let dataBytes = 0;
  for (const t of tensors) {
    t.count = t.dims.reduce((a, b) => a * b, 1);
    t.bytes = t.count * (t.type === GGML_F16 ? 2 : 4);
    t.offset = dataBytes;
    dataBytes += t.bytes;
    dataBytes += (ALIGNMENT - (dataBytes % ALIGNMENT)) % ALIGNMENT;
  }

  const w = new ByteWriter();
  w.bytes(Buffer.from('GGUF', 'ascii'));
  w.u32(3);
  w.u64(tensors.length);
  w.u64(meta.length);
  for (const [k, ty, v] of meta) writeKv(w, k, ty, v);
  for (const t of tensors) {
    w.str(t.name);
    w.u32(t.dims.length);
    for (const d of t.dims) w.u64(d);
    w.u32(t.type);
    w.u64(t.offset);
  }
  w.pad(ALIGNMENT);
  const header = w.result();

  fs.mkdirSync(path.dirname(path.resolve(out)), { recursive: true });
  const tmp = `${out}.partial-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, header);
    const CHUNK = 1 << 20; // elements per write
    const f32 = new Float32Array(CHUNK);
    const u16 = new Uint16Array(CHUNK);
    let written = 0;
    let params = 0;
    tensors.forEach((t, index) => {
      if (written !== t.offset) {
        fs.writeSync(fd, Buffer.alloc(t.offset - written));
        written = t.offset;
      }
      const next = normalSource(seed, index + 1);
      for (let start = 0; start < t.count; start += CHUNK) {
        const n = Math.min(CHUNK, t.count - start);
        if (t.init === 'ones') f32.fill(1, 0, n);
        else for (let i = 0; i < n; i++) f32[i] = std * next();
        let bytes;
        if (t.type === GGML_F16) {
          for (let i = 0; i < n; i++) u16[i] = toHalf(f32[i]);
          bytes = new Uint8Array(u16.buffer, 0, n * 2);
        } else {
          bytes = new Uint8Array(f32.buffer, 0, n * 4);
        }
        fs.writeSync(fd, bytes);
        written += bytes.length;
      }
      params += t.count;
    });
    if (written !== dataBytes) {
      fs.writeSync(fd, Buffer.alloc(dataBytes - written));
      written = dataBytes;
    }
    fs.closeSync(fd);
    fs.renameSync(tmp, out);
    return { file: out, bytes: header.length + dataBytes, params, tensors: tensors.length, headerBytes: header.length };
  } catch (e) {
    try { fs.closeSync(fd); } catch {}
    try { fs.unlinkSync(tmp); } catch {}
    throw e;
  }
}

const isMain = process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  try {
    const o = parseArgs(process.argv.slice(2));
    const t0 = Date.now();
    const r = writeGguf(o);
    console.log(
      `wrote ${r.file}: ${o.preset} ${o.type}, ${r.tensors} tensors, ${(r.params / 1e6).toFixed(2)} M params, ` +
        `${(r.bytes / 2 ** 20).toFixed(1)} MiB (header ${r.headerBytes} B) in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
    );
  } catch (e) {
    console.error(`make-llama-gguf: ${e.message}`);
    process.exit(1);
  }
}
