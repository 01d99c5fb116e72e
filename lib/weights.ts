// Checking loaded weights against a config, and torchscale's from-scratch initialisation (spec §2, §9).
//
// Tied models (share_decoder_input_output_embed): both functions return the *same*
// Float32Array under `embed_tokens.weight` and `output_projection.weight`, because torchscale
// ties them as one Parameter. Code that updates parameters must therefore treat the tied
// output projection as an alias (countParameters skips it for the same reason).

import { angleBuffer, BUFFER_NAMES, decayBuffer, dims, parameterShapes, RetNetConfig } from './config';
import { Rng } from './random';
import type { TensorEntry } from './safetensors';

export const EMBED = 'embed_tokens.weight';
export const OUTPUT = 'output_projection.weight';
const ANGLE = 'retnet_rel_pos.angle';
const DECAY = 'retnet_rel_pos.decay';

function fail(source: string, problem: string): never {
  throw new Error(`${source}: ${problem}`);
}

function computedBuffer(config: RetNetConfig, name: string): Float32Array {
  const { H, dk } = dims(config);
  return name === ANGLE ? angleBuffer(dk) : decayBuffer(H);
}

/** Index of the first position where two equal-length arrays differ, or -1. */
function firstDifference(a: Float32Array, b: Float32Array): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Lists at most a few names so an error about a wrong file stays readable. */
function listNames(names: string[]): string {
  const shown = names.slice(0, 8).map((n) => JSON.stringify(n));
  return names.length > shown.length ? `${shown.join(', ')} and ${names.length - shown.length} more` : shown.join(', ');
}

/** Where one parameter's values come from when a model is loaded. */
export interface PlannedWeight {
  name: string;
  /** stored: read from the source; computed: a buffer derived from the config; tied: the embedding. */
  from: 'stored' | 'computed' | 'tied';
  /** The source tensor a stored weight is read from, when not `name` (a tied embedding stored only as the output projection). */
  storedAs?: string;
}

/**
 * Checks the tensor names and shapes a source offers against the parameters `config` implies,
 * and returns every parameter and buffer in state_dict order with where its values come from.
 * Absent buffers are computed; an absent output projection is allowed only when tied, and a
 * tied model stored with only its output projection reads the embedding from that.
 * Throws an Error naming `source` and the tensor for anything missing, extra or misshapen.
 */
export function planWeights(config: RetNetConfig, shapes: Map<string, readonly number[]>, source: string): PlannedWeight[] {
  const expected = parameterShapes(config);
  const expectedNames = new Set(expected.map(([name]) => name));
  const unknown = [...shapes.keys()].filter((name) => !expectedNames.has(name));
  if (unknown.length > 0) {
    fail(source, `unexpected tensor(s) ${listNames(unknown)} for this config`);
  }
  const plan: PlannedWeight[] = [];
  const embedOnlyAsOutput = config.share_decoder_input_output_embed && !shapes.has(EMBED) && shapes.has(OUTPUT);
  for (const [name, shape] of expected) {
    if (name === EMBED && embedOnlyAsOutput) {
      const stored = shapes.get(OUTPUT)!;
      if (!sameShape(stored, shape)) {
        fail(source, `tensor ${JSON.stringify(OUTPUT)} has shape ${JSON.stringify(stored)}, expected ${JSON.stringify(shape)}`);
      }
      plan.push({ name, from: 'stored', storedAs: OUTPUT });
      continue;
    }
    if (name === OUTPUT && embedOnlyAsOutput) {
      plan.push({ name, from: 'tied' });
      continue;
    }
    const stored = shapes.get(name);
    if (stored === undefined) {
      if ((BUFFER_NAMES as readonly string[]).includes(name)) plan.push({ name, from: 'computed' });
      else if (name === OUTPUT && config.share_decoder_input_output_embed) plan.push({ name, from: 'tied' });
      else fail(source, `missing tensor ${JSON.stringify(name)} (expected shape ${JSON.stringify(shape)})`);
      continue;
    }
    if (!sameShape(stored, shape)) {
      fail(source, `tensor ${JSON.stringify(name)} has shape ${JSON.stringify(stored)}, expected ${JSON.stringify(shape)}`);
    }
    plan.push({ name, from: 'stored' });
  }
  return plan;
}

