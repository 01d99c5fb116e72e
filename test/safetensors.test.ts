import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { angleBuffer, decayBuffer, dims, parameterShapes, resolveConfig, RetNetConfig } from '../lib/config';
import {
  MAX_HEADER_BYTES,
  openSafetensors,
  parseSafetensors,
  serializeSafetensors,
  TensorEntry,
  writeFileAtomic,
} from '../lib/safetensors';
import { checkWeights } from '../lib/weights';
import { RetNet } from '../lib/model';

const FIXTURES = path.join(__dirname, 'data', 'fixtures');
const FIXTURE_NAMES = fs
  .readdirSync(FIXTURES)
  .filter((name) => fs.existsSync(path.join(FIXTURES, name, 'model.safetensors')));

/** A safetensors image from an arbitrary header (object or raw text) and data bytes. */
function buildFile(header: unknown, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header), 'utf8');
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

function f32Bytes(values: number[]): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}

function u16Bytes(values: number[]): Uint8Array {
  const out = new Uint8Array(2 * values.length);
  const view = new DataView(out.buffer);
  values.forEach((v, i) => view.setUint16(2 * i, v, true));
  return out;
}

function expectParseError(buf: Uint8Array, ...fragments: RegExp[]): void {
  let thrown: unknown;
  try {
    parseSafetensors(buf, 'bad.safetensors');
  } catch (err) {
    thrown = err;
  }
  expect(thrown).toBeInstanceOf(Error);
  const message = (thrown as Error).message;
  expect(message).toMatch(/^bad\.safetensors: /);
  for (const fragment of fragments) expect(message).toMatch(fragment);
}

describe('serializeSafetensors / parseSafetensors round trip', () => {
  const tensors = [
    { name: 'a.weight', shape: [2, 3], data: new Float32Array([1, -2, 3.5, 1e-30, -0, 65504]) },
    { name: 'scalar', shape: [], data: new Float32Array([Math.PI]) },
    { name: 'empty', shape: [0, 4], data: new Float32Array(0) },
    { name: '__proto__', shape: [1], data: new Float32Array([7]) },
  ];

  it('returns the same names, shapes, values and metadata', () => {
    // JSON.parse makes "__proto__" an own key, as a hostile or unusual file would.
    const metadata = JSON.parse('{"format": "pt", "config": "{\\"x\\": 1}", "__proto__": "kept as a key"}');
    const buf = serializeSafetensors(tensors, metadata);
    const parsed = parseSafetensors(buf);
    expect([...parsed.tensors.keys()]).toEqual(tensors.map((t) => t.name));
    for (const t of tensors) {
      const entry = parsed.tensors.get(t.name) as TensorEntry;
      expect(entry.dtype).toBe('F32');
      expect(entry.shape).toEqual(t.shape);
      expect(Array.from(entry.data)).toEqual(Array.from(t.data));
    }
    expect(Object.keys(parsed.metadata).sort()).toEqual(['__proto__', 'config', 'format']);
    expect(parsed.metadata.config).toBe('{"x": 1}');
    expect(Object.getPrototypeOf(parsed.metadata)).toBe(Object.prototype);
  });

  it('pads the header with spaces to a multiple of 8', () => {
    const buf = serializeSafetensors(tensors, { k: 'v' });
    const headerLength = Number(buf.readBigUInt64LE(0));
    expect(headerLength % 8).toBe(0);
    const text = buf.subarray(8, 8 + headerLength).toString('utf8');
    expect(text).toMatch(/^\{.*\} *$/);
    expect(buf.length).toBe(8 + headerLength + 4 * 8);
  });

  it('rejects inconsistent input', () => {
    expect(() => serializeSafetensors([{ name: 'x', shape: [3], data: new Float32Array(2) }])).toThrow(/"x".*shape/);
    const one = { name: 'x', shape: [1], data: new Float32Array(1) };
    expect(() => serializeSafetensors([one, one])).toThrow(/twice/);
    expect(() => serializeSafetensors([{ ...one, name: '__metadata__' }])).toThrow(/reserved/);
  });

  it('copies the data instead of aliasing the input buffer', () => {
    const buf = serializeSafetensors([{ name: 'x', shape: [2], data: new Float32Array([1, 2]) }]);
    const entry = parseSafetensors(buf).tensors.get('x') as TensorEntry;
    expect(entry.data.buffer).not.toBe(buf.buffer);
    buf.fill(0, buf.length - 8);
    expect(Array.from(entry.data)).toEqual([1, 2]);
  });
});

