// The OpenAI-compatible server on 127.0.0.1: completions (JSON and SSE), models, health, clean 4xx
// errors that leave the server serving, and client disconnects aborting their generation.
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

import { RetNet, createServer } from '../lib';
import { BYTE_MODEL_CONFIG as CONFIG } from './helpers/byte_model';

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

let model: RetNet;
let server: http.Server;
let port: number;

beforeAll(async () => {
  model = await RetNet.create(CONFIG, { seed: 5 });
  server = createServer(model, { modelId: 'tiny', maxTokensLimit: 4096, maxBodyBytes: 4096 });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(resolve));
  model.dispose();
});

function request(method: string, path: string, body?: string | Buffer): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const complete = (body: unknown): Promise<Reply> => request('POST', '/v1/completions', JSON.stringify(body));

function events(body: string): unknown[] {
  expect(body.endsWith('data: [DONE]\n\n')).toBe(true);
  return body
    .split('\n\n')
    .filter((e) => e.startsWith('data: ') && e !== 'data: [DONE]')
    .map((e) => JSON.parse(e.slice('data: '.length)));
}

test('non-stream completion returns the OpenAI completion object', async () => {
  const options = { prompt: 'Hello', max_tokens: 12, temperature: 0.8, top_k: 20, top_p: 0.9, seed: 3 };
  const reply = await complete(options);
  expect(reply.status).toBe(200);
  const json = JSON.parse(reply.body);
  expect(json).toMatchObject({ object: 'text_completion', model: 'tiny', usage: { prompt_tokens: 5, completion_tokens: 12, total_tokens: 17 } });
  expect(json.id).toMatch(/^cmpl-/);
  expect(Number.isInteger(json.created)).toBe(true);
  expect(json.choices).toEqual([
    { index: 0, logprobs: null, finish_reason: 'length', text: await model.generateText('Hello', { maxTokens: 12, temperature: 0.8, topK: 20, topP: 0.9, seed: 3 }) },
  ]);
});

test('stream completion sends completion chunks, a finish reason and [DONE]', async () => {
  const reply = await complete({ prompt: 'Hello', max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true } });
  expect(reply.status).toBe(200);
  expect(reply.headers['content-type']).toBe('text/event-stream');
  const chunks = events(reply.body) as { object: string; choices: { text: string; finish_reason: string | null }[]; usage?: unknown }[];
  expect(chunks.every((c) => c.object === 'text_completion')).toBe(true);
  const texts = chunks.flatMap((c) => c.choices.map((choice) => choice.text)).join('');
  expect(texts).toBe(await model.generateText('Hello', { maxTokens: 10, temperature: 0 }));
  const withReason = chunks.filter((c) => c.choices[0]?.finish_reason);
  expect(withReason.map((c) => c.choices[0].finish_reason)).toEqual(['length']);
  expect(chunks[chunks.length - 1]).toMatchObject({ choices: [], usage: { prompt_tokens: 5, completion_tokens: 10, total_tokens: 15 } });
});

test('a stop sequence ends the completion with finish_reason stop', async () => {
  const full = await model.generateText('Hello', { maxTokens: 30, temperature: 0 });
  const stop = full.slice(5, 7);
  const json = JSON.parse((await complete({ prompt: 'Hello', max_tokens: 30, temperature: 0, stop: [stop] })).body);
  expect(json.choices[0]).toMatchObject({ text: full.slice(0, full.indexOf(stop)), finish_reason: 'stop' });
});

test('GET /v1/models and /health', async () => {
  const models = JSON.parse((await request('GET', '/v1/models')).body);
  expect(models.data[0]).toMatchObject({ id: 'tiny', object: 'model', parameterCount: model.parameterCount });
  expect(models.data[0].config).toMatchObject({ decoder_embed_dim: 32, decoder_layers: 2, vocab_size: 256 });
  const health = await request('GET', '/health');
  expect(health.status).toBe(200);
  expect(JSON.parse(health.body)).toMatchObject({ status: 'ok', scheduler: { active: 0 } });
});