/**
 * The values of one planned parameter: `stored` is its data from the source (for `from:
 * 'stored'`), `embed` the embedding's values (for a tied output projection). Throws for a
 * buffer not shaped like one, or a stored tied output projection that differs from the
 * embedding. (Non-finite values are found by setParams, on its worker.)
 */
export function plannedValues(
  config: RetNetConfig,
  weight: PlannedWeight,
  stored: Float32Array | undefined,
  embed: Float32Array | undefined,
  source: string,
): Float32Array {
  const { name } = weight;
  if (weight.from === 'computed') return computedBuffer(config, name);
  if (weight.from === 'tied') return embed as Float32Array;
  const data = stored as Float32Array;
  // The buffers are functions of the config in torchscale; a stored one that is not shaped like
  // one (a decay > 0 makes γ > 1 and the state grow without bound; the rotation reads one
  // angle per pair) would give non-finite or silently wrong logits.
  if (name === DECAY) {
    const bad = data.findIndex((d) => !(d <= 0));
    if (bad >= 0) fail(source, `tensor ${JSON.stringify(name)} holds ${data[bad]} at index ${bad}: each head's decay is log γ <= 0`);
  }
  if (name === ANGLE) {
    for (let j = 0; j + 1 < data.length; j += 2) {
      if (data[j] !== data[j + 1]) {
        fail(source, `tensor ${JSON.stringify(name)} differs within the pair at indices ${j}, ${j + 1} (${data[j]}, ${data[j + 1]}): each rotation pair has one angle`);
      }
    }
  }
  if (name === OUTPUT && config.share_decoder_input_output_embed) {
    const differsAt = firstDifference(data, embed as Float32Array);
    if (differsAt >= 0) {
      fail(
        source,
        `tied model (share_decoder_input_output_embed) but ${JSON.stringify(OUTPUT)} differs from ` +
          `${JSON.stringify(EMBED)} at flat index ${differsAt}`,
      );
    }
    return embed as Float32Array;
  }
  return data;
}

/**
 * Validates in-memory tensors against the parameters `config` implies (planWeights, then
 * plannedValues for each) and returns them as a map name → values in state_dict order, always
 * including both buffers and the output projection.
 */
export function checkWeights(
  config: RetNetConfig,
  tensors: Map<string, TensorEntry>,
  source: string,
): Map<string, Float32Array> {
  const shapes = new Map([...tensors].map(([name, entry]) => [name, entry.shape]));
  const weights = new Map<string, Float32Array>();
  for (const weight of planWeights(config, shapes, source)) {
    weights.set(weight.name, plannedValues(config, weight, tensors.get(weight.storedAs ?? weight.name)?.data, weights.get(EMBED), source));
  }
  return weights;
}

function fillUniform(out: Float32Array, bound: number, rng: Rng): void {
  for (let i = 0; i < out.length; i++) out[i] = (2 * rng.nextFloat() - 1) * bound;
}

function fillNormal(out: Float32Array, std: number, rng: Rng): void {
  for (let i = 0; i < out.length; i++) out[i] = rng.nextNormal() * std;
}

/** PyTorch xavier_uniform_ bound for a [fan_out, fan_in] weight. */
function xavierBound(shape: number[], gain: number): number {
  const [fanOut, fanIn] = shape;
  return gain * Math.sqrt(6 / (fanIn + fanOut));
}

/**
 * torchscale's initialisation (spec §9), deterministic from `seed`. Tensors are drawn in
 * state_dict order from one Rng stream.
 *
 * The embedding is N(0, D^-1/2) like fairseq's Embedding, but without a zeroed padding row:
 * this runtime has no padding token (every id is a real token), so no row is special.
 */
export function initWeights(config: RetNetConfig, seed: number): Map<string, Float32Array> {
  return new Map(generateWeights(config, seed));
}

/** The most values any of `shapes` holds (0 for none); a loop, since a deep model has more tensors than a spread may pass. */
export function largestShape(shapes: Iterable<readonly number[]>): number {
  let largest = 0;
  for (const shape of shapes) largest = Math.max(largest, shape.reduce((a, b) => a * b, 1));
  return largest;
}

/** Values in the largest parameter of `config`: the size of a buffer every tensor fits in. */
export function largestParameter(config: RetNetConfig): number {
  return largestShape(parameterShapes(config).map(([, shape]) => shape));
}

