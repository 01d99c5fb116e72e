// The CUDA backend's entry points (cuda/ops_cuda.cu). Declared without CUDA headers so the
// addon's C++ compiles with the host compiler alone.
#pragma once
#include <memory>
#include <string>

#include "ops.h"

namespace retnet {

// Number of usable CUDA devices; 0 with `reason` set to the runtime's message when none is.
int cuda_device_count(std::string* reason);

// The CUDA backend on `device`. Throws std::runtime_error("no CUDA device: ...") when it
// cannot be used.
std::unique_ptr<Ops> make_cuda_ops(int device);

// The GEMM a CUDA backend created now runs its full-sequence products on: "cublas (<library>)"
// or "own (<why not cuBLAS>)", or "error: ..." when RETNET_CUDA_GEMM asks for what cannot be had.
// Decode products always run the own batch-invariant kernel.
std::string cuda_gemm();

}  // namespace retnet