test.each([
  ['bad JSON', '{"prompt": "x",', 400, null, /not valid JSON/],
  ['a non-object body', '[1, 2]', 400, null, /JSON object/],
  ['a missing prompt', '{"max_tokens": 3}', 400, 'prompt', /prompt must be a non-empty string/],
  ['a numeric prompt', '{"prompt": 5}', 400, 'prompt', /prompt/],
  ['a string max_tokens', '{"prompt": "x", "max_tokens": "3"}', 400, 'max_tokens', /max_tokens must be an integer/],
  ['a huge max_tokens', '{"prompt": "x", "max_tokens": 100000}', 400, 'max_tokens', /at most 4096/],
  ['a negative temperature', '{"prompt": "x", "temperature": -1}', 400, 'temperature', /temperature/],
  ['a top_p of 0', '{"prompt": "x", "top_p": 0}', 400, 'top_p', /top_p/],
  ['a fractional top_k', '{"prompt": "x", "top_k": 1.5}', 400, 'top_k', /top_k/],
  ['a non-string stop', '{"prompt": "x", "stop": [1]}', 400, 'stop', /stop/],
  ['a string seed', '{"prompt": "x", "seed": "1"}', 400, 'seed', /seed/],
  ['a string stream flag', '{"prompt": "x", "stream": "yes"}', 400, 'stream', /stream/],
  ['n of 2', '{"prompt": "x", "n": 2}', 400, 'n', /n must be 1/],
  ['a max_tokens past float64', '{"prompt": "x", "max_tokens": 1e400}', 400, 'max_tokens', /max_tokens must be an integer >= 1, got Infinity/],
  ['echo', '{"prompt": "x", "echo": true}', 400, 'echo', /echo must be false \(not supported here\), got true/],
  ['logprobs', '{"prompt": "x", "logprobs": 5}', 400, 'logprobs', /logprobs must be null \(not supported here\)/],
  ['best_of of 3', '{"prompt": "x", "best_of": 3}', 400, 'best_of', /best_of must be 1/],
  ['a suffix', '{"prompt": "x", "suffix": "end"}', 400, 'suffix', /suffix must be ""/],
  ['a presence_penalty', '{"prompt": "x", "presence_penalty": 0.5}', 400, 'presence_penalty', /presence_penalty must be 0/],
  ['a string frequency_penalty', '{"prompt": "x", "frequency_penalty": "x"}', 400, 'frequency_penalty', /frequency_penalty must be 0/],
  ['a logit_bias', '{"prompt": "x", "logit_bias": {"5": 10}}', 400, 'logit_bias', /logit_bias must be \{\}/],
  ['a negative repetition_penalty', '{"prompt": "x", "repetition_penalty": -1}', 400, 'repetition_penalty', /repetition_penalty must be a finite number > 0/],
  ['invalid UTF-8', Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d]), 400, null, /UTF-8/],
  ['a body over the limit', JSON.stringify({ prompt: 'x'.repeat(5000) }), 413, null, /exceeds 4096 bytes/],
  // The message shows the start of a long value, not all of it.
  ['a long array of objects as the prompt', JSON.stringify({ prompt: Array.from({ length: 900 }, () => ({})) }), 400, 'prompt', /, got \[\{\},\{\}.{180,}… \(2701 characters\)$/],
])('%s is a 4xx naming the problem, and the server keeps serving', async (_name, body, status, param, message) => {
  const reply = await request('POST', '/v1/completions', body);
  expect(reply.status).toBe(status);
  const { error } = JSON.parse(reply.body);
  expect(error.param).toBe(param);
  expect(error.type).toBe('invalid_request_error');
  expect(error.message).toMatch(message);
  expect((await complete({ prompt: 'ok', max_tokens: 2 })).status).toBe(200);
});

test('unknown routes are 404 and wrong methods 405', async () => {
  expect((await request('GET', '/v2/nothing')).status).toBe(404);
  const reply = await request('GET', '/v1/completions');
  expect(reply.status).toBe(405);
  expect(reply.headers.allow).toBe('POST');
  expect((await request('POST', '/health')).status).toBe(405);
  const head = await request('HEAD', '/health');
  expect([head.status, head.body]).toEqual([200, '']);
});

test('the unsupported fields at their defaults, and repetition_penalty, are accepted', async () => {
  // As a client that spells out every field sends them.
  const reply = await complete({
    model: 'tiny',
    prompt: 'ok',
    suffix: '',
    max_tokens: 2,
    temperature: 0,
    logprobs: null,
    echo: false,
    frequency_penalty: 0,
    presence_penalty: 0,
    best_of: 1,
    logit_bias: {},
    repetition_penalty: 1.1,
  });
  expect(reply.status).toBe(200);
});

test('malformed HTTP gets a JSON 400', async () => {
  const net = await import('node:net');
  const raw = await new Promise<string>((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n'));
    let text = '';
    socket.on('data', (d) => (text += d.toString('utf8')));
    socket.on('end', () => resolve(text));
    socket.on('error', reject);
  });
  expect(raw.startsWith('HTTP/1.1 400 Bad Request')).toBe(true);
  expect(JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)).error.message).toMatch(/^malformed HTTP request: /);
  expect((await complete({ prompt: 'ok', max_tokens: 2 })).status).toBe(200);
});

