// A tiny byte-level model and prompts shared by the generation, serving and cache tests.
import type { GenerateRequest, RetNet } from '../../lib';
import { mulberry32 } from '../reference/retnet_ref';

export const BYTE_MODEL_CONFIG = {
  vocab_size: 256,
  decoder_embed_dim: 32,
  decoder_value_embed_dim: 64,
  decoder_retention_heads: 2,
  decoder_ffn_embed_dim: 64,
  decoder_layers: 2,
  recurrent_chunk_size: 8,
};

export function randomPrompt(seed: number, length: number): number[] {
  const rand = mulberry32(seed);
  return Array.from({ length }, () => Math.floor(rand() * 256));
}

/** The token ids model.generate() yields for `prompt`. */
export async function tokensOf(model: RetNet, prompt: number[], options: GenerateRequest): Promise<number[]> {
  const tokens: number[] = [];
  for await (const chunk of model.generate(prompt, options)) tokens.push(chunk.token);
  return tokens;
}
