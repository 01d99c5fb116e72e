// Load generator for the completions server: starts the server in this process on 127.0.0.1 and
// drives it over loopback with streaming requests at several concurrency levels, then a soak.
// Reports aggregate tokens/s, request latency p50/p99, event-loop delay p99 (the server's loop:
// it is this process's) and RSS before and after the soak. Every phase is bounded in requests and time.
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

import { RetNet } from '../lib/model';
import { integerFlag, numberFlag } from './flags';
import { createServer } from '../lib/server';

const USAGE = `usage: node dist/scripts/load.js [options]

  --model DIR          model to serve (default: a random byte-level model, see --dim/--layers)
  --dim N              embedding dim of the random model (default 256)
  --layers N           layers of the random model (default 4)
  --levels LIST        concurrent streams per level (default 1,8,32,64)
  --requests N         requests per level (default 64; at least the level's concurrency)
  --max-tokens N       max_tokens per request (default 64)
  --seconds X          time bound per level; no new requests after it (default 60)
  --soak N             requests in the soak (default 5000; 0 skips it)
  --soak-concurrency N concurrent streams in the soak (default 32)
  --soak-seconds X     time bound of the soak (default 600)
  -h, --help           show this help`;

interface Outcome {
  latencyMs: number;
  tokens: number;
  ok: boolean;
}

interface PhaseResult {
  concurrency: number;
  requests: number;
  errors: number;
  tokensPerSecond: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
  eventLoopDelayP99Ms: number;
}

/** Nearest-rank percentile of ascending `sorted`. */
function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** One streaming completion; resolves its latency and completion tokens (from the usage chunk). */
function streamCompletion(agent: http.Agent, port: number, prompt: string, maxTokens: number): Promise<Outcome> {
  const started = performance.now();
  const body = JSON.stringify({ prompt, max_tokens: maxTokens, temperature: 0.8, top_k: 40, stream: true, stream_options: { include_usage: true } });
  return new Promise((resolve) => {
    const fail = (): void => resolve({ latencyMs: performance.now() - started, tokens: 0, ok: false });
    const req = http.request({ host: '127.0.0.1', port, method: 'POST', path: '/v1/completions', agent }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('error', fail);
      res.on('end', () => {
        const usage = /"completion_tokens":(\d+)/.exec(text);
        const ok = res.statusCode === 200 && text.endsWith('data: [DONE]\n\n') && usage !== null;
        resolve({ latencyMs: performance.now() - started, tokens: usage ? Number(usage[1]) : 0, ok });
      });
    });
    req.on('error', fail);
    req.end(body);
  });
}

// The delay histogram records whole sampling intervals, so an idle loop reads as the
// interval itself: reported delays have it subtracted.
const LOOP_SAMPLE_MS = 1;

