// Bad input at every public entry point is a thrown Error naming the problem.
import { execFileSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { RetNet, Trainer, buildInfo } from '../lib';
import { parseSafetensors, serializeSafetensors } from '../lib/safetensors';
import { addon } from '../lib/native';
import { FIXTURES_DIR } from './helpers/fixtures';

const CONFIG = {
  vocab_size: 50,
  decoder_embed_dim: 16,
  decoder_value_embed_dim: 16,
  decoder_retention_heads: 2,
  decoder_ffn_embed_dim: 24,
  decoder_layers: 1,
};

let model: RetNet;
let dir: string;
beforeAll(async () => {
  model = await RetNet.create(CONFIG, { seed: 1 });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-bad-'));
});
afterAll(() => {
  model.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('tokens', () => {
  test.each([
    [[[1, 2, 50]], /token id 50 at \[0\]\[2\] is outside the vocabulary \[0, 50\)/],
    [[[1, -1]], /token id -1/],
    [[[1, 2.5]], /must be an integer/],
    [[[1, NaN]], /must be an integer/],
    [[['a' as unknown as number]], /must be an integer/],
    [[[1, 2], [3]], /ragged batch/],
    [[[]], /must not be empty/],
    [[], /batch is empty/],
    [{ data: new Int32Array(5), shape: [2, 3] }, /needs 6/],
    [{ data: new Int32Array([1, 99]), shape: [1, 2] }, /token id 99/],
    [{ data: [1, 2], shape: [1, 2] }, /Int32Array/],
  ])('forward(%j) throws', async (tokens, message) => {
    await expect(model.forward(tokens as number[][])).rejects.toThrow(message);
  });

  test('sessions validate too', async () => {
    const s = model.createSession({ batch: 2 });
    expect(() => s.step([1])).toThrow(/expected 2 token id/);
    expect(() => s.step([1, 77])).toThrow(/token id 77/);
    expect(() => s.prefill([[1, 2]])).toThrow(/batch 1 but the session has batch 2/);
    expect(() => s.prefill([[1], [2]], { mode: 'fast' as 'parallel' })).toThrow(/mode must be/);
    expect(() => s.prefill([[1], [2]], { chunkSize: 0 })).toThrow(/chunkSize must be/);
    s.dispose();
    expect(() => s.step([1, 2])).toThrow(/disposed/);
    expect(() => model.createSession({ batch: 0 })).toThrow(/batch must be/);
    // Past the limit: a clear Error, not a process that dies reading the positions.
    expect(() => model.createSession({ batch: 2e8 })).toThrow(/batch must be an integer from 1 to 1048576, got 200000000/);
    expect(() => model.native().createState(2 ** 20 + 1)).toThrow(/batch must be from 1 to 1048576, got 1048577/);
    const widest = model.createSession({ batch: 2 ** 20 });
    expect(widest.position).toBe(0);
    widest.dispose();
  });

  test('a call uses the ids it was given, even when the caller refills its array before the call runs', async () => {
    const data = new Int32Array([10, 20, 30]);
    const expected = await model.forward([[10, 20, 30]]);
    const pending = model.forward({ data, shape: [1, 3] });
    data.fill(49);
    expect((await pending).logits).toEqual(expected.logits);

    const session = model.createSession();
    const prefilled = session.prefill({ data, shape: [1, 3] });
    data.fill(7);
    const alone = model.createSession();
    try {
      expect((await prefilled).logits).toEqual((await alone.prefill([[49, 49, 49]])).logits);
    } finally {
      session.dispose();
      alone.dispose();
    }
  });

  test('a training step uses the ids it was given: a refill past the vocabulary does not reach the worker', async () => {
    const trainee = await RetNet.create(CONFIG, { seed: 2 });
    const same = await RetNet.create(CONFIG, { seed: 2 });
    try {
      const tokens = Int32Array.from({ length: 4 * 16 }, (_, i) => (i * 7) % 50);
      const expected = await new Trainer(same, { lr: 1e-3, totalSteps: 1 }).step({ data: tokens.slice(), shape: [4, 16] });
      const pending = new Trainer(trainee, { lr: 1e-3, totalSteps: 1 }).step({ data: tokens, shape: [4, 16] });
      tokens.fill(1 << 30); // a loader refilling its buffer, here with ids no embedding row has
      expect((await pending).loss).toBe(expected.loss);
    } finally {
      trainee.dispose();
      same.dispose();
    }
  });

  test('null options mean none; prompts and step ids may be typed arrays; BigInt ids and fake signals are named', async () => {
    const bytes = await RetNet.create({ ...CONFIG, vocab_size: 256 }, null as never);
    try {
      expect((await bytes.forward([[1, 2]], null as never)).shape).toEqual([1, 2, 256]);
      const session = bytes.createSession(null as never);
      await session.prefill([[1, 2]], null as never);
      await session.step(Int32Array.of(3), null as never);
      expect(() => session.step('3' as never)).toThrow('step: token ids must be an array (one id per batch row), got string');
      expect(() => session.step([1, 2])).toThrow('step: expected 1 token id(s), one per batch row, got 2');
      session.dispose();
      const greedy = { maxTokens: 3, temperature: 0 };
      expect(await bytes.generateText(Int32Array.of(72, 105), greedy)).toBe(await bytes.generateText([72, 105], greedy));
      expect(await bytes.generateText([72, 105], null as never)).toEqual(expect.any(String));
      await expect(bytes.generateText({} as never)).rejects.toThrow('generate: the prompt must be text or an array of token ids, got object');
      await expect(bytes.generateText([1, 2n] as never)).rejects.toThrow('token at [0][1] must be an integer, got 2n (a BigInt)');
      await expect(bytes.generateText([1], { seed: 2n } as never)).rejects.toThrow(/seed must be .*got 2n \(a BigInt\)/);
      await expect(bytes.generateText([1], { signal: { aborted: false } } as never)).rejects.toThrow(/signal must be an AbortSignal/);
      await expect(bytes.forward([[1]], 'parallel' as never)).rejects.toThrow('forward: options must be an object, got string');
    } finally {
      bytes.dispose();
    }
  });

  test("a tokenizer that doesn't fit the model is refused when the model is made", async () => {
    const tokenizer = { vocabSize: 1000, encode: () => [1], decode: () => '', createStreamDecoder: () => ({ push: () => '', flush: () => '' }) };
    await expect(RetNet.create({ ...CONFIG, vocab_size: 300 }, { tokenizer })).rejects.toThrow(
      "tokenizer.vocabSize must be an integer in [1, 300] (the model's vocab_size), got 1000",
    );
    await expect(RetNet.create({ ...CONFIG, vocab_size: 300 }, { tokenizer: { vocabSize: 5 } as never })).rejects.toThrow(
      'tokenizer must be an object with encode, decode and createStreamDecoder methods',
    );
  });

  test('generation options and prompts', async () => {
    await expect(model.generateText('hi')).rejects.toThrow(/smaller than the byte tokenizer/);
    const bytes = await RetNet.create({ ...CONFIG, vocab_size: 256 });
    await expect(bytes.generateText([], { maxTokens: 2 })).rejects.toThrow(/prompt is empty/);
    await expect(bytes.generateText([1, 260], { maxTokens: 2 })).rejects.toThrow(/token id 260/);
    await expect(bytes.generateText([1], { temperature: -1 })).rejects.toThrow(/temperature/);
    await expect(bytes.generateText('a', { maxTokens: -1 })).rejects.toThrow(/maxTokens/);
    bytes.dispose();
  });
});

describe('configs', () => {
  test.each([
    [{ ...CONFIG, decoder_retention_heads: 3 }, /divisible by decoder_retention_heads/],
    [{ ...CONFIG, decoder_embed_dim: 18, decoder_retention_heads: 2, decoder_value_embed_dim: 18 }, /must be even/],
    [{ ...CONFIG, decoder_value_embed_dim: 15 }, /decoder_value_embed_dim \(15\) must be divisible/],
    [{ ...CONFIG, vocab_size: 0 }, /vocab_size must be an integer/],
    [{ ...CONFIG, activation_fn: 'tanh' }, /activation_fn/],
    [{ ...CONFIG, layernorm_eps: -1 }, /layernorm_eps/],
    [{ ...CONFIG, layernorm_eps: 1e39 }, /layernorm_eps must be a number >= 0 that float32 holds \(at most 3\.4028235e38\), got 1e\+39/],
    [{ ...CONFIG, decoder_layers: 2.5 }, /decoder_layers/],
    [{ ...CONFIG, decoder_layers: 2 ** 20 }, /decoder_layers must be an integer in \[1, 4096\], got 1048576/],
    [{ decoder_layers: 1 }, /vocab_size is required/],
    [{ ...CONFIG, multiway: 'true' }, /multiway must be false .*got "true"/],
    [{ ...CONFIG, moe_freq: 2 }, /moe_freq must be 0/],
    [{ ...CONFIG, vocab_size: 2 ** 20, decoder_embed_dim: 2 ** 20 }, /embed_tokens.weight would hold 1048576 x 1048576 = 1099511627776 values, more than one tensor can here/],
  ])('create(%j) throws', async (config, message) => {
    await expect(RetNet.create(config as typeof CONFIG)).rejects.toThrow(message);
  });

  test('cuda is a clear error where it cannot run', async () => {
    const info = buildInfo();
    if (info.cuda && info.cudaDevices > 0) return;  // a GPU machine: test/cuda covers it
    const expected = info.cuda ? /^no CUDA device: ./ : /^retnet was built without CUDA$/;
    await expect(RetNet.create(CONFIG, { device: 'cuda' })).rejects.toThrow(expected);
  });

  test('an unknown RETNET_CPU_ISA is a clear error, not a silent default', () => {
    jest.isolateModules(() => {
      // A fresh copy of the loader, which has not loaded the addon yet.
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { addon } = require('../lib/native') as typeof import('../lib/native');
      process.env.RETNET_CPU_ISA = 'avx9';
      try {
        expect(() => addon()).toThrow(/RETNET_CPU_ISA must be 'avx512', 'avx2' or 'generic'.*"avx9"/);
      } finally {
        delete process.env.RETNET_CPU_ISA;
      }
    });
  });
});

describe('files', () => {
  const source = path.join(FIXTURES_DIR, 'base_gelu_s64_c16', 'model.safetensors');
  const original = fs.readFileSync(source);
  const headerLength = Number(original.readBigUInt64LE(0));
  const header = JSON.parse(original.toString('utf8', 8, 8 + headerLength));

  function withHeader(edit: (h: Record<string, any>) => void): Buffer {
    const h = JSON.parse(JSON.stringify(header));
    edit(h);
    let text = JSON.stringify(h);
    while ((8 + text.length) % 8) text += ' ';
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(text.length));
    return Buffer.concat([prefix, Buffer.from(text), original.subarray(8 + headerLength)]);
  }

  async function loadBytes(bytes: Buffer): Promise<RetNet> {
    const file = path.join(dir, `case-${Math.random().toString(36).slice(2)}.safetensors`);
    fs.writeFileSync(file, bytes);
    return RetNet.load(file);
  }

  test.each([
    ['truncated', () => original.subarray(0, original.length - 100), /truncat|data section|bytes/i],
    ['absurd header length', () => {
      const b = Buffer.from(original);
      b.writeBigUInt64LE(1n << 60n, 0);
      return b;
    }, /header/i],
    ['bad JSON', () => {
      const b = Buffer.from(original);
      b.write('{{{{', 8);
      return b;
    }, /JSON/],
    ['unsupported dtype', () => withHeader((h) => (h['embed_tokens.weight'].dtype = 'I8')), /dtype/],
    ['shape that disagrees with the config', () =>
      withHeader((h) => {
        h['layer_norm.weight'].shape = [32, 2];
      }), /layer_norm.weight/],
    ['missing tensor', () => {
      const { tensors } = parseSafetensors(original);
      const kept = [...tensors].filter(([name]) => name !== 'layers.1.ffn.fc2.weight');
      return serializeSafetensors(
        kept.map(([name, t]) => ({ name, shape: t.shape, data: t.data })),
        { config: JSON.stringify(JSON.parse(fs.readFileSync(path.join(FIXTURES_DIR, 'base_gelu_s64_c16', 'config.json'), 'utf8'))) },
      );
    }, /layers.1.ffn.fc2.weight/],
    ['tiny file', () => Buffer.from([1, 2, 3]), /shorter than|too short|8 bytes/i],
  ])('%s', async (_name, make, message) => {
    await expect(loadBytes(make())).rejects.toThrow(message);
  });

  test('a directory without config.json, a missing path, bad config JSON', async () => {
    const d = path.join(dir, 'noconfig');
    fs.mkdirSync(d);
    fs.copyFileSync(source, path.join(d, 'model.safetensors'));
    await expect(RetNet.load(d)).rejects.toThrow(/config.json is missing/);
    fs.writeFileSync(path.join(d, 'config.json'), '{"vocab_size": ');
    await expect(RetNet.load(d)).rejects.toThrow(/not valid JSON/);
    await expect(RetNet.load(path.join(dir, 'nope'))).rejects.toThrow(/does not exist/);
  });

  test('a save cut short among its renames (new weights beside the old config) is finished by the next load', async () => {
    const target = path.join(dir, 'interrupted');
    await model.save(target);
    const wider = await RetNet.create({ ...CONFIG, decoder_embed_dim: 32 }, { seed: 2 });
    const staging = path.join(dir, 'staging');
    await wider.save(staging);
    // The state a kill between the two renames leaves: the journal, the weights renamed, the
    // config still in its temp file.
    const renames = [
      { from: '.model.safetensors.1.aa.tmp', to: 'model.safetensors' },
      { from: '.config.json.1.bb.tmp', to: 'config.json' },
    ];
    fs.writeFileSync(path.join(target, '.retnet-replace.json'), JSON.stringify(renames));
    fs.copyFileSync(path.join(staging, 'model.safetensors'), path.join(target, 'model.safetensors'));
    fs.copyFileSync(path.join(staging, 'config.json'), path.join(target, renames[1].from));
    const loaded = await RetNet.load(target);
    expect(loaded.config.decoder_embed_dim).toBe(32);
    expect(fs.readdirSync(target).sort()).toEqual(['config.json', 'model.safetensors']);
    const ids = [[1, 2, 3]];
    expect(Array.from((await loaded.forward(ids)).logits)).toEqual(Array.from((await wider.forward(ids)).logits));
    loaded.dispose();
    wider.dispose();
    // A journal naming anything but its own temp files is not acted on.
    fs.writeFileSync(path.join(target, '.retnet-replace.json'), JSON.stringify([{ from: 'config.json', to: 'model.safetensors' }]));
    await expect(RetNet.load(target)).rejects.toThrow("an interrupted save's journal is unreadable (not a list of renames of its temp files)");
    expect(fs.readdirSync(target).sort()).toEqual(['.retnet-replace.json', 'config.json', 'model.safetensors']);
  });

  test('a failed save leaves the previous file intact', async () => {
    const file = path.join(dir, 'keep.safetensors');
    await model.save(file);
    const before = fs.readFileSync(file);
    const ro = path.join(dir, 'ro');
    fs.mkdirSync(ro);
    await model.save(path.join(ro, 'x.safetensors'));
    fs.chmodSync(ro, 0o500);
    const canWrite = (() => {
      try {
        fs.writeFileSync(path.join(ro, 'probe'), '');
        return true; // running as root: permissions don't stop us, skip this half
      } catch {
        return false;
      }
    })();
    if (!canWrite) await expect(model.save(path.join(ro, 'x.safetensors'))).rejects.toThrow();
    fs.chmodSync(ro, 0o700);
    expect(fs.readFileSync(file).equals(before)).toBe(true);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.tmp'))).toEqual([]);
  });

  test('a save to a directory that fails on its second file leaves the previous pair loadable', async () => {
    const target = path.join(dir, 'pair');
    await model.save(target);
    const deeper = await RetNet.create({ ...CONFIG, decoder_layers: 2 }, { seed: 4 });
    // The disk fills up as config.json is written, after the weights.
    const realOpen = fs.promises.open;
    const spy = jest.spyOn(fs.promises, 'open').mockImplementation(async (file, ...rest) => {
      if (String(file).includes('config.json')) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
      return realOpen(file, ...(rest as [string]));
    });
    try {
      await expect(deeper.save(target)).rejects.toThrow(/ENOSPC/);
    } finally {
      spy.mockRestore();
      deeper.dispose();
    }
    expect(fs.readdirSync(target).sort()).toEqual(['config.json', 'model.safetensors']);
    const loaded = await RetNet.load(target);
    expect(loaded.config.decoder_layers).toBe(1);
    loaded.dispose();
  });

  test('a failed save into a new directory leaves no directory behind', async () => {
    const m = await RetNet.create(CONFIG, { seed: 3 });
    const target = path.join(dir, 'fresh', 'model');
    const saving = m.save(target);
    m.native().setParam('layer_norm.weight', new Float32Array(CONFIG.decoder_embed_dim).fill(2));
    await expect(saving).rejects.toThrow(/weights changed while saving/);
    expect(fs.existsSync(path.join(dir, 'fresh'))).toBe(false);
    m.dispose();
  });

  test('a Trainer needs fp32 weights', async () => {
    const compact = await RetNet.create(CONFIG, { seed: 3, weights: 'int8' });
    expect(() => new Trainer(compact, { lr: 1e-3, totalSteps: 1 })).toThrow('Trainer needs a model with fp32 weights; this one holds int8 weights');
    compact.dispose();
  });

  test('weights changed during a save fail it and leave the previous file intact', async () => {
    const m = await RetNet.create(CONFIG, { seed: 3 });
    const file = path.join(dir, 'moving.safetensors');
    await m.save(file);
    const before = fs.readFileSync(file);
    // save reads the weights a tensor at a time; a write between two of them must not land.
    const saving = m.save(file);
    m.native().setParam('layer_norm.weight', new Float32Array(CONFIG.decoder_embed_dim).fill(2));
    await expect(saving).rejects.toThrow(/weights changed while saving/);
    expect(fs.readFileSync(file).equals(before)).toBe(true);
    expect(fs.readdirSync(dir).filter((n) => n.includes('.tmp'))).toEqual([]);
    await m.save(file); // a save with nothing running alongside succeeds
    const loaded = await RetNet.load(file);
    expect(loaded.stateDict().get('layer_norm.weight')![0]).toBe(2);
    loaded.dispose();
    m.dispose();
  });
});

// The addon's own calls (lib/native.ts), which the model code reaches: a fuzzing pass crashed
// each case below before it was checked.
describe('native calls', () => {
  const resizable = (n: number) => new Float32Array(new (ArrayBuffer as unknown as new (n: number, o: object) => ArrayBuffer)(4 * n, { maxByteLength: 8 * n }));

  test('an array detached by a getter while the call reads its arguments is refused', async () => {
    const native = model.native();
    const [M, N, K] = [2, 3, 4];
    let c = new Float32Array(M * N);
    const options = { M, N, K, aTransposed: false, bTransposed: false };
    Object.defineProperty(options, 'accumulate', { get: () => ((c = structuredClone(c, { transfer: [c.buffer] })), false) });
    const a = new Float32Array(M * K);
    const cAtCall = c;
    expect(() => addon().gemm(a, new Float32Array(K * N), cAtCall, options as never)).toThrow('c was detached while the call read its arguments');

    const state = native.createState(1);
    const exported = state.exportState();
    const [kv, scale] = [new Float32Array(exported.kv), exported.scale];
    const positions: number[] = [];
    Object.defineProperty(positions, 0, { get: () => (structuredClone(kv, { transfer: [kv.buffer] }), 0), enumerable: true });
    expect(() => state.importState(kv, scale, positions)).toThrow('kv was detached while the call read its arguments');
    state.dispose();

    // setParams reads its tensors by name: a later name's getter detaches an earlier tensor.
    const [first, second] = native.paramNames();
    const tensors: Record<string, Float32Array> = { [first]: new Float32Array(await native.getParam(first)) };
    Object.defineProperty(tensors, second, {
      get: () => (structuredClone(tensors[first], { transfer: [tensors[first].buffer] }), native.getParam(second)),
      enumerable: true,
    });
    await expect(async () => native.setParams(tensors)).rejects.toThrow(`tensor "${first}" was detached while the call read its arguments`);
  });

  test('arrays on a resizable ArrayBuffer, which could shrink under a worker, are refused', async () => {
    const native = model.native();
    const state = native.createState(1);
    const { kv, scale } = state.exportState();
    const onResizable = resizable(kv.length);
    onResizable.set(kv);
    expect(() => state.importState(onResizable, scale, [0])).toThrow('kv is on a resizable ArrayBuffer');
    expect(() => addon().gemm(resizable(1), new Float32Array(1), new Float32Array(1), { M: 1, N: 1, K: 1 } as never)).toThrow(
      'a is on a resizable ArrayBuffer',
    );
    const name = native.paramNames()[0];
    const weights = resizable((await native.getParam(name)).length);
    expect(() => native.setParams({ [name]: weights })).toThrow(`tensor "${name}" is on a resizable ArrayBuffer`);
    const dict = model.stateDict();
    weights.set(dict.get(name)!);
    dict.set(name, weights);
    await expect(RetNet.fromStateDict(CONFIG, dict)).rejects.toThrow(`tensor "${name}" is on a resizable ArrayBuffer`);
    state.dispose();
  });

  test('a trainStep whose options dispose the model is refused', async () => {
    const m = await RetNet.create(CONFIG, { seed: 1 });
    const native = m.native();
    const options = { mode: 'parallel', chunkSize: 8, lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0, clipNorm: 0, noDecay: [] };
    Object.defineProperty(options, 'seed', { get: () => (native.dispose(), 1) });
    const micro = [{ tokens: new Int32Array(8).fill(3), batch: 1, length: 8, targets: null, mask: null }];
    expect(() => native.trainStep(micro as never, options as never)).toThrow('model was disposed');
  });

  test('configs, modes and constructors are refused by name', async () => {
    const native = model.native();
    const good = {
      vocab_size: 50, decoder_embed_dim: 16, decoder_value_embed_dim: 16, decoder_retention_heads: 2, decoder_ffn_embed_dim: 24,
      decoder_layers: 1, decoder_normalize_before: true, layernorm_embedding: false, share_decoder_input_output_embed: false,
      activation_fn: 'gelu', layernorm_eps: 1e-6, no_scale_embedding: true, deepnorm: false,
    };
    await addon().createModel(good, {}).then((m) => m.dispose());
    for (const [change, message] of [
      [{ vocab_size: 1.7 }, 'config.vocab_size must be an integer >= 1'],
      [{ decoder_layers: '2' }, 'config.decoder_layers must be a number'],
      [{ activation_fn: 'tanh' }, "config.activation_fn must be 'gelu', 'swish' or 'relu'"],
      [{ layernorm_eps: NaN }, 'config.layernorm_eps must be a number >= 0'],
      [{ deepnorm: 1 }, 'config.deepnorm must be a boolean'],
    ] as Array<[object, string]>) {
      expect(() => addon().createModel({ ...good, ...change }, {})).toThrow(message);
    }
    expect(() => addon().createModel(null as never, {})).toThrow('config must be an object');
    expect(() => native.forward(Int32Array.of(1), 1, 1, 3 as never, 8)).toThrow("mode must be 'parallel', 'chunkwise' or 'recurrent'");
    const ctors = addon() as unknown as Record<string, new (...args: unknown[]) => unknown>;
    expect(() => new ctors.NativeState({})).toThrow('this class is not constructed directly: use NativeModel.createState()');
    expect(() => new ctors.NativeModel()).toThrow('this class is not constructed directly: use createModel()');
  });
});

test('a disposed model throws instead of crashing', async () => {
  const m = await RetNet.create(CONFIG);
  m.dispose();
  await expect(m.forward([[1]])).rejects.toThrow(/disposed/);
  expect(() => m.createSession()).toThrow(/disposed/);
});

test('an allocation too large for the process is an Error, not an abort', () => {
  // In a child capped at 4 GB of address space, so the failure is certain and harmless.
  const lib = JSON.stringify(path.join(__dirname, '..', 'dist', 'lib'));
  const script = `
    const { RetNet } = require(${lib});
    (async () => {
      const model = await RetNet.create(${JSON.stringify(CONFIG)}, { seed: 1 });
      try { model.createSession({ batch: 2 ** 31 - 1 }); } catch (e) { console.log(e.message); }
      // The widest session, with 21 GB of logits.
      const wideVocab = await RetNet.create({ ...${JSON.stringify(CONFIG)}, vocab_size: 5000 }, { seed: 1 });
      const wide = wideVocab.createSession({ batch: 2 ** 20 });
      try { await wide.prefill({ data: new Int32Array(2 ** 20), shape: [2 ** 20, 1] }); } catch (e) { console.log(e.message); }
      wide.dispose();
      wideVocab.dispose();
      const big = { ...${JSON.stringify(CONFIG)}, decoder_embed_dim: 1024, decoder_value_embed_dim: 1024, decoder_ffn_embed_dim: 1024, decoder_layers: 200 };
      try { await RetNet.create(big); } catch (e) { console.log(e.message); }
      const session = model.createSession();
      await session.prefill([[1, 2]]);
      console.log('still serving');
    })();`;
  const out = execFileSync('bash', ['-c', 'ulimit -v 4000000 && exec "$0" -e "$1"', process.execPath, script], { encoding: 'utf8' });
  expect(out.split('\n')).toEqual([
    'createSession: batch must be an integer from 1 to 1048576, got 2147483647',
    'out of memory: logits of 1048576 rows',
    'out of memory: a model of 1678234624 parameters needs 6.3 GiB for its fp32 weights',
    'still serving',
    '',
  ]);
});