/** One parameter of initWeights: its values, and how to draw [from, to) of them from the stream (absent: already set). */
interface InitStep {
  name: string;
  values: Float32Array;
  draw?: (from: number, to: number) => void;
}

/**
 * initWeights' parameters in state_dict order, each drawn by the consumer before it asks for the
 * next (one Rng stream: draws must happen in order, and a parameter's range may be split).
 */
function* initSteps(config: RetNetConfig, seed: number, scratch: Float32Array | undefined): Generator<InitStep> {
  const { D, L } = dims(config);
  const rng = new Rng(seed);
  const deepnormDivisor = Math.pow(8 * L, 1 / 4);
  const tied = config.share_decoder_input_output_embed;
  if (scratch && scratch.length < largestParameter(config)) throw new Error('generateWeights: scratch is smaller than the largest parameter');
  let embed: Float32Array | undefined;
  for (const [name, shape] of parameterShapes(config)) {
    if ((BUFFER_NAMES as readonly string[]).includes(name)) {
      yield { name, values: computedBuffer(config, name) };
      continue;
    }
    if (name === OUTPUT && tied) {
      yield { name, values: embed as Float32Array };
      continue;
    }
    const count = shape.reduce((a, b) => a * b, 1);
    const values = scratch && !(name === EMBED && tied) ? scratch.subarray(0, count) : new Float32Array(count);
    let fill: (out: Float32Array) => void;
    if (name === EMBED || name === OUTPUT) {
      fill = (out) => fillNormal(out, Math.pow(D, -0.5), rng);
    } else if (/\.(q_proj|k_proj|v_proj|g_proj)\.weight$/.test(name)) {
      fill = (out) => fillUniform(out, xavierBound(shape, Math.pow(2, -2.5)), rng);
    } else if (name.endsWith('.out_proj.weight')) {
      fill = (out) => fillUniform(out, xavierBound(shape, Math.pow(2, -1)), rng);
    } else if (/\.ffn\.(fc1|gate|fc2)\.weight$/.test(name)) {
      // nn.Linear's default kaiming_uniform_(a=√5) reduces to U(±1/√fan_in).
      fill = (out) => fillUniform(out, 1 / Math.sqrt(shape[1]), rng);
    } else if (/(^|\.)(layer_norm|layernorm_embedding|retention_layer_norm|final_layer_norm)\.weight$/.test(name)) {
      fill = (out) => out.fill(1);
    } else {
      throw new Error(`initWeights: no initialisation rule for parameter ${JSON.stringify(name)}`);
    }
    const deepnorm = config.deepnorm && /fc1|fc2|out_proj|v_proj/.test(name);
    const draw = (from: number, to: number): void => {
      const out = values.subarray(from, to);
      fill(out);
      if (deepnorm) for (let i = 0; i < out.length; i++) out[i] /= deepnormDivisor;
    };
    if (name === EMBED) embed = values;
    yield { name, values, draw };
  }
}

/**
 * initWeights one tensor at a time. With `scratch` (at least largestParameter(config) values),
 * tensors are generated into it (except the embedding of a tied model): each is valid only until
 * the next is generated, so a loader that copies each one never holds more than the largest.
 */
export function* generateWeights(config: RetNetConfig, seed: number, options: { scratch?: Float32Array } = {}): Generator<[string, Float32Array]> {
  for (const { name, values, draw } of initSteps(config, seed, options.scratch)) {
    draw?.(0, values.length);
    yield [name, values];
  }
}

/** Values drawn between two turns of the event loop (a few milliseconds of drawing). */
const DRAW_SLICE = 1 << 18;

/**
 * generateWeights (the same values) drawing each tensor a slice at a time with a turn of the
 * event loop between slices: a large embedding took most of a second on the JS thread.
 */
export async function* generateWeightsYielding(
  config: RetNetConfig,
  seed: number,
  options: { scratch?: Float32Array } = {},
): AsyncGenerator<[string, Float32Array]> {
  for (const { name, values, draw } of initSteps(config, seed, options.scratch)) {
    for (let from = 0; draw && from < values.length; from += DRAW_SLICE) {
      draw(from, Math.min(values.length, from + DRAW_SLICE));
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    yield [name, values];
  }
}
