// RetNet configuration with torchscale's field names (RetNetConfig, spec §1).

export type Activation = 'gelu' | 'swish' | 'relu';

export interface RetNetConfig {
  vocab_size: number;
  decoder_embed_dim: number;
  decoder_value_embed_dim: number;
  decoder_retention_heads: number;
  decoder_ffn_embed_dim: number;
  decoder_layers: number;
  decoder_normalize_before: boolean;
  activation_fn: Activation;
  layernorm_embedding: boolean;
  share_decoder_input_output_embed: boolean;
  deepnorm: boolean;
  layernorm_eps: number;
  no_scale_embedding: boolean;
  recurrent_chunk_size: number;
  chunkwise_recurrent: boolean;
  dropout: number;
  activation_dropout: number;
  drop_path_rate: number;
  no_output_layer: boolean;
  /** Fields torchscale has that do not change RetNet math are kept so a saved config round-trips. */
  [other: string]: unknown;
}

/** torchscale RetNetConfig defaults (vocab_size has none: torchscale's -1 means "unset"). */
export const CONFIG_DEFAULTS: Omit<RetNetConfig, 'vocab_size'> = {
  decoder_embed_dim: 768,
  decoder_value_embed_dim: 1280,
  decoder_retention_heads: 3,
  decoder_ffn_embed_dim: 1280,
  decoder_layers: 12,
  decoder_normalize_before: true,
  activation_fn: 'gelu',
  layernorm_embedding: false,
  share_decoder_input_output_embed: false,
  deepnorm: false,
  layernorm_eps: 1e-6,
  no_scale_embedding: true,
  recurrent_chunk_size: 512,
  chunkwise_recurrent: false,
  dropout: 0,
  activation_dropout: 0,
  drop_path_rate: 0,
  no_output_layer: false,
};

const INTEGER_FIELDS = [
  'vocab_size',
  'decoder_embed_dim',
  'decoder_value_embed_dim',
  'decoder_retention_heads',
  'decoder_ffn_embed_dim',
  'decoder_layers',
  'recurrent_chunk_size',
] as const;
const BOOLEAN_FIELDS = [
  'decoder_normalize_before',
  'layernorm_embedding',
  'share_decoder_input_output_embed',
  'deepnorm',
  'no_scale_embedding',
  'chunkwise_recurrent',
  'no_output_layer',
] as const;
const PROBABILITY_FIELDS = ['dropout', 'activation_dropout', 'drop_path_rate'] as const;

/** Upper bound on any one dimension: keeps a hostile config from asking for absurd allocations. */
const MAX_DIM = 1 << 20;
/**
 * Upper bound on decoder_layers, far past the RetNet paper's models (32 layers at most): each
 * layer is ten tensors of bookkeeping before a weight is read, and a 545-byte config.json
 * asking for 2^20 layers took 33 s and 2.7 GB to be told its file lacked them.
 */
const MAX_LAYERS = 4096;

function configError(message: string): Error {
  return new Error(`invalid RetNet config: ${message}`);
}

/**
 * Fills torchscale defaults and validates. Throws an Error naming the offending field.
 * Fields that torchscale has but that do not affect the math are kept as given.
 */
export function resolveConfig(input: unknown): RetNetConfig {
  if (input === null || typeof input !== 'object' || Array.isArray(input)) {
    throw configError('expected an object');
  }
  const raw = input as Record<string, unknown>;
  const config = { ...CONFIG_DEFAULTS, ...raw } as RetNetConfig;
  if (raw.vocab_size === undefined) throw configError('vocab_size is required');
  for (const field of INTEGER_FIELDS) {
    const value = config[field];
    const max = field === 'decoder_layers' ? MAX_LAYERS : MAX_DIM;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
      throw configError(`${field} must be an integer in [1, ${max}], got ${JSON.stringify(value)}`);
    }
  }
  for (const field of BOOLEAN_FIELDS) {
    if (typeof config[field] !== 'boolean') {
      throw configError(`${field} must be a boolean, got ${JSON.stringify(config[field])}`);
    }
  }
  for (const field of PROBABILITY_FIELDS) {
    const value = config[field];
    if (typeof value !== 'number' || !(value >= 0 && value < 1)) {
      throw configError(`${field} must be a number in [0, 1), got ${JSON.stringify(value)}`);
    }
  }
  if (!['gelu', 'swish', 'relu'].includes(config.activation_fn as string)) {
    throw configError(`activation_fn must be "gelu", "swish" or "relu", got ${JSON.stringify(config.activation_fn)}`);
  }
  const eps = config.layernorm_eps;
  // ε = 0 is torchscale's too (spec §10: the three forms then agree); a norm of an all-zero
  // vector is then 0/0, as there.
  // The core holds it as a float32: past 3.4028235e38 it would be Infinity, and every logit 0.
  if (typeof eps !== 'number' || !(eps >= 0) || !Number.isFinite(Math.fround(eps))) {
    throw configError(`layernorm_eps must be a number >= 0 that float32 holds (at most 3.4028235e38), got ${JSON.stringify(eps)}`);
  }
  const D = config.decoder_embed_dim;
  const Dv = config.decoder_value_embed_dim;
  const H = config.decoder_retention_heads;
  if (D % H !== 0) throw configError(`decoder_embed_dim (${D}) must be divisible by decoder_retention_heads (${H})`);
  if (Dv % H !== 0) {
    throw configError(`decoder_value_embed_dim (${Dv}) must be divisible by decoder_retention_heads (${H})`);
  }
  if ((D / H) % 2 !== 0) {
    throw configError(`key dim decoder_embed_dim / decoder_retention_heads = ${D / H} must be even (rotation pairs)`);
  }
  if (config.multiway !== undefined && config.multiway !== false) {
    throw configError(`multiway must be false (multiway=True is not supported), got ${JSON.stringify(config.multiway)}`);
  }
  if (config.moe_freq !== undefined && config.moe_freq !== 0) {
    throw configError(`moe_freq must be 0 (MoE layers are not supported), got ${JSON.stringify(config.moe_freq)}`);
  }
  if (config.no_output_layer) throw configError('no_output_layer=True is not supported (the runtime needs logits)');
  for (const [name, shape] of parameterShapes(config)) {
    const values = shape.reduce((a, b) => a * b, 1);
    if (values > MAX_TENSOR_VALUES) {
      throw configError(`${name} would hold ${shape.join(' x ')} = ${values} values, more than one tensor can here (2^32)`);
    }
  }
  return config;
}