test.each([true, false])('a client that disconnects mid-generation (stream %s) aborts it and frees its state', async (stream) => {
  const scheduler = model.scheduler();
  const before = scheduler.stats().decodedTokens;
  const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/completions', agent: false });
  req.on('error', () => undefined);
  req.end(JSON.stringify({ prompt: 'Hello', max_tokens: 4096, stream, temperature: 1 }));
  const waitFor = async (condition: () => boolean): Promise<void> => {
    for (let i = 0; i < 500 && !condition(); i++) await new Promise((r) => setTimeout(r, 2));
  };
  // Disconnect once the generation is running.
  await waitFor(() => scheduler.stats().decodedTokens > before);
  expect(scheduler.stats().active).toBe(1);
  req.destroy();
  await waitFor(() => scheduler.stats().active === 0);
  expect(scheduler.stats().active).toBe(0);
  expect(scheduler.stats().decodedTokens - before).toBeLessThan(4095);
  expect((await complete({ prompt: 'ok', max_tokens: 2 })).status).toBe(200);
});

test('beyond the concurrency and queue caps a request gets a 503, and the server recovers', async () => {
  const small = await RetNet.create(CONFIG, { seed: 6 });
  const busy = createServer(small, { scheduler: { maxConcurrent: 1, maxQueue: 0 } });
  await new Promise<void>((resolve) => busy.listen(0, '127.0.0.1', resolve));
  const busyPort = (busy.address() as AddressInfo).port;
  const post = (body: unknown): Promise<Reply> =>
    new Promise((resolve, reject) => {
      const req = http.request({ host: '127.0.0.1', port: busyPort, method: 'POST', path: '/v1/completions', agent: false }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body: text }));
      });
      req.on('error', reject);
      req.end(JSON.stringify(body));
    });
  const holder = http.request({ host: '127.0.0.1', port: busyPort, method: 'POST', path: '/v1/completions', agent: false });
  const started = new Promise<http.IncomingMessage>((resolve) => holder.on('response', (res) => res.once('data', () => resolve(res))));
  holder.on('error', () => undefined);
  holder.end(JSON.stringify({ prompt: 'Hold', max_tokens: 1000, stream: true }));
  await started;
  const rejected = await post({ prompt: 'x', max_tokens: 2 });
  expect(rejected.status).toBe(503);
  expect(JSON.parse(rejected.body).error).toMatchObject({ type: 'server_overloaded', message: expect.stringMatching(/maxConcurrent 1/) });
  holder.destroy();
  for (let i = 0; i < 100 && small.scheduler().stats().active > 0; i++) await new Promise((r) => setTimeout(r, 10));
  expect((await post({ prompt: 'x', max_tokens: 2 })).status).toBe(200);
  busy.closeAllConnections();
  await new Promise((resolve) => busy.close(resolve));
  small.dispose();
});

test('a streaming client that stops reading is cut off after stalledClientMs, giving its slot back', async () => {
  const small = await RetNet.create(CONFIG, { seed: 7 });
  const stalling = createServer(small, { maxTokensLimit: 1_000_000, stalledClientMs: 300, scheduler: { maxConcurrent: 1, maxQueue: 0 } });
  await new Promise<void>((resolve) => stalling.listen(0, '127.0.0.1', resolve));
  const stallPort = (stalling.address() as AddressInfo).port;
  // Reads the headers, then nothing: once the socket buffers fill (a few MB), the stream waits.
  const reader = http.request({ host: '127.0.0.1', port: stallPort, method: 'POST', path: '/v1/completions', agent: false }, (res) => {
    res.pause();
    res.on('error', () => undefined);
  });
  reader.on('error', () => undefined);
  reader.end(JSON.stringify({ prompt: 'Hold', max_tokens: 1_000_000, stream: true, temperature: 1 }));
  const stats = () => small.scheduler().stats();
  for (let i = 0; i < 3000 && !(stats().decodedTokens > 0 && stats().active === 0); i++) await new Promise((r) => setTimeout(r, 10));
  expect(stats().active).toBe(0);
  expect(stats().decodedTokens).toBeGreaterThan(0);
  expect(stats().decodedTokens).toBeLessThan(1_000_000);
  reader.destroy();
  expect(() => createServer(small, { stalledClientMs: 0 })).toThrow('invalid server option: stalledClientMs must be an integer >= 1, got 0');
  stalling.closeAllConnections();
  await new Promise((resolve) => stalling.close(resolve));
  small.dispose();
}, 60_000);