/** Runs up to `requests` completions, `concurrency` at a time, starting none after `seconds`. */
async function runPhase(port: number, concurrency: number, requests: number, seconds: number, maxTokens: number): Promise<PhaseResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const loopDelay = monitorEventLoopDelay({ resolution: LOOP_SAMPLE_MS });
  loopDelay.enable();
  const started = performance.now();
  const deadline = started + seconds * 1000;
  const outcomes: Outcome[] = [];
  let issued = 0;
  const worker = async (): Promise<void> => {
    while (issued < requests && performance.now() < deadline) {
      const index = issued++;
      outcomes.push(await streamCompletion(agent, port, `Request ${index}: the weather today is`, maxTokens));
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const elapsedS = (performance.now() - started) / 1000;
  loopDelay.disable();
  agent.destroy();
  const latencies = outcomes.map((o) => o.latencyMs).sort((a, b) => a - b);
  return {
    concurrency,
    requests: outcomes.length,
    errors: outcomes.filter((o) => !o.ok).length,
    tokensPerSecond: outcomes.reduce((sum, o) => sum + o.tokens, 0) / elapsedS,
    latencyP50Ms: percentile(latencies, 50),
    latencyP99Ms: percentile(latencies, 99),
    eventLoopDelayP99Ms: Math.max(0, loopDelay.percentile(99) / 1e6 - LOOP_SAMPLE_MS),
  };
}

function formatPhase(label: string, r: PhaseResult): string {
  return (
    `${label.padEnd(10)} streams=${String(r.concurrency).padStart(3)} requests=${String(r.requests).padStart(5)} errors=${r.errors}` +
    `  ${r.tokensPerSecond.toFixed(1)} tok/s  latency p50 ${r.latencyP50Ms.toFixed(0)} ms p99 ${r.latencyP99Ms.toFixed(0)} ms` +
    `  event-loop delay p99 ${r.eventLoopDelayP99Ms.toFixed(1)} ms`
  );
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      model: { type: 'string' },
      dim: { type: 'string' },
      layers: { type: 'string' },
      levels: { type: 'string' },
      requests: { type: 'string' },
      'max-tokens': { type: 'string' },
      seconds: { type: 'string' },
      soak: { type: 'string' },
      'soak-concurrency': { type: 'string' },
      'soak-seconds': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  const levels = (values.levels ?? '1,8,32,64').split(',').map((level) => integerFlag(level, 'levels', 1) ?? 1);
  const requests = integerFlag(values.requests, 'requests', 1) ?? 64;
  const maxTokens = integerFlag(values['max-tokens'], 'max-tokens', 1) ?? 64;
  const seconds = numberFlag(values.seconds, 'seconds', 0) ?? 60;
  const soakRequests = integerFlag(values.soak, 'soak', 0) ?? 5000;
  const soakConcurrency = integerFlag(values['soak-concurrency'], 'soak-concurrency', 1) ?? 32;
  const soakSeconds = numberFlag(values['soak-seconds'], 'soak-seconds', 0) ?? 600;
  const dim = integerFlag(values.dim, 'dim', 2) ?? 256;

  const model =
    values.model !== undefined
      ? await RetNet.load(values.model)
      : await RetNet.create({
          vocab_size: 256,
          decoder_embed_dim: dim,
          decoder_value_embed_dim: 2 * dim,
          decoder_ffn_embed_dim: 2 * dim,
          decoder_retention_heads: 4,
          decoder_layers: integerFlag(values.layers, 'layers', 1) ?? 4,
        });
  const maxStreams = Math.max(soakConcurrency, ...levels);
  const server = createServer(model, { maxTokensLimit: maxTokens, scheduler: { maxConcurrent: maxStreams, maxQueue: maxStreams } });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  process.stdout.write(`model: ${values.model ?? 'random'} (${model.parameterCount} parameters), max_tokens ${maxTokens}, loopback port ${port}\n`);
  try {
    for (const level of levels) {
      const result = await runPhase(port, level, Math.max(requests, level), seconds, maxTokens);
      process.stdout.write(formatPhase('level', result) + '\n');
    }
    if (soakRequests > 0) {
      const rssStart = process.memoryUsage().rss;
      const result = await runPhase(port, soakConcurrency, soakRequests, soakSeconds, maxTokens);
      const rssEnd = process.memoryUsage().rss;
      process.stdout.write(formatPhase('soak', result) + '\n');
      process.stdout.write(`soak RSS: start ${(rssStart / 2 ** 20).toFixed(1)} MiB, end ${(rssEnd / 2 ** 20).toFixed(1)} MiB\n`);
    }
    const stats = model.scheduler().stats();
    process.stdout.write(
      `scheduler: ${stats.decodeSteps} decode steps, mean batch ${(stats.decodedTokens / Math.max(1, stats.decodeSteps)).toFixed(1)}, ` +
        `${stats.prefillTokens} prompt tokens prefilled, ${stats.prefixTokensReused} taken from the prefix cache\n`,
    );
  } finally {
    server.closeAllConnections();
    server.close();
    model.dispose();
  }
}

main(process.argv.slice(2)).catch((e: Error) => {
  process.stderr.write(`error: ${e.message}\n`);
  process.exit(1);
});