describe('dtype decoding', () => {
  it('decodes F16 exactly, including subnormals, infinities and NaN', () => {
    const cases: Array<[number, number]> = [
      [0x3c00, 1],
      [0xc000, -2],
      [0x3555, 0.333251953125],
      [0x7bff, 65504],
      [0x0400, 2 ** -14],
      [0x0001, 2 ** -24],
      [0x03ff, 1023 * 2 ** -24],
      [0x7c00, Infinity],
      [0xfc00, -Infinity],
      [0x8000, -0],
    ];
    const bits = [...cases.map(([b]) => b), 0x7e00];
    const buf = buildFile({ h: { dtype: 'F16', shape: [bits.length], data_offsets: [0, 2 * bits.length] } }, u16Bytes(bits));
    const data = (parseSafetensors(buf).tensors.get('h') as TensorEntry).data;
    cases.forEach(([, value], i) => expect(Object.is(data[i], value)).toBe(true));
    expect(Number.isNaN(data[cases.length])).toBe(true);
  });

  it('decodes BF16 as the top half of a float32', () => {
    const cases: Array<[number, number]> = [
      [0x3f80, 1],
      [0xc040, -3],
      [0x4049, 3.140625],
      [0x0001, 2 ** -133],
      [0x7f80, Infinity],
      [0x8000, -0],
    ];
    const buf = buildFile(
      { b: { dtype: 'BF16', shape: [cases.length], data_offsets: [0, 2 * cases.length] } },
      u16Bytes(cases.map(([b]) => b)),
    );
    const data = (parseSafetensors(buf).tensors.get('b') as TensorEntry).data;
    cases.forEach(([, value], i) => expect(Object.is(data[i], value)).toBe(true));
  });

  it('decodes F64 with float32 rounding', () => {
    const bytes = new Uint8Array(new Float64Array([0.1, -1e-50, 1e300]).buffer);
    const data = (parseSafetensors(buildFile({ d: { dtype: 'F64', shape: [3], data_offsets: [0, 24] } }, bytes)).tensors.get('d') as TensorEntry).data;
    expect(Array.from(data)).toEqual([Math.fround(0.1), -0, Infinity]);
  });

  it('handles tensors at unaligned offsets and inputs that are unaligned views', () => {
    // One F16 value first puts the F32 tensor at data offset 2.
    const data = new Uint8Array([...u16Bytes([0x3c00]), ...f32Bytes([1.5, -2.25])]);
    const header = {
      h: { dtype: 'F16', shape: [1], data_offsets: [0, 2] },
      f: { dtype: 'F32', shape: [2], data_offsets: [2, 10] },
    };
    const file = buildFile(header, data);
    const backing = new Uint8Array(file.length + 3);
    backing.set(file, 3);
    const parsed = parseSafetensors(backing.subarray(3));
    expect(Array.from((parsed.tensors.get('f') as TensorEntry).data)).toEqual([1.5, -2.25]);
    expect(Array.from((parsed.tensors.get('h') as TensorEntry).data)).toEqual([1]);
  });
});

