// `retnet serve`: an OpenAI-compatible completions server for a saved model (lib/server.ts),
// on 127.0.0.1 unless --host says otherwise.
import { parseArgs } from 'util';

import { RetNet } from '../lib/model';
import { WEIGHT_FORMATS, WeightFormat } from '../lib/native';
import { integerFlag } from './flags';
import { createServer } from '../lib/server';

const USAGE = `usage: retnet serve --model DIR [options]

  --model DIR             a model directory (config.json + model.safetensors) or a .safetensors file
  --host HOST             address to bind (default 127.0.0.1)
  --port N                port (default 8000; 0 picks a free one)
  --model-id NAME         id reported by the API (default: the model path)
  --weights FORMAT        f32 (default), or bf16 / int8 (compact: fewer bytes per step; see
                          the README)
  --max-tokens-limit N    largest max_tokens a request may ask for (default 4096)
  --max-concurrent N      sequences decoded together (default 64)
  --max-queue N           requests waiting for a slot before 503s (default 256)
  --prefix-cache N        cached prompt-prefix states, 0 = off (default 16)
  -h, --help              show this help

  POST /v1/completions, GET /v1/models, GET /health`;

export async function serve(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      model: { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      'model-id': { type: 'string' },
      weights: { type: 'string' },
      'max-tokens-limit': { type: 'string' },
      'max-concurrent': { type: 'string' },
      'max-queue': { type: 'string' },
      'prefix-cache': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE + '\n');
    return;
  }
  if (values.model === undefined) throw new Error(`--model is required\n${USAGE}`);
  // Every flag checked before the model loads (which may take seconds).
  const maxTokensLimit = integerFlag(values['max-tokens-limit'], 'max-tokens-limit', 1);
  const scheduler = {
    maxConcurrent: integerFlag(values['max-concurrent'], 'max-concurrent', 1),
    maxQueue: integerFlag(values['max-queue'], 'max-queue', 0),
    prefixCacheEntries: integerFlag(values['prefix-cache'], 'prefix-cache', 0),
  };
  const listenPort = integerFlag(values.port, 'port', 0) ?? 8000;
  if (listenPort > 65535) throw new Error(`--port must be an integer from 0 to 65535, got ${values.port}`);
  const weights = (values.weights ?? 'f32') as WeightFormat;
  if (!WEIGHT_FORMATS.includes(weights)) throw new Error(`--weights must be one of ${WEIGHT_FORMATS.join(', ')}, got ${values.weights}`);
  const model = await RetNet.load(values.model, { weights });
  const server = createServer(model, { modelId: values['model-id'] ?? values.model, maxTokensLimit, scheduler });
  const host = values.host ?? '127.0.0.1';
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listenPort, host, resolve);
  });
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : values.port;
  process.stdout.write(`serving ${values.model} (${model.parameterCount} parameters) on http://${host}:${port}\n`);
  await new Promise<void>((resolve) => {
    const shutdown = (): void => {
      process.off('SIGINT', shutdown);
      process.off('SIGTERM', shutdown);
      server.close(() => resolve());
      // Open streams are cut: their generations abort and free their states.
      server.closeAllConnections();
    };
    process.on('SIGINT', shutdown);
    process.on('SIGTERM', shutdown);
  });
  model.dispose();
}

if (require.main === module) {
  serve(process.argv.slice(2)).catch((e: Error) => {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(1);
  });
}
