// An OpenAI-compatible HTTP front end: POST /v1/completions (JSON or server-sent events),
// GET /v1/models, GET /health. Every bad request gets a 4xx JSON error naming the field and the
// server keeps serving; a client that disconnects aborts its generation, which frees its state.
import * as http from 'node:http';
import { randomUUID } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { TextDecoder } from 'node:util';

import type { GenerateRequest, RetNet } from './model';
import { SchedulerFullError, SchedulerOptions } from './scheduler';
import { formatValue } from './typed';

export interface ServerOptions {
  /** The id reported in responses and /v1/models. Default 'retnet'. */
  modelId?: string;
  /** Largest max_tokens a request may ask for. Default 4096. */
  maxTokensLimit?: number;
  /** max_tokens when a request gives none (capped by maxTokensLimit). Default 16, as OpenAI. */
  defaultMaxTokens?: number;
  /** Largest request body in bytes. Default 1 MiB. */
  maxBodyBytes?: number;
  /**
   * A streaming client that takes none of the response for this long is disconnected, so its
   * stream gives back its decode slot. Default 30000 ms.
   */
  stalledClientMs?: number;
  /** Limits for the model's scheduler (concurrency, queue, prefill pieces, prefix cache). */
  scheduler?: SchedulerOptions;
}

interface CompletionRequest {
  prompt: string;
  generate: GenerateRequest & { maxTokens: number };
  stream: boolean;
  includeUsage: boolean;
}

type FinishReason = 'stop' | 'length';

/** An error with the HTTP status and OpenAI error fields it is reported with. */
class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly type = 'invalid_request_error',
  ) {
    super(message);
  }
}

const ROUTES: Record<string, string> = { '/health': 'GET', '/v1/models': 'GET', '/v1/completions': 'POST' };

/** OpenAI completion fields this server cannot honour, each with the value that asks for nothing. */
const UNSUPPORTED: Record<string, unknown> = {
  echo: false,
  logprobs: null,
  best_of: 1,
  suffix: '',
  presence_penalty: 0,
  frequency_penalty: 0,
  logit_bias: {},
};

function asksForNothing(value: unknown, nothing: unknown): boolean {
  if (nothing === null || typeof nothing !== 'object') return value === nothing;
  return value !== null && typeof value === 'object' && !Array.isArray(value) && Object.keys(value).length === 0;
}
const MAX_STOP_SEQUENCES = 4;

function checkLimit(value: number, field: keyof ServerOptions, min: number): number {
  if (!Number.isSafeInteger(value) || value < min) throw new Error(`invalid server option: ${field} must be an integer >= ${min}, got ${String(value)}`);
  return value;
}