describe('parseSafetensors rejects malformed files with a message naming the file and the problem', () => {
  const okEntry = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };
  const twoFloats = f32Bytes([1, 2]);

  it('file shorter than the 8-byte prefix', () => {
    expectParseError(new Uint8Array(5), /shorter than the 8-byte/);
    expectParseError(new Uint8Array(0), /0 bytes/);
  });

  it('absurd header lengths', () => {
    expectParseError(buildFile({}, new Uint8Array(0), 1000n), /header length 1000 exceeds/);
    expectParseError(buildFile({}, new Uint8Array(0), 2n ** 64n - 1n), /header length 18446744073709551615/);
    const big = new Uint8Array(MAX_HEADER_BYTES + 64);
    new DataView(big.buffer).setBigUint64(0, BigInt(MAX_HEADER_BYTES + 1), true);
    expectParseError(big, /104857601 exceeds the 104857600-byte limit/);
  });

  it('header not UTF-8, not JSON, or not an object', () => {
    const invalidUtf8 = buildFile('{}');
    invalidUtf8[8] = 0xff;
    expectParseError(invalidUtf8, /not valid UTF-8/);
    expectParseError(buildFile('{"a": '), /not valid JSON/);
    expectParseError(buildFile(''), /not valid JSON/);
    for (const notObject of ['[]', '3', 'null', '"text"', 'true']) expectParseError(buildFile(notObject), /must be a JSON object/);
  });

  it('entries with missing or mistyped fields', () => {
    expectParseError(buildFile({ t: 5 }, twoFloats), /"t".*must be an object/);
    expectParseError(buildFile({ t: [1] }, twoFloats), /"t".*must be an object/);
    expectParseError(buildFile({ t: { shape: [2], data_offsets: [0, 8] } }, twoFloats), /"t".*missing "dtype"/);
    expectParseError(buildFile({ t: { dtype: 'F32', data_offsets: [0, 8] } }, twoFloats), /"t".*missing "shape"/);
    expectParseError(buildFile({ t: { dtype: 'F32', shape: [2] } }, twoFloats), /"t".*missing "data_offsets"/);
    expectParseError(buildFile({ t: { ...okEntry, dtype: 4 } }, twoFloats), /"dtype" must be a string/);
    expectParseError(buildFile({ t: { ...okEntry, shape: '2' } }, twoFloats), /"shape" must be an array/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [0] } }, twoFloats), /"data_offsets" must be an array \[begin, end\]/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: { 0: 0, 1: 8 } } }, twoFloats), /"data_offsets" must be/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: ['0', 8] } }, twoFloats), /non-negative integers/);
  });

  it('unsupported dtypes are named', () => {
    expectParseError(buildFile({ t: { ...okEntry, dtype: 'I64' } }, twoFloats), /"t".*unsupported dtype "I64"/);
    expectParseError(buildFile({ t: { ...okEntry, dtype: 'f32' } }, twoFloats), /unsupported dtype "f32"/);
    expectParseError(buildFile({ t: { ...okEntry, dtype: 'constructor' } }, twoFloats), /unsupported dtype "constructor"/);
  });

  it('shape dimensions that are negative, fractional, non-numeric or absurd', () => {
    for (const shape of [[-2], [1.5], ['2'], [null], [2 ** 60], [1e300], [2, 2 ** 53 + 2]]) {
      expectParseError(buildFile({ t: { ...okEntry, shape } }, twoFloats), /"t": shape/);
    }
  });

  it('offsets out of range, reversed, negative or not matching the shape', () => {
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [0, 12] } }, twoFloats), /\[0, 12\] run past the 8-byte data section/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [8, 0] } }, twoFloats), /reversed/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [-4, 4] } }, twoFloats), /non-negative integers/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [0.5, 8] } }, twoFloats), /non-negative integers/);
    expectParseError(buildFile({ t: { ...okEntry, data_offsets: [0, 4] } }, twoFloats), /span 4 bytes but F32 shape \[2\] needs 8/);
  });

  it('overlapping tensors', () => {
    const header = {
      a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
      b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] },
    };
    expectParseError(buildFile(header, f32Bytes([1, 2, 3])), /"a" \[0, 8\] and "b" \[4, 12\] overlap/);
  });

  it('__metadata__ that is not a string-to-string map', () => {
    expectParseError(buildFile({ __metadata__: 'x' }), /"__metadata__" must be an object/);
    expectParseError(buildFile({ __metadata__: ['x'] }), /"__metadata__" must be an object/);
    expectParseError(buildFile({ __metadata__: { n: 1 } }), /"__metadata__" value for "n" must be a string/);
  });

  it('holes or trailing bytes in the data section', () => {
    const gap = { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } };
    expectParseError(buildFile(gap, f32Bytes([1, 2, 3])), /data bytes \[4, 8\) belong to no tensor \(before "b"\)/);
    expectParseError(buildFile({ t: okEntry }, f32Bytes([1, 2, 3])), /data section is 12 bytes but the tensors cover only the first 8/);
    expectParseError(buildFile({}, new Uint8Array(1)), /data section is 1 bytes/);
  });

  it('accepts duplicate JSON keys with last-wins, empty tensors, and empty files', () => {
    const dupes = buildFile('{"t": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', twoFloats);
    expect(Array.from((parseSafetensors(dupes).tensors.get('t') as TensorEntry).data)).toEqual([1, 2]);
    const withEmpty = buildFile({ t: okEntry, e: { dtype: 'BF16', shape: [3, 0], data_offsets: [8, 8] } }, twoFloats);
    expect((parseSafetensors(withEmpty).tensors.get('e') as TensorEntry).shape).toEqual([3, 0]);
    expect(parseSafetensors(buildFile({})).tensors.size).toBe(0);
  });
});

