import { NativeBuildInfo, addon } from './native';

/** How the native core was built and runs: thread count, GEMM kernel set, CUDA. */
export function buildInfo(): NativeBuildInfo {
  return addon().buildInfo();
}
