// Public entry point of the retnet package.
export { RetNet } from './model';
export type { ForwardMode, ForwardOptions, ModelOptions, CreateOptions, GenerateRequest } from './model';
export { Session } from './session';
export type { PrefillMode, PrefillOptions } from './session';
export type { RetNetConfig, Activation } from './config';
export { resolveConfig, parameterShapes, CONFIG_DEFAULTS } from './config';
export type { TokenBatch, TokenInput } from './tokens';
export { ByteTokenizer } from './tokenizer';
export type { Tokenizer, StreamDecoder } from './tokenizer';
export type { GenerateChunk, GenerateOptions } from './generate';
export type { SamplingOptions } from './sampling';
export { buildInfo } from './info';
export { Scheduler, SchedulerFullError } from './scheduler';
export type { SchedulerOptions, SchedulerStats, BatchingOptions, ScheduledGenerateOptions } from './scheduler';
export { PrefixCache } from './prefix_cache';
export type { PrefixCacheOptions, PrefixCacheStats, ForkableState } from './prefix_cache';
export { createServer } from './server';
export type { ServerOptions } from './server';