describe('openSafetensors', () => {
  it.each(FIXTURE_NAMES)('%s: reads every tensor one at a time, equal to parsing the whole file', async (name) => {
    const file = path.join(FIXTURES, name, 'model.safetensors');
    const whole = parseSafetensors(fs.readFileSync(file), file);
    const reader = await openSafetensors(file);
    try {
      expect(reader.metadata).toEqual(whole.metadata);
      expect([...reader.shapes.keys()]).toEqual([...whole.tensors.keys()]);
      for (const [tensorName, entry] of whole.tensors) {
        expect(reader.shapes.get(tensorName)).toEqual(entry.shape);
        expect(await reader.read(tensorName)).toEqual(entry.data);
      }
      await expect(reader.read('nope')).rejects.toThrow(`${file}: no tensor "nope"`);
    } finally {
      await reader.close();
    }
  });

  it('decodes F16/BF16 tensors and rejects a malformed header like parseSafetensors', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-st-'));
    const file = path.join(dir, 'h.safetensors');
    fs.writeFileSync(file, buildFile({ h: { dtype: 'BF16', shape: [2], data_offsets: [0, 4] } }, new Uint8Array([0x80, 0x3f, 0x00, 0xc0])));
    const reader = await openSafetensors(file);
    expect(Array.from(await reader.read('h'))).toEqual([1, -2]);
    // Into a view that starts inside its buffer: the values land in the view, nothing before it moves.
    const backing = new Float32Array([7, 7, 7, 7, 7]);
    expect(Array.from(await reader.read('h', backing.subarray(2)))).toEqual([1, -2]);
    expect(Array.from(backing)).toEqual([7, 7, 1, -2, 7]);
    await reader.close();
    fs.writeFileSync(file, buildFile({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, new Uint8Array(4)));
    await expect(openSafetensors(file)).rejects.toThrow(`${file}: invalid safetensors file: tensor "x": shape [2] needs more bytes`);
    fs.writeFileSync(file, Buffer.from([1, 2, 3]));
    await expect(openSafetensors(file)).rejects.toThrow(`${file}: invalid safetensors file: file is 3 bytes`);
    await expect(openSafetensors(path.join(dir, 'absent.safetensors'))).rejects.toThrow(/absent\.safetensors/);
    fs.rmSync(dir, { recursive: true });
  });

  it('a file cut short after opening is an error, not zeros', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-st-'));
    const file = path.join(dir, 'cut.safetensors');
    fs.writeFileSync(file, buildFile({ x: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, f32Bytes([1, 2, 3, 4])));
    const reader = await openSafetensors(file);
    fs.truncateSync(file, fs.statSync(file).size - 8);
    await expect(reader.read('x')).rejects.toThrow(/invalid safetensors file: file ended at byte/);
    await reader.close();
    fs.rmSync(dir, { recursive: true });
  });
});

function fixtureConfig(name: string): RetNetConfig {
  return resolveConfig(JSON.parse(fs.readFileSync(path.join(FIXTURES, name, 'config.json'), 'utf8')));
}