/** The most values one tensor may hold: weights pass through JS typed arrays on load and save. */
const MAX_TENSOR_VALUES = 2 ** 32;

/** Derived sizes used everywhere (spec notation). */
export interface Dims {
  V: number;
  D: number;
  Dv: number;
  H: number;
  dk: number;
  dv: number;
  F: number;
  L: number;
}

export function dims(config: RetNetConfig): Dims {
  const H = config.decoder_retention_heads;
  return {
    V: config.vocab_size,
    D: config.decoder_embed_dim,
    Dv: config.decoder_value_embed_dim,
    H,
    dk: config.decoder_embed_dim / H,
    dv: config.decoder_value_embed_dim / H,
    F: config.decoder_ffn_embed_dim,
    L: config.decoder_layers,
  };
}

/** The `state_dict` entries of a model with this config, in torchscale's order (spec §2). */
export function parameterShapes(config: RetNetConfig): Array<[string, number[]]> {
  const { V, D, Dv, H, dk, F, L } = dims(config);
  const shapes: Array<[string, number[]]> = [
    ['embed_tokens.weight', [V, D]],
    ['output_projection.weight', [V, D]],
  ];
  if (config.layernorm_embedding) shapes.push(['layernorm_embedding.weight', [D]]);
  for (let l = 0; l < L; l++) {
    const p = `layers.${l}.`;
    shapes.push(
      [`${p}retention.q_proj.weight`, [D, D]],
      [`${p}retention.k_proj.weight`, [D, D]],
      [`${p}retention.v_proj.weight`, [Dv, D]],
      [`${p}retention.g_proj.weight`, [Dv, D]],
      [`${p}retention.out_proj.weight`, [D, Dv]],
      [`${p}retention_layer_norm.weight`, [D]],
      [`${p}ffn.fc1.weight`, [F, D]],
      [`${p}ffn.fc2.weight`, [D, F]],
      [`${p}ffn.gate.weight`, [F, D]],
      [`${p}final_layer_norm.weight`, [D]],
    );
  }
  if (config.decoder_normalize_before) shapes.push(['layer_norm.weight', [D]]);
  shapes.push(['retnet_rel_pos.angle', [dk]], ['retnet_rel_pos.decay', [H]]);
  return shapes;
}

/** Names of the buffers (not trained, but saved). */
export const BUFFER_NAMES = ['retnet_rel_pos.angle', 'retnet_rel_pos.decay'] as const;

/** torchscale's decay buffer: fl32(ln(fl32(1 - 2^(-5-h)))) (spec §3.1). */
export function decayBuffer(H: number): Float32Array {
  const out = new Float32Array(H);
  for (let h = 0; h < H; h++) out[h] = Math.log(Math.fround(1 - Math.pow(2, -5 - h)));
  return out;
}

/**
 * torchscale's angle buffer: θ_j = 1/10000^(e_j) repeated twice, e = float32 linspace(0, 1, P)
 * (spec §3.2). torch's linspace steps from the start for the first half and back from the
 * end for the second; following it bit for bit reproduces checkpoint buffers exactly.
 */
export function angleBuffer(dk: number): Float32Array {
  const P = dk / 2;
  const out = new Float32Array(dk);
  const step = P === 1 ? 0 : Math.fround(1 / (P - 1));
  for (let j = 0; j < P; j++) {
    const e =
      P === 1 ? 0 : j < Math.floor(P / 2) ? Math.fround(step * j) : Math.fround(1 - Math.fround(step * (P - 1 - j)));
    const theta = Math.fround(1 / Math.fround(Math.pow(10000, e)));
    out[2 * j] = theta;
    out[2 * j + 1] = theta;
  }
  return out;
}

/** Number of trainable parameters (the tied output projection counts once; buffers don't count). */
export function countParameters(config: RetNetConfig): number {
  let n = 0;
  for (const [name, shape] of parameterShapes(config)) {
    if ((BUFFER_NAMES as readonly string[]).includes(name)) continue;
    if (name === 'output_projection.weight' && config.share_decoder_input_output_embed) continue;
    n += shape.reduce((a, b) => a * b, 1);
  }
  return n;
}
