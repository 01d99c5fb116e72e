// The counter-based uniform stream behind dropout and drop path, shared by the CPU and
// CUDA backends so both draw the same masks for the same (seed, counter).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define RETNET_HOST_DEVICE __host__ __device__
#else
#define RETNET_HOST_DEVICE
#endif

namespace retnet {

// splitmix64 finaliser: a counter-based uniform stream, independent of thread timing.
RETNET_HOST_DEVICE inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) for counter i of stream `seed`.
RETNET_HOST_DEVICE inline float uniform01(uint64_t seed, uint64_t i) {
  return static_cast<float>(mix64(seed + 0x9e3779b97f4a7c15ULL * (i + 1)) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace retnet