describe('fixtures', () => {
  it('finds the fixtures', () => expect(FIXTURE_NAMES.length).toBeGreaterThanOrEqual(4));

  it.each(FIXTURE_NAMES)('%s: loads, matches its config, and carries the torchscale buffers', async (name) => {
    const file = path.join(FIXTURES, name, 'model.safetensors');
    const { tensors, metadata } = parseSafetensors(fs.readFileSync(file), file);
    const config = fixtureConfig(name);
    expect(resolveConfig(JSON.parse(metadata.config))).toEqual(config);
    const weights = checkWeights(config, tensors, file);
    expect([...weights.keys()]).toEqual(parameterShapes(config).map(([n]) => n));
    for (const [tensorName, shape] of parameterShapes(config)) {
      expect((weights.get(tensorName) as Float32Array).length).toBe(shape.reduce((a, b) => a * b, 1));
    }
    const { H, dk } = dims(config);
    expect(Array.from(weights.get('retnet_rel_pos.decay') as Float32Array)).toEqual(Array.from(decayBuffer(H)));
    // The closed-form angles may sit a few ulp from torchscale's float32 linspace/pow (spec §3.2).
    const stored = weights.get('retnet_rel_pos.angle') as Float32Array;
    angleBuffer(dk).forEach((theta, i) => expect(Math.abs(stored[i] - theta)).toBeLessThanOrEqual(6 * 2 ** -23 * theta));
    if (config.share_decoder_input_output_embed) {
      expect(weights.get('output_projection.weight')).toBe(weights.get('embed_tokens.weight'));
    }
  });
});

