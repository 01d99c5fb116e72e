import { addon } from './native';

/** How the native core was built and runs: thread count, GEMM kernel set, CUDA. */
export function buildInfo(): { threads: number; gemm: string; cuda: boolean } {
  return addon().buildInfo();
}
