// Loads the compiled addon and types its surface. Only lib/ talks to it.
import * as fs from 'fs';
import * as path from 'path';

export type NativeMode = 'parallel' | 'chunkwise' | 'recurrent';

export interface NativeState {
  positions(): number[];
  clone(): NativeState;
  exportState(): { kv: Float32Array; scale: Float32Array; positions: number[] };
  importState(kv: Float32Array, scale: Float32Array, positions: number[]): void;
  dispose(): void;
}

export interface NativeModel {
  forward(tokens: Int32Array, batch: number, length: number, mode: NativeMode, chunkSize: number): Promise<Float32Array>;
  createState(batch: number): NativeState;
  prefill(state: NativeState, tokens: Int32Array, length: number, mode: NativeMode, chunkSize: number): Promise<Float32Array>;
  step(state: NativeState, tokens: Int32Array): Promise<Float32Array>;
  getParam(name: string): Float32Array;
  paramNames(): string[];
  dispose(): void;
}

export interface NativeAddon {
  createModel(config: object, tensors: Record<string, Float32Array>): Promise<NativeModel>;
  buildInfo(): { threads: number; gemm: string; cuda: boolean };
}

let cached: NativeAddon | undefined;

/** Finds build/Release/retnet.node above this file (lib/ under ts-jest, dist/lib/ when compiled). */
export function addon(): NativeAddon {
  if (cached) return cached;
  let dir = __dirname;
  for (let i = 0; i < 4; i++) {
    const candidate = path.join(dir, 'build', 'Release', 'retnet.node');
    if (fs.existsSync(candidate)) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      cached = require(candidate) as NativeAddon;
      return cached;
    }
    dir = path.dirname(dir);
  }
  throw new Error('retnet native addon not found: run `npm install` (or `npm run build`) to compile it');
}