describe('checkWeights', () => {
  const untiedName = 'base_gelu_s64_c16';
  const tiedName = 'swish_tied_embscale_s200_c23';
  const loaded = new Map<string, Map<string, TensorEntry>>();
  beforeAll(() => {
    for (const name of [untiedName, tiedName]) {
      loaded.set(name, parseSafetensors(fs.readFileSync(path.join(FIXTURES, name, 'model.safetensors'))).tensors);
    }
  });
  const copyOf = (name: string) => new Map(loaded.get(name) as Map<string, TensorEntry>);

  it('names a missing tensor and its expected shape', () => {
    const tensors = copyOf(untiedName);
    tensors.delete('layers.1.ffn.gate.weight');
    expect(() => checkWeights(fixtureConfig(untiedName), tensors, 'm.safetensors')).toThrow(
      'm.safetensors: missing tensor "layers.1.ffn.gate.weight" (expected shape [128,64])',
    );
  });

  it('requires the output projection when untied', () => {
    const tensors = copyOf(untiedName);
    tensors.delete('output_projection.weight');
    expect(() => checkWeights(fixtureConfig(untiedName), tensors, 'm')).toThrow(/missing tensor "output_projection.weight"/);
  });

  it('names a misshapen tensor with expected and actual shapes', () => {
    const tensors = copyOf(untiedName);
    const q = tensors.get('layers.0.retention.q_proj.weight') as TensorEntry;
    tensors.set('layers.0.retention.q_proj.weight', { ...q, shape: [32, 128] });
    expect(() => checkWeights(fixtureConfig(untiedName), tensors, 'm')).toThrow(
      'm: tensor "layers.0.retention.q_proj.weight" has shape [32,128], expected [64,64]',
    );
  });

  it('names unexpected tensors, including ones the config does not call for', () => {
    const tensors = copyOf(untiedName);
    tensors.set('layers.0.retention.q_proj.bias', { dtype: 'F32', shape: [64], data: new Float32Array(64) });
    expect(() => checkWeights(fixtureConfig(untiedName), tensors, 'm')).toThrow(/unexpected tensor\(s\) "layers.0.retention.q_proj.bias"/);
    const noEmbedNorm = { ...fixtureConfig(tiedName), layernorm_embedding: false };
    expect(() => checkWeights(noEmbedNorm, copyOf(tiedName), 'm')).toThrow(/unexpected tensor\(s\) "layernorm_embedding.weight"/);
    const threeLayers = { ...fixtureConfig(untiedName), decoder_layers: 1 };
    expect(() => checkWeights(threeLayers, copyOf(untiedName), 'm')).toThrow(/"layers.1.retention.q_proj.weight".* and 2 more/);
  });

  it('names a tensor with a non-finite value, its index and its source (found on the worker that copies it in)', async () => {
    const config = fixtureConfig(untiedName);
    const planted = (index: number, value: number): Map<string, Float32Array> => {
      const weights = new Map([...copyOf(untiedName)].map(([name, entry]) => [name, entry.data.slice()]));
      (weights.get('layers.1.ffn.fc2.weight') as Float32Array)[index] = value;
      return weights;
    };
    await expect(RetNet.fromStateDict(config, planted(17, NaN))).rejects.toThrow(
      'state dict: tensor "layers.1.ffn.fc2.weight" has a non-finite value (NaN) at flat index 17',
    );
    await expect(RetNet.fromStateDict(config, planted(0, -Infinity))).rejects.toThrow('has a non-finite value (-Infinity) at flat index 0');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-nonfinite-'));
    const file = path.join(dir, 'model.safetensors');
    const tensors = [...planted(5, Infinity)].map(([name, data]) => ({ name, shape: copyOf(untiedName).get(name)!.shape, data }));
    fs.writeFileSync(file, serializeSafetensors(tensors, { config: JSON.stringify(config) }));
    await expect(RetNet.load(file)).rejects.toThrow(`${file}: tensor "layers.1.ffn.fc2.weight" has a non-finite value (Infinity) at flat index 5`);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('computes absent buffers and ties an absent output projection', () => {
    const tensors = copyOf(tiedName);
    tensors.delete('retnet_rel_pos.angle');
    tensors.delete('retnet_rel_pos.decay');
    tensors.delete('output_projection.weight');
    const config = fixtureConfig(tiedName);
    const weights = checkWeights(config, tensors, 'm');
    expect(weights.get('output_projection.weight')).toBe(weights.get('embed_tokens.weight'));
    expect(weights.get('retnet_rel_pos.decay')).toEqual(decayBuffer(dims(config).H));
    expect(weights.get('retnet_rel_pos.angle')).toEqual(angleBuffer(dims(config).dk));
  });

  it('reads a tied embedding stored only as the output projection', () => {
    const tensors = copyOf(tiedName);
    const embed = (tensors.get('embed_tokens.weight') as TensorEntry).data;
    tensors.delete('embed_tokens.weight');
    const weights = checkWeights(fixtureConfig(tiedName), tensors, 'm');
    expect(weights.get('embed_tokens.weight')).toEqual(embed);
    expect(weights.get('output_projection.weight')).toBe(weights.get('embed_tokens.weight'));
    // Untied, the embedding is still required.
    const untied = copyOf(untiedName);
    untied.delete('embed_tokens.weight');
    expect(() => checkWeights(fixtureConfig(untiedName), untied, 'm')).toThrow(/missing tensor "embed_tokens.weight"/);
  });

  it('RetNet.load takes a tied file holding only the output projection', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-tied-'));
    const tensors = [...copyOf(tiedName)]
      .filter(([name]) => name !== 'embed_tokens.weight')
      .map(([name, entry]) => ({ name, shape: entry.shape, data: entry.data }));
    const file = path.join(dir, 'model.safetensors');
    fs.writeFileSync(file, serializeSafetensors(tensors, { config: JSON.stringify(fixtureConfig(tiedName)) }));
    const [full, outputOnly] = await Promise.all([RetNet.load(path.join(FIXTURES, tiedName)), RetNet.load(file)]);
    try {
      const tokens = [[1, 5, 9, 150, 3]];
      const a = await full.forward(tokens, { mode: 'parallel' });
      const b = await outputOnly.forward(tokens, { mode: 'parallel' });
      expect(b.logits).toEqual(a.logits);
    } finally {
      full.dispose();
      outputOnly.dispose();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('rejects stored buffers no torchscale config makes: a decay above 0, an angle pair that differs', () => {
    const withDecay = copyOf(untiedName);
    const decay = withDecay.get('retnet_rel_pos.decay') as TensorEntry;
    withDecay.set('retnet_rel_pos.decay', { ...decay, data: decay.data.map((d, i) => (i === 1 ? 3 : d)) });
    expect(() => checkWeights(fixtureConfig(untiedName), withDecay, 'm')).toThrow(
      'm: tensor "retnet_rel_pos.decay" holds 3 at index 1: each head\'s decay is log γ <= 0',
    );
    const withAngle = copyOf(untiedName);
    const angle = withAngle.get('retnet_rel_pos.angle') as TensorEntry;
    withAngle.set('retnet_rel_pos.angle', { ...angle, data: angle.data.map((a, i) => (i === 5 ? a * 2 : a)) });
    expect(() => checkWeights(fixtureConfig(untiedName), withAngle, 'm')).toThrow(/"retnet_rel_pos.angle" differs within the pair at indices 4, 5/);
  });

  it('rejects a tied model whose two copies differ', () => {
    const tensors = copyOf(tiedName);
    const out = tensors.get('output_projection.weight') as TensorEntry;
    const data = out.data.slice();
    data[5] += 1;
    tensors.set('output_projection.weight', { ...out, data });
    expect(() => checkWeights(fixtureConfig(tiedName), tensors, 'm')).toThrow(/tied model .* differs from "embed_tokens.weight" at flat index 5/);
  });
});

describe('writeFileAtomic', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-atomic-'));
  });
  afterEach(() => {
    jest.restoreAllMocks();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('creates and replaces files, leaving no temp files', async () => {
    const target = path.join(dir, 'model.safetensors');
    await writeFileAtomic(target, Buffer.from('first'));
    await writeFileAtomic(target, new Uint8Array([65, 66]));
    expect(fs.readFileSync(target, 'utf8')).toBe('AB');
    expect(fs.readdirSync(dir)).toEqual(['model.safetensors']);
  });

  it('keeps the old file and removes the temp file when the rename fails', async () => {
    const target = path.join(dir, 'model.safetensors');
    fs.writeFileSync(target, 'old contents');
    jest.spyOn(fs.promises, 'rename').mockRejectedValueOnce(new Error('EIO: simulated rename failure'));
    await expect(writeFileAtomic(target, Buffer.from('new contents'))).rejects.toThrow('simulated rename failure');
    expect(fs.readFileSync(target, 'utf8')).toBe('old contents');
    expect(fs.readdirSync(dir)).toEqual(['model.safetensors']);
  });

  it('keeps the old file and removes the temp file when the write fails midway', async () => {
    const target = path.join(dir, 'model.safetensors');
    fs.writeFileSync(target, 'old contents');
    const realOpen = fs.promises.open;
    jest.spyOn(fs.promises, 'open').mockImplementationOnce(async (...args: Parameters<typeof realOpen>) => {
      const handle = await realOpen(...args);
      const realWrite = handle.writeFile.bind(handle);
      handle.writeFile = async (data: Parameters<typeof realWrite>[0]) => {
        await realWrite((data as Buffer).subarray(0, 3));
        throw new Error('ENOSPC: simulated full disk');
      };
      return handle;
    });
    await expect(writeFileAtomic(target, Buffer.from('new contents'))).rejects.toThrow('simulated full disk');
    expect(fs.readFileSync(target, 'utf8')).toBe('old contents');
    expect(fs.readdirSync(dir)).toEqual(['model.safetensors']);
  });

  it('cleans up when the target cannot be replaced (it is a non-empty directory)', async () => {
    const target = path.join(dir, 'taken');
    fs.mkdirSync(target);
    fs.writeFileSync(path.join(target, 'inside'), 'x');
    await expect(writeFileAtomic(target, Buffer.from('data'))).rejects.toThrow();
    expect(fs.readdirSync(dir)).toEqual(['taken']);
    expect(fs.readFileSync(path.join(target, 'inside'), 'utf8')).toBe('x');
  });

  it('fails without leaving anything when the directory does not exist', async () => {
    await expect(writeFileAtomic(path.join(dir, 'missing', 'f'), Buffer.from('x'))).rejects.toThrow(/ENOENT/);
    expect(fs.readdirSync(dir)).toEqual([]);
  });
});