/** A Node http.Server (not yet listening: call listen(port, '127.0.0.1')) serving `model`. */
export function createServer(model: RetNet, options: ServerOptions = {}): http.Server {
  const modelId = options.modelId ?? 'retnet';
  const maxTokensLimit = checkLimit(options.maxTokensLimit ?? 4096, 'maxTokensLimit', 1);
  const defaultMaxTokens = Math.min(checkLimit(options.defaultMaxTokens ?? 16, 'defaultMaxTokens', 1), maxTokensLimit);
  const maxBodyBytes = checkLimit(options.maxBodyBytes ?? 1 << 20, 'maxBodyBytes', 1);
  const stalledClientMs = checkLimit(options.stalledClientMs ?? 30_000, 'stalledClientMs', 1);
  if (!model.tokenizer) throw new Error('createServer: the model has no tokenizer for text prompts');
  const tokenizer = model.tokenizer;
  model.scheduler(options.scheduler);
  const created = Math.floor(Date.now() / 1000);

  const listModels = (): unknown => ({
    object: 'list',
    data: [{ id: modelId, object: 'model', created, owned_by: 'retnet', parameterCount: model.parameterCount, config: model.config }],
  });

  const parseCompletion = (body: unknown): CompletionRequest => {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new HttpError(400, 'the request body must be a JSON object');
    const fields = body as Record<string, unknown>;
    // OpenAI clients send null for "not set".
    const field = (name: string): unknown => (fields[name] === null ? undefined : fields[name]);
    const invalid = (name: string, requirement: string): HttpError =>
      new HttpError(400, `${name} must be ${requirement}, got ${formatValue(fields[name])}`, name);
    // OpenAI fields this server cannot honour are refused unless they ask for nothing (their
    // default), rather than answered as if they had been.
    for (const [name, nothing] of Object.entries(UNSUPPORTED)) {
      const value = field(name);
      if (value !== undefined && !asksForNothing(value, nothing)) throw invalid(name, `${formatValue(nothing)} (not supported here)`);
    }

    const prompt = fields.prompt;
    if (typeof prompt !== 'string' || prompt.length === 0) throw invalid('prompt', 'a non-empty string');
    const maxTokens = field('max_tokens') ?? defaultMaxTokens;
    if (!Number.isSafeInteger(maxTokens) || (maxTokens as number) < 1) throw invalid('max_tokens', 'an integer >= 1');
    if ((maxTokens as number) > maxTokensLimit) throw invalid('max_tokens', `at most ${maxTokensLimit} on this server`);
    const temperature = field('temperature');
    if (temperature !== undefined && !(typeof temperature === 'number' && temperature >= 0 && temperature <= 2)) {
      throw invalid('temperature', 'a number in [0, 2]');
    }
    const topP = field('top_p');
    if (topP !== undefined && !(typeof topP === 'number' && topP > 0 && topP <= 1)) throw invalid('top_p', 'a number in (0, 1]');
    const topK = field('top_k');
    if (topK !== undefined && !(Number.isSafeInteger(topK) && (topK as number) >= 0)) throw invalid('top_k', 'an integer >= 0 (0 = off)');
    const repetitionPenalty = field('repetition_penalty');
    if (repetitionPenalty !== undefined && !(typeof repetitionPenalty === 'number' && repetitionPenalty > 0 && Number.isFinite(repetitionPenalty))) {
      throw invalid('repetition_penalty', 'a finite number > 0 (1 = off)');
    }
    const seed = field('seed');
    if (seed !== undefined && !Number.isSafeInteger(seed)) throw invalid('seed', 'an integer');
    const stop = field('stop');
    const stops = stop === undefined ? [] : Array.isArray(stop) ? stop : [stop];
    if (stops.length > MAX_STOP_SEQUENCES || !stops.every((s) => typeof s === 'string' && s.length > 0)) {
      throw invalid('stop', `a non-empty string or an array of at most ${MAX_STOP_SEQUENCES} of them`);
    }
    const stream = field('stream') ?? false;
    if (typeof stream !== 'boolean') throw invalid('stream', 'a boolean');
    const n = field('n');
    if (n !== undefined && n !== 1) throw invalid('n', '1 (one completion per request)');
    const streamOptions = field('stream_options');
    if (streamOptions !== undefined && (typeof streamOptions !== 'object' || Array.isArray(streamOptions))) {
      throw invalid('stream_options', 'an object');
    }
    const includeUsage = (streamOptions as { include_usage?: unknown } | undefined)?.include_usage === true;
    return {
      prompt,
      stream,
      includeUsage,
      generate: {
        maxTokens: maxTokens as number,
        temperature: temperature as number | undefined,
        topP: topP as number | undefined,
        topK: topK as number | undefined,
        repetitionPenalty: repetitionPenalty as number | undefined,
        seed: seed as number | undefined,
        stop: stops as string[],
      },
    };
  };

  const complete = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const bytes = await readBody(req, maxBodyBytes);
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      throw new HttpError(400, 'the request body is not valid UTF-8');
    }
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch (e) {
      throw new HttpError(400, `the request body is not valid JSON: ${(e as Error).message}`);
    }
    const request = parseCompletion(body);
    const promptTokens = tokenizer.encode(request.prompt);

    // Closing the connection before the response ends aborts the generation and frees its state.
    const disconnect = new AbortController();
    res.on('close', () => {
      if (!res.writableFinished) disconnect.abort(new Error('the client disconnected'));
    });
    const id = `cmpl-${randomUUID()}`;
    const envelope = { id, object: 'text_completion', created: Math.floor(Date.now() / 1000), model: modelId };
    const tokens: number[] = [];
    let completion = '';
    const finishReason = (): FinishReason => {
      if (tokens.length < request.generate.maxTokens) return 'stop';
      // The last allowed token may also have completed a stop sequence, which cut the text.
      return completion.length < tokenizer.decode(tokens).length ? 'stop' : 'length';
    };
    const usage = () => ({
      prompt_tokens: promptTokens.length,
      completion_tokens: tokens.length,
      total_tokens: promptTokens.length + tokens.length,
    });

    try {
      for await (const chunk of model.generate(promptTokens, { ...request.generate, signal: disconnect.signal })) {
        tokens.push(chunk.token);
        completion += chunk.text;
        if (!request.stream || chunk.text === '') continue;
        if (!res.headersSent) {
          res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', Connection: 'keep-alive' });
        }
        const choice = { text: chunk.text, index: 0, logprobs: null, finish_reason: null };
        if (!res.write(`data: ${JSON.stringify({ ...envelope, choices: [choice] })}\n\n`)) await drained(res, stalledClientMs);
      }
    } catch (e) {
      if (disconnect.signal.aborted) return;
      if (!res.headersSent) throw e;
      // Mid-stream the status is already sent: report the error as an event.
      res.end(`data: ${JSON.stringify(errorBody(toHttpError(e)))}\n\n`);
      return;
    }
    const reason = finishReason();
    if (!request.stream) {
      sendJson(res, 200, {
        ...envelope,
        choices: [{ text: completion, index: 0, logprobs: null, finish_reason: reason }],
        usage: usage(),
      });
      return;
    }
    if (!res.headersSent) res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    res.write(`data: ${JSON.stringify({ ...envelope, choices: [{ text: '', index: 0, logprobs: null, finish_reason: reason }] })}\n\n`);
    if (request.includeUsage) res.write(`data: ${JSON.stringify({ ...envelope, choices: [], usage: usage() })}\n\n`);
    res.end('data: [DONE]\n\n');
  };

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const path = (req.url ?? '/').split('?')[0];
    const method = ROUTES[path];
    if (method === undefined) throw new HttpError(404, `no route ${req.method} ${path}`, null, 'not_found_error');
    // HEAD is GET without the body (Node's response leaves it out).
    if (req.method !== method && !(req.method === 'HEAD' && method === 'GET')) {
      res.setHeader('Allow', method);
      throw new HttpError(405, `${path} takes ${method}, not ${req.method}`);
    }
    if (path === '/health') sendJson(res, 200, { status: 'ok', scheduler: model.scheduler().stats() });
    else if (path === '/v1/models') sendJson(res, 200, listModels());
    else await complete(req, res);
  };

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      const error = toHttpError(e);
      if (res.headersSent) {
        res.destroy();
        return;
      }
      // A body left unread (too large, or never read) must not be parsed as the next request.
      if (!req.complete) {
        res.setHeader('Connection', 'close');
        req.resume();
      }
      sendJson(res, error.status, errorBody(error));
    });
  });
  // Malformed HTTP (a bad Content-Length, say) never reaches a handler: answer it in JSON too.
  server.on('clientError', (err: Error, socket: Duplex) => {
    if (!socket.writable) {
      socket.destroy();
      return;
    }
    const body = JSON.stringify(errorBody(new HttpError(400, `malformed HTTP request: ${err.message}`)));
    socket.end(`HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
  });
  return server;
}

function toHttpError(e: unknown): HttpError {
  if (e instanceof HttpError) return e;
  if (e instanceof SchedulerFullError) return new HttpError(503, e.message, null, 'server_overloaded');
  const message = e instanceof Error ? e.message : String(e);
  // The model rejects options it cannot honour with 'invalid generate option: <field> ...'.
  const option = /^invalid (?:generate|sampling) option: (\w+)/.exec(message);
  if (option) return new HttpError(400, message, option[1]);
  return new HttpError(500, message, null, 'server_error');
}

function errorBody(error: HttpError): unknown {
  return { error: { message: error.message, type: error.type, param: error.param } };
}

function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

/** The whole body, or a 413 as soon as it is known to exceed `limit` bytes. */
function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer> {
  const tooLarge = (): HttpError => new HttpError(413, `the request body exceeds ${limit} bytes`);
  if (Number(req.headers['content-length']) > limit) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > limit) {
        req.off('data', onData);
        reject(tooLarge());
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
    // Settles nothing after 'end'; before it, the client went away mid-body.
    req.on('close', () => reject(new HttpError(400, 'the request body was cut off')));
  });
}

/**
 * Resolves when the response can take more data, or when the connection is gone. A client that
 * takes nothing for `stalledMs` is cut off: a stream waiting on it would hold its decode slot.
 */
function drained(res: http.ServerResponse, stalledMs: number): Promise<void> {
  return new Promise((resolve) => {
    const stalled = setTimeout(() => res.destroy(), stalledMs);
    const done = (): void => {
      clearTimeout(stalled);
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}
