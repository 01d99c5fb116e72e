// CPU feature selection and small SIMD helpers shared by the vector kernels.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RETNET_X86 1

#include <cstdlib>
#include <cstring>

namespace retnet {

// The vector instruction sets the kernels use, each including the ones before it.
enum class CpuIsa { Generic, Avx2, Avx512 };

// The best set this CPU has (AVX2 means AVX2 + FMA, AVX-512 means AVX-512F on top), capped
// by the environment variable RETNET_CPU_ISA ('avx512', 'avx2' or 'generic') when set, so
// the other kernels can be run and compared on one machine. Read once.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    CpuIsa best = CpuIsa::Generic;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      best = CpuIsa::Avx2;
      if (__builtin_cpu_supports("avx512f")) best = CpuIsa::Avx512;
    }
    const char* cap = std::getenv("RETNET_CPU_ISA");
    if (cap && std::strcmp(cap, "generic") == 0) return CpuIsa::Generic;
    if (cap && std::strcmp(cap, "avx2") == 0 && best > CpuIsa::Avx2) return CpuIsa::Avx2;
    return best;
  }();
  return isa;
}

inline bool cpu_has_avx2_fma() { return cpu_isa() >= CpuIsa::Avx2; }

// AVX512-BF16's dot product (with AVX512-BW's word shuffles), on top of the AVX-512 set.
inline bool cpu_has_avx512_bf16() {
  static const bool yes = cpu_isa() >= CpuIsa::Avx512 && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}

// AVX512-VNNI's 16-bit dot product (VPDPWSSD, with AVX512-BW's byte-to-word widening).
inline bool cpu_has_avx512_vnni() {
  static const bool yes = cpu_isa() >= CpuIsa::Avx512 && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

// e^x for 8 lanes (measured: at most 1.3 ulp from the correctly rounded value on a sweep of
// [-87, 88]): e^x = 2^n e^r with
// r = x - n ln2 in [-ln2/2, ln2/2] (ln2 split in two so r is exact) and e^r from a degree-6
// polynomial (Cephes expf's coefficients). Inputs are clamped so 2^n stays a normal float:
// below -87.3 the result is ~1e-38 rather than 0, which no caller distinguishes.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365447f)), _mm256_set1_ps(88.3762626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Sum of the 8 lanes, in a fixed order.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of the 16 lanes, in a fixed order: halves added pairwise down to one lane. (Each
// shuffle is the maskz form with every lane kept: GCC 12's plain forms and 256-bit casts
// leave lanes undefined and warn about it.)
__attribute__((target("avx512f"))) inline float hsum512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xFFFF, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// r[i][j] <- r[j][i] for an 8x8 block held in registers.
__attribute__((target("avx2,fma"))) inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

}  // namespace retnet
#endif
