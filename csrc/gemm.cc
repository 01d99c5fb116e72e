#include "gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "panels.h"
#include "quant.h"
#include "threadpool.h"

#include "simd.h"

namespace retnet {
namespace {

// Blocking shared by every kernel set; each set has its own register tile and K/M blocks
// (struct Kernels below).
constexpr int NC = 3072;
static_assert(NC % kPanelWidth == 0, "a weight panel is never split across NC blocks");
constexpr int kMaxMR = 12, kMaxNR = 32;
constexpr int kKC = 384, kMC = 72;        // K and M blocks of the generic and AVX2 sets
constexpr int kKC512 = 256, kMC512 = 96;  // and of the AVX-512 set
constexpr int kMaxPackA = std::max(kMC * kKC, kMC512 * kKC512);

constexpr int kPrefetchAhead = 32;  // B panel k steps the micro-kernels prefetch ahead

using MicroKernel = void (*)(int kc, const float* a, const float* b, float* c, ptrdiff_t ldc, bool accumulate);

// The generic and AVX2 register tile, and the AVX-512 one (twice as wide, twice as tall:
// 24 of the 32 vector registers accumulate).
constexpr int kMR = 6, kNR = 16;
constexpr int kMR512 = 12, kNR512 = 32;
static_assert(kPanelWidth % kNR == 0 && kPanelWidth % kNR512 == 0, "a weight panel packs whole NR-column blocks");

// c[MR, NR] (=|+=) sum_k a[k*MR + i] * b[k*NR + j]
void micro_generic(int kc, const float* a, const float* b, float* c, ptrdiff_t ldc, bool accumulate) {
  float acc[kMR][kNR] = {};
  for (int k = 0; k < kc; k++) {
    for (int i = 0; i < kMR; i++) {
      const float ai = a[k * kMR + i];
      for (int j = 0; j < kNR; j++) acc[i][j] += ai * b[k * kNR + j];
    }
  }
  for (int i = 0; i < kMR; i++)
    for (int j = 0; j < kNR; j++) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

// Dot products of a few rows of X against rows n0..n1 of W (which has n_rows), both
// K-contiguous: the decode path, which streams every weight row once per call whatever the batch.
void dots_generic(int M, int n0, int n1, int n_rows, int K, const float* X, ptrdiff_t ldx, const float* W, ptrdiff_t ldw,
                  float* C, ptrdiff_t ldc, bool accumulate) {
  for (int j = n0; j < n1; j++) {
    const float* w = W + j * ldw;
    for (int i = 0; i < M; i++) {
      const float* x = X + i * ldx;
      float s = 0;
      for (int k = 0; k < K; k++) s += x[k] * w[k];
      float& out = C[i * ldc + j];
      out = accumulate ? out + s : s;
    }
  }
}

#ifdef RETNET_X86
__attribute__((target("avx2,fma"))) void micro_avx2(int kc, const float* a, const float* b, float* c, ptrdiff_t ldc,
                                                    bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  // The C tile is written at the end: start fetching it now.
  for (int i = 0; i < kMR; i++) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
  for (int k = 0; k < kc; k++) {
    // One k step reads one 64-byte line of the B panel, which comes from L2/L3 on the
    // panel's first use: ask for it well ahead of the hardware prefetcher.
    _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetchAhead) * kNR), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(b + k * kNR);
    const __m256 b1 = _mm256_loadu_ps(b + k * kNR + 8);
    const float* ak = a + k * kMR;
    __m256 ai = _mm256_broadcast_ss(ak + 0);
    c00 = _mm256_fmadd_ps(ai, b0, c00);
    c01 = _mm256_fmadd_ps(ai, b1, c01);
    ai = _mm256_broadcast_ss(ak + 1);
    c10 = _mm256_fmadd_ps(ai, b0, c10);
    c11 = _mm256_fmadd_ps(ai, b1, c11);
    ai = _mm256_broadcast_ss(ak + 2);
    c20 = _mm256_fmadd_ps(ai, b0, c20);
    c21 = _mm256_fmadd_ps(ai, b1, c21);
    ai = _mm256_broadcast_ss(ak + 3);
    c30 = _mm256_fmadd_ps(ai, b0, c30);
    c31 = _mm256_fmadd_ps(ai, b1, c31);
    ai = _mm256_broadcast_ss(ak + 4);
    c40 = _mm256_fmadd_ps(ai, b0, c40);
    c41 = _mm256_fmadd_ps(ai, b1, c41);
    ai = _mm256_broadcast_ss(ak + 5);
    c50 = _mm256_fmadd_ps(ai, b0, c50);
    c51 = _mm256_fmadd_ps(ai, b1, c51);
  }
  __m256 rows[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < kMR; i++) {
    float* ci = c + i * ldc;
    if (accumulate) {
      rows[i][0] = _mm256_add_ps(rows[i][0], _mm256_loadu_ps(ci));
      rows[i][1] = _mm256_add_ps(rows[i][1], _mm256_loadu_ps(ci + 8));
    }
    _mm256_storeu_ps(ci, rows[i][0]);
    _mm256_storeu_ps(ci + 8, rows[i][1]);
  }
}

// The decode dots of the AVX2 set: 8-lane accumulators, blocks of 3 activation rows.
#define DOTS_TARGET "avx2,fma"
#define DOTS_ISA avx2
#define DOTS_VEC __m256
#define DOTS_LANES 8
#define DOTS_XR 3
#define DOTS_ZERO() _mm256_setzero_ps()
#define DOTS_LOAD(p) _mm256_loadu_ps(p)
#define DOTS_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define DOTS_HSUM(v) hsum256(v)
#include "dots_kernel.inc"

// Writes (or adds) an AVX-512 tile of accumulators to C.
__attribute__((target("avx512f"))) inline void store_tile_avx512(__m512 (&acc)[kMR512][2], float* c, ptrdiff_t ldc,
                                                                  bool accumulate) {
#pragma GCC unroll 12
  for (int i = 0; i < kMR512; i++) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(ci));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(ci + 16));
    }
    _mm512_storeu_ps(ci, acc[i][0]);
    _mm512_storeu_ps(ci + 16, acc[i][1]);
  }
}

// The AVX-512 tile: 12 rows x 32 columns, two 16-lane vectors per row.
__attribute__((target("avx512f"))) void micro_avx512(int kc, const float* a, const float* b, float* c, ptrdiff_t ldc,
                                                      bool accumulate) {
  __m512 acc[kMR512][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMR512; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int i = 0; i < kMR512; i++) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
  for (int k = 0; k < kc; k++) {
    // One k step reads two 64-byte lines of the B panel.
    const float* ahead = b + (k + kPrefetchAhead) * kNR512;
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(b + k * kNR512);
    const __m512 b1 = _mm512_loadu_ps(b + k * kNR512 + 16);
    const float* ak = a + k * kMR512;
#pragma GCC unroll 12
    for (int i = 0; i < kMR512; i++) {
      const __m512 ai = _mm512_set1_ps(ak[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  store_tile_avx512(acc, c, ldc, accumulate);
}

// The decode dots of the AVX-512 set: 16-lane accumulators, blocks of 6 activation rows
// (the same order over K for every output, so batch-invariant too; the rounding differs
// from the AVX2 set's).
#define DOTS_TARGET "avx512f"
#define DOTS_ISA avx512
#define DOTS_VEC __m512
#define DOTS_LANES 16
#define DOTS_XR 6
#define DOTS_ZERO() _mm512_setzero_ps()
#define DOTS_LOAD(p) _mm512_loadu_ps(p)
#define DOTS_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define DOTS_HSUM(v) hsum512(v)
#include "dots_kernel.inc"
#endif

#ifdef RETNET_X86
// One full MR-row panel of a k-contiguous A, 8 columns at a time: 8x8 transposes of the
// rows in groups of 8 (the last group zero-padded) and 8-wide stores, each overwriting the
// previous one's spare lanes. The last store runs up to 4 floats past the panel; pack_a's
// caller leaves room. Returns how many columns it packed (a multiple of 8).
template <int MR>
__attribute__((target("avx2,fma"))) int pack_a_panel_avx2(const float* a, ptrdiff_t lda, int kc, float* dst) {
  static_assert(MR == 6 || MR == 12, "rows in groups of 8 with at most 4 spare");
  constexpr int groups = (MR + 7) / 8;
  int k = 0;
  for (; k + 8 <= kc; k += 8) {
    __m256 r[groups][8];
    for (int g = 0; g < groups; g++) {
      for (int i = 0; i < 8; i++) r[g][i] = g * 8 + i < MR ? _mm256_loadu_ps(a + (g * 8 + i) * lda + k) : _mm256_setzero_ps();
      transpose8(r[g]);
    }
    for (int t = 0; t < 8; t++)
      for (int g = 0; g < groups; g++) _mm256_storeu_ps(dst + (k + t) * MR + g * 8, r[g][t]);
  }
  return k;
}

// One full NR-column panel of a k-contiguous B (a transposed weight: column j is row j of
// the weight, `ldb` apart), 8 k at a time as 8x8 transposes. Returns the k it packed.
template <int NR>
__attribute__((target("avx2,fma"))) int pack_b_panel_avx2(const float* b, ptrdiff_t ldb, int kc, float* dst) {
  int k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int part = 0; part < NR / 8; part++) {
      __m256 r[8];
      for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(b + (part * 8 + j) * ldb + k);
      transpose8(r);
      for (int t = 0; t < 8; t++) _mm256_storeu_ps(dst + (k + t) * NR + part * 8, r[t]);
    }
  }
  return k;
}
#endif

// Floats pack_a may write past MC * KC (see pack_a_panel_avx2).
constexpr int kPackSlack = 8;

// Packs A[m0:m0+mc, k0:k0+kc] as MR-row panels, k-major inside a panel, zero-padded.
template <int MR>
void pack_a(const MatView& A, int m0, int mc, int k0, int kc, float* out) {
  // A transposed (rows contiguous) copies a panel's k-th column as adjacent floats: 8 for a
  // 6-row panel where the block has the 2 extra rows to read (the next copy overwrites them).
  constexpr int copy = MR < 8 ? 8 : MR;
  for (int ip = 0; ip < mc; ip += MR) {
    const int rows = std::min(MR, mc - ip);
    int k = 0;
#ifdef RETNET_X86
    if (rows == MR && A.cs == 1 && cpu_has_avx2_fma())
      k = pack_a_panel_avx2<MR>(A.p + k0 + (m0 + ip) * A.rs, A.rs, kc, out + ip * kc);
#endif
    if (A.rs == 1 && ip + copy <= mc) {
      for (; k < kc; k++) std::memcpy(out + ip * kc + k * MR, A.p + (k0 + k) * A.cs + m0 + ip, copy * sizeof(float));
    }
    for (; k < kc; k++) {
      float* dst = out + ip * kc + k * MR;
      const float* src = A.p + (k0 + k) * A.cs + (m0 + ip) * A.rs;
      int i = 0;
      for (; i < rows; i++) dst[i] = src[i * A.rs];
      for (; i < MR; i++) dst[i] = 0.f;
    }
  }
}

// Packs B[k0:k0+kc, n0:n0+nc] as NR-column panels, k-major inside a panel, zero-padded.
template <int NR>
void pack_b_panel(const MatView& B, int n0, int nc, int k0, int kc, float* out) {
  const int cols = std::min(NR, nc);
  if (B.cs == 1) {
    for (int k = 0; k < kc; k++) {
      const float* src = B.p + (k0 + k) * B.rs + n0;
      float* dst = out + k * NR;
      if (cols == NR) {
        std::memcpy(dst, src, NR * sizeof(float));  // a fixed size: inlined, not a libc call per row
      } else {
        std::memcpy(dst, src, cols * sizeof(float));
        for (int j = cols; j < NR; j++) dst[j] = 0.f;
      }
    }
    return;
  }
  // Column-strided source (a transposed weight): write the panel in order while reading the
  // NR source rows side by side, each of them sequentially.
  int k = 0;
#ifdef RETNET_X86
  if (cols == NR && B.rs == 1 && cpu_has_avx2_fma()) k = pack_b_panel_avx2<NR>(B.p + n0 * B.cs + k0, B.cs, kc, out);
#endif
  const float* src[NR];
  for (int j = 0; j < cols; j++) src[j] = B.p + (n0 + j) * B.cs + k0 * B.rs;
  for (; k < kc; k++) {
    float* dst = out + k * NR;
    int j = 0;
    for (; j < cols; j++) dst[j] = src[j][k * B.rs];
    for (; j < NR; j++) dst[j] = 0.f;
  }
}

// bf16 products (Precision::BF16): A and B rounded to bf16, their products summed in fp32.
// Each packed panel is converted in place once packed. With AVX512-BF16 it becomes pairs of
// bf16 along k, one 32-bit lane per row or column as VDPBF16PS reads them, and the bf16
// micro-kernel runs (two products per lane and instruction). Elsewhere its values are
// rounded to bf16 and the fp32 micro-kernel runs: the same numbers up to summation order.
void round_bf16_in_place(float* p, int n) {
  for (int i = 0; i < n; i++) p[i] = from_bf16(to_bf16(p[i]));
}

#ifdef RETNET_X86
// A panel [kc][W] of fp32 -> [ceil(kc / 2)][W] 32-bit lanes holding bf16(row 2p) in the low
// half and bf16(row 2p + 1) (0 past kc) in the high half. In place: pair p is written over
// rows already read.
template <int W>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pair_bf16_avx512(float* panel, int kc) {
  static_assert(W == 12 || W == 32, "a 12-row A panel or a 32-column B panel");
  constexpr int vecs = (W + 15) / 16;
  constexpr __mmask16 last = W % 16 == 0 ? 0xFFFF : (1u << (W % 16)) - 1;
  // Interleaves the low 16 bf16 (row 2p) with the high 16 (row 2p + 1).
  alignas(64) static constexpr int16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(order);
  for (int p = 0; p < (kc + 1) / 2; p++) {
    __m512i pairs[vecs];
    for (int v = 0; v < vecs; v++) {
      const __mmask16 m = v + 1 == vecs ? last : 0xFFFF;
      const __m512 lo = _mm512_maskz_loadu_ps(m, panel + 2 * p * W + v * 16);
      const __m512 hi = 2 * p + 1 < kc ? _mm512_maskz_loadu_ps(m, panel + (2 * p + 1) * W + v * 16) : _mm512_setzero_ps();
      pairs[v] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (int v = 0; v < vecs; v++)
      _mm512_mask_storeu_epi32(panel + p * W + v * 16, v + 1 == vecs ? last : 0xFFFF, pairs[v]);
  }
}

// micro_avx512 on paired panels: kp pairs of k; a holds 12 lanes and b 32 lanes per pair.
__attribute__((target("avx512f,avx512bf16"))) void micro_bf16_avx512(int kp, const float* a, const float* b, float* c,
                                                                     ptrdiff_t ldc, bool accumulate) {
  __m512 acc[kMR512][2];
#pragma GCC unroll 12
  for (int i = 0; i < kMR512; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int i = 0; i < kMR512; i++) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
  for (int p = 0; p < kp; p++) {
    const float* ahead = b + (p + kPrefetchAhead) * kNR512;
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * kNR512);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * kNR512 + 16);
    const float* ap = a + p * kMR512;
#pragma GCC unroll 12
    for (int i = 0; i < kMR512; i++) {
      int32_t pair;
      std::memcpy(&pair, ap + i, 4);
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
    }
  }
  store_tile_avx512(acc, c, ldc, accumulate);
}
#endif

// A kernel set: the micro-kernel with its tile (MR x NR) and cache blocks (K blocks of at
// most KC, MC rows of A per packed block), and the decode dot products.
struct Kernels {
  MicroKernel micro;
  // bf16 products on paired panels, with the pairing of a packed A and B panel; null where
  // the CPU has no bf16 dot product (the panels are rounded instead).
  MicroKernel micro_bf16;
  void (*pair_a)(float* panel, int kc);
  void (*pair_b)(float* panel, int kc);
  void (*pack_a)(const MatView& A, int m0, int mc, int k0, int kc, float* out);
  void (*pack_b)(const MatView& B, int n0, int nc, int k0, int kc, float* out);
  decltype(&dots_generic) dots;
  const char* name;
  int mr, nr, kc, mc;
};

Kernels select_kernels() {
#ifdef RETNET_X86
  // A 96 x 256 A block and 256 x 32 B panels: a panel (32 KiB) stays in L1 across the
  // block's eight tiles.
  if (cpu_isa() >= CpuIsa::Avx512) {
    if (cpu_has_avx512_bf16())
      return {micro_avx512, micro_bf16_avx512, pair_bf16_avx512<kMR512>, pair_bf16_avx512<kNR512>, pack_a<kMR512>,
              pack_b_panel<kNR512>, dots_avx512, "avx512", kMR512, kNR512, kKC512, kMC512};
    return {micro_avx512, nullptr, nullptr, nullptr, pack_a<kMR512>, pack_b_panel<kNR512>, dots_avx512, "avx512",
            kMR512, kNR512, kKC512, kMC512};
  }
  if (cpu_isa() >= CpuIsa::Avx2)
    return {micro_avx2, nullptr, nullptr, nullptr, pack_a<kMR>, pack_b_panel<kNR>, dots_avx2, "avx2-fma", kMR, kNR, kKC, kMC};
#endif
  return {micro_generic, nullptr, nullptr, nullptr, pack_a<kMR>, pack_b_panel<kNR>, dots_generic, "generic", kMR, kNR, kKC, kMC};
}

const Kernels& kernels() {
  static const Kernels k = select_kernels();
  return k;
}

// The K block the packed path steps by for a depth K and a kernel set's largest block KC:
// equal blocks (with KC 384: 512 -> 2 x 256, 1024 -> 3 x 344) rather than full ones and a
// short tail. gemm_small_rows takes the same blocks, so its sums are the packed path's.
int k_block_step(int K, int KC) {
  const int kblocks = (K + KC - 1) / KC;
  return ((K + kblocks - 1) / kblocks + 7) / 8 * 8;
}

#ifdef RETNET_X86
// NB outputs (K-contiguous weight rows w, w + ldw, ...) for 16·G activation rows over one K
// block: `at` holds the rows transposed ([kc][16·G], zero past the real rows), so each weight
// element is broadcast once against every row. Each output is the sum micro_avx512 makes:
// FMAs in k order from zero.
template <int G, int NB>
__attribute__((target("avx512f"))) void small_rows_block_avx512(int kc, const float* at, const float* w,
                                                                 ptrdiff_t ldw, float* out) {
  __m512 acc[NB][G];
#pragma GCC unroll 8
  for (int r = 0; r < NB; r++)
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) acc[r][g] = _mm512_setzero_ps();
  for (int k = 0; k < kc; k++) {
    // Four lines ahead in each row (into its next K block: a block's K blocks run in turn).
    if (k % 16 == 0)
#pragma GCC unroll 8
      for (int r = 0; r < NB; r++) _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + k + 64), _MM_HINT_T0);
    __m512 a[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) a[g] = _mm512_loadu_ps(at + (static_cast<size_t>(k) * G + g) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < NB; r++) {
      const __m512 b = _mm512_set1_ps(w[r * ldw + k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; g++) acc[r][g] = _mm512_fmadd_ps(a[g], b, acc[r][g]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NB; r++)
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) _mm512_store_ps(out + (r * G + g) * 16, acc[r][g]);
}

// Every output of C[M, N] in blocks of NB, 16·G rows: see gemm_small_rows. A block's K blocks
// add up in a transposed tile, kept in ct ([N][16·G], C transposed): C's column of a block is
// M floats ldc apart, and with ldc = 4 KiB they all fall in one L1 set (a read-modify-write per
// K block there ran at a quarter of the speed); even written once per block, those scattered
// stores took 14 % of a medium 64-token prefill. The caller moves ct into C.
template <int G, int NB>
__attribute__((target("avx512f"))) void small_rows_avx512(int N, int K, int kc_step, const float* at, const float* W,
                                                           ptrdiff_t ldw, float* ct, bool accumulate) {
  constexpr int lanes = 16 * G;
  const size_t blocks = (N + NB - 1) / NB;
  parallel_for(blocks, 1, [&](size_t b0, size_t b1) {
    alignas(64) float out[NB * lanes];
    for (size_t blk = b0; blk < b1; blk++) {
      const int n0 = static_cast<int>(blk) * NB, cols = std::min(NB, N - n0);
      float* const tile = ct + static_cast<size_t>(n0) * lanes;
      for (int k0 = 0; k0 < K; k0 += kc_step) {
        const int kc = std::min(kc_step, K - k0);
        const float* atk = at + static_cast<size_t>(k0) * lanes;
        const float* wk = W + n0 * ldw + k0;
        if (cols == NB) {
          small_rows_block_avx512<G, NB>(kc, atk, wk, ldw, out);
        } else {
          for (int r = 0; r < cols; r++) small_rows_block_avx512<G, 1>(kc, atk, wk + r * ldw, ldw, out + r * lanes);
        }
        // The packed path's order: C = block (the first, unless accumulating), else block + C.
        const bool add = accumulate || k0 > 0;
        for (int e = 0; e < cols * lanes; e++) tile[e] = add ? out[e] + tile[e] : out[e];
      }
    }
  });
}

// C[i, n] <-> ct[n * lanes + i] for i < M, n < N (to_c: ct into C, else C into ct), in bands
// of columns so each side's lines stay in L1.
void transpose_small_rows(int M, int N, int lanes, float* C, ptrdiff_t ldc, float* ct, bool to_c) {
  constexpr int kBand = 64;
  parallel_for((N + kBand - 1) / kBand, 1, [&](size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; b++) {
      const int n0 = static_cast<int>(b) * kBand, n1 = std::min(N, n0 + kBand);
      for (int i = 0; i < M; i++) {
        float* row = C + i * ldc;
        if (to_c) {
          for (int n = n0; n < n1; n++) row[n] = ct[static_cast<size_t>(n) * lanes + i];
        } else {
          for (int n = n0; n < n1; n++) ct[static_cast<size_t>(n) * lanes + i] = row[n];
        }
      }
    }
  });
}

// C[M, N] (=|+=) A B for kGemmDotsMaxRows < M <= kSmallRowsMax rows of A (K-contiguous) and a
// K-contiguous B (a weight): the packed path's K blocks and per-output sums, bit for bit, but
// streaming the weight once instead of packing it (the rows go in 1 to 4 groups of 16 lanes).
// For a prompt of a few dozen tokens the packing cost as much as the products.
constexpr int kSmallRowsMax = 64;
bool gemm_small_rows(int M, int N, int K, MatView A, MatView B, float* C, ptrdiff_t ldc, bool accumulate) {
  const Kernels& kern = kernels();
  if (kern.micro != micro_avx512 || M > kSmallRowsMax) return false;
  const int G = (M + 15) / 16, lanes = 16 * G;
  // A transposed into [K][lanes]; per thread, as bpack is (the lambdas must use `at`).
  thread_local std::vector<float> atpack;
  atpack.assign(static_cast<size_t>(K) * lanes, 0.f);
  float* const at = atpack.data();
  for (int i = 0; i < M; i++)
    for (int k = 0; k < K; k++) at[static_cast<size_t>(k) * lanes + i] = A.p[i * A.rs + k];
  const int kc_step = k_block_step(K, kern.kc);  // the packed path's K blocks
  thread_local std::vector<float> ctpack;
  ctpack.resize(static_cast<size_t>(N) * lanes);
  float* const ct = ctpack.data();
  if (accumulate) transpose_small_rows(M, N, lanes, C, ldc, ct, false);
  switch (G) {
    case 1: small_rows_avx512<1, 8>(N, K, kc_step, at, B.p, B.cs, ct, accumulate); break;
    case 2: small_rows_avx512<2, 8>(N, K, kc_step, at, B.p, B.cs, ct, accumulate); break;
    case 3: small_rows_avx512<3, 8>(N, K, kc_step, at, B.p, B.cs, ct, accumulate); break;
    default: small_rows_avx512<4, 6>(N, K, kc_step, at, B.p, B.cs, ct, accumulate); break;
  }
  transpose_small_rows(M, N, lanes, C, ldc, ct, true);
  return true;
}
#else
bool gemm_small_rows(int, int, int, MatView, MatView, float*, ptrdiff_t, bool) { return false; }
#endif

void gemm_dots(int M, int N, int K, MatView A, MatView B, float* C, ptrdiff_t ldc, bool accumulate) {
  const Kernels& kern = kernels();
  const size_t blocks = (N + 63) / 64;
  parallel_for(blocks, 1, [&](size_t b0, size_t b1) {
    const int n0 = static_cast<int>(b0 * 64), n1 = std::min(N, static_cast<int>(b1 * 64));
    kern.dots(M, n0, n1, N, K, A.p, A.rs, B.p, B.cs, C, ldc, accumulate);
  });
}

// A packed A panel (`rows` of its MR rows, kc columns, k-major) rounded to the rows'
// activation grids (quant.h). A non-finite row's step is NaN and its values become NaN, so
// its outputs are NaN, as the decode products give.
void round_panel_to_grid(float* panel, int kc, int MR, int rows, const float* steps) {
  float inverse[kMaxMR];
  for (int r = 0; r < rows; r++) inverse[r] = 1.0f / steps[r];
  for (int k = 0; k < kc; k++) {
    float* p = panel + k * MR;
    for (int r = 0; r < rows; r++) p[r] = activation_level(p[r], inverse[r]) * steps[r];
  }
}

// Where gemm_packed writes C: tile(i, j, ld) gives element (i, j)'s address and the distance
// between rows there, for the top-left corner of a register tile (whose NR columns never cross
// a weight panel).
struct RowMajorC {
  float* C;
  ptrdiff_t ldc;
  float* tile(int i, int j, ptrdiff_t& ld) const {
    ld = ldc;
    return C + i * ldc + j;
  }
};
// C [K, N] is the transpose of a panel matrix [N, K] (panels.h): column j is its output row j,
// in panel j / 64, whose lines (C's rows) are the panel's width apart.
struct PanelsTransposedC {
  float* P;
  int N, K;
  float* tile(int i, int j, ptrdiff_t& ld) const {
    const int p = j / kPanelWidth;
    ld = panel_width(N, p);
    return P + panel_offset(K, p) + i * ld + (j - p * kPanelWidth);
  }
};

// The packed path: B in NC-column, kc-row blocks packed into NR-column panels by
// `pack_panel(n0, nc, k0, kc, panel)` (as Kernels::pack_b lays them out), A in MC-row blocks,
// C written through `c_out` (RowMajorC or PanelsTransposedC).
// `a_steps`, when given, are A's rows' activation-grid steps (quant.h): the packed A is
// rounded to that grid, as int8 products take their activations.
template <typename PackPanel, typename COut>
void gemm_packed(int M, int N, int K, MatView A, const PackPanel& pack_panel, const COut& c_out, bool accumulate,
                 Precision precision, const float* a_steps = nullptr) {
  const bool bf16 = precision == Precision::BF16;
  const Kernels& kern = kernels();
  const int MR = kern.mr, NR = kern.nr, KC = kern.kc, MC = kern.mc;
  const bool paired = bf16 && kern.micro_bf16;
  const MicroKernel micro = paired ? kern.micro_bf16 : kern.micro;
  // The packed B block, reused across calls: a fresh zeroed vector per product cost page
  // faults and a memset as large as the block (retention calls this per tile). Per thread,
  // since products nested in a parallel region run on several threads at once.
  // (The lambdas below must use `packed`: inside them `bpack` would name the running
  // thread's own buffer, not this call's.)
  thread_local std::vector<float> bpack;
  const size_t bpack_size = static_cast<size_t>(KC) * (std::min(N, NC) + NR);
  if (bpack.size() < bpack_size) bpack.resize(bpack_size);
  float* const packed = bpack.data();
  const int kc_step = k_block_step(K, KC);
  const int mblocks = (M + MC - 1) / MC;
  for (int n0 = 0; n0 < N; n0 += NC) {
    const int nc = std::min(NC, N - n0);
    const int npanels = (nc + NR - 1) / NR;
    for (int k0 = 0; k0 < K; k0 += kc_step) {
      const int kc = std::min(kc_step, K - k0);
      const bool acc = accumulate || k0 > 0;
      parallel_for(npanels, 8, [&](size_t p0, size_t p1) {
        for (size_t p = p0; p < p1; p++) {
          float* panel = packed + p * KC * NR;
          pack_panel(n0 + static_cast<int>(p) * NR, nc - static_cast<int>(p) * NR, k0, kc, panel);
          if (paired) kern.pair_b(panel, kc);
          else if (bf16) round_bf16_in_place(panel, kc * NR);
        }
      });
      const int ksteps = paired ? (kc + 1) / 2 : kc;  // what the micro-kernel iterates over
      // Split N too when there are few row blocks: about 8 tasks per thread, so with dynamic
      // scheduling the last, uneven ones cost little.
      const int threads = available_threads();
      const int nsplit = threads == 1 ? 1 : std::max(1, std::min(npanels, (threads * 8 + mblocks - 1) / mblocks));
      const int panels_per = (npanels + nsplit - 1) / nsplit;
      parallel_for(static_cast<size_t>(mblocks) * nsplit, 1, [&](size_t t0, size_t t1) {
        alignas(64) float apack[kMaxPackA + kPackSlack];
        alignas(64) float edge[kMaxMR * kMaxNR];
        for (size_t t = t0; t < t1; t++) {
          const int mb = static_cast<int>(t / nsplit), ns = static_cast<int>(t % nsplit);
          const int m0 = mb * MC, mc = std::min(MC, M - m0);
          const int pbeg = ns * panels_per, pend = std::min(npanels, pbeg + panels_per);
          if (pbeg >= pend) continue;
          kern.pack_a(A, m0, mc, k0, kc, apack);
          for (int ip = 0; a_steps && ip < mc; ip += MR)
            round_panel_to_grid(apack + ip * kc, kc, MR, std::min(MR, mc - ip), a_steps + m0 + ip);
          for (int ip = 0; bf16 && ip < mc; ip += MR) {
            if (paired) kern.pair_a(apack + ip * kc, kc);
            else round_bf16_in_place(apack + ip * kc, kc * MR);
          }
          for (int p = pbeg; p < pend; p++) {
            const int j0 = p * NR, cols = std::min(NR, nc - j0);
            const float* bp = packed + static_cast<size_t>(p) * KC * NR;
            for (int ip = 0; ip < mc; ip += MR) {
              const int rows = std::min(MR, mc - ip);
              ptrdiff_t ldc;
              float* ct = c_out.tile(m0 + ip, n0 + j0, ldc);
              if (rows == MR && cols == NR) {
                micro(ksteps, apack + ip * kc, bp, ct, ldc, acc);
              } else {
                micro(ksteps, apack + ip * kc, bp, edge, NR, false);
                for (int i = 0; i < rows; i++)
                  for (int j = 0; j < cols; j++) ct[i * ldc + j] = acc ? ct[i * ldc + j] + edge[i * NR + j] : edge[i * NR + j];
              }
            }
          }
        }
      });
    }
  }
}

}  // namespace

const char* gemm_isa() { return kernels().name; }

bool gemm_has_bf16_dot() { return kernels().micro_bf16 != nullptr; }

void linear_rowwise(int M, int K, const float* X, const LinearOut* outs, int count) {
  if (M <= 0) return;
  constexpr int kBlock = 64;
  static_assert(kBlock == kPanelWidth, "a block of a weight in panels is one panel");
  // Blocks of output rows across the whole group, numbered product after product, so one
  // region covers every product. Counted, not listed: a decode step allocates nothing.
  auto blocks_of = [&](int i) { return (static_cast<size_t>(outs[i].N) + kBlock - 1) / kBlock; };
  size_t total = 0;
  for (int i = 0; i < count; i++) total += blocks_of(i);
  // int8 weights take the activations on their integer grid, made once for the whole group.
  // (Per calling thread: models on several workers run products at once.)
  thread_local std::vector<int16_t> grid;
  thread_local std::vector<float> steps;
  for (int i = 0; i < count; i++) {
    if (outs[i].compact && outs[i].compact->format == WeightFormat::Int8) {
      grid.resize(static_cast<size_t>(M) * K);
      steps.resize(M);
      to_activation_grid(X, M, K, grid.data(), steps.data());
      break;
    }
  }
  const int16_t* const Q = grid.data();
  const float* const Q_steps = steps.data();
  const Kernels& kern = kernels();
  // Block `first` of product i; advance() steps to the next block of the group.
  struct Cursor {
    int i;
    size_t first;
  };
  auto locate = [&](size_t b) {
    Cursor c{0, b};
    while (c.first >= blocks_of(c.i)) c.first -= blocks_of(c.i++);
    return c;
  };
  auto advance = [&](Cursor& c) {
    c.first++;
    while (c.i < count && c.first == blocks_of(c.i)) {  // on to the next product with rows
      c.i++;
      c.first = 0;
    }
  };
  auto slice = [&](const Cursor& c) {
    const LinearOut& o = outs[c.i];
    const int n0 = static_cast<int>(c.first) * kBlock;
    return PanelSlice{o.W, o.N, n0, std::min(o.N, n0 + kBlock), o.Y};
  };
  auto run = [&](const Cursor& c) {
    const LinearOut& o = outs[c.i];
    const PanelSlice s = slice(c);
    if (o.compact && o.compact->format == WeightFormat::Int8) {
      int8_dots(*o.compact, M, s.n0, s.n1, Q, Q_steps, o.Y, o.N);
    } else if (o.panels) {
      panel_dots(o.W, o.N, K, M, s.n0, s.n1, X, o.Y, o.N);
    } else if (o.compact) {
      bf16_dots(*o.compact, M, s.n0, s.n1, X, o.Y, o.N);
    } else {
      kern.dots(M, s.n0, s.n1, o.N, K, X, K, o.W, K, o.Y, o.N, false);
    }
  };
  // One activation row of fp32 panels: blocks run two at a time, as two streams, so the
  // threads share out pairs of blocks.
  const bool pairs = M == 1;
  const size_t unit = pairs ? 2 : 1;
  parallel_for((total + unit - 1) / unit, 1, [&](size_t u0, size_t u1) {
    const size_t b0 = u0 * unit, b1 = std::min(total, u1 * unit);
    Cursor c = locate(b0);
    size_t b = b0;
    for (; pairs && b + 2 <= b1; b += 2) {
      const Cursor first = c;
      advance(c);
      if (outs[first.i].panels && outs[c.i].panels) {
        panel_dots_pair(slice(first), slice(c), K, X);
      } else {
        run(first);
        run(c);
      }
      advance(c);
    }
    for (; b < b1; b++, advance(c)) run(c);
  });
}

void gemm(int M, int N, int K, MatView A, MatView B, float* C, ptrdiff_t ldc, bool accumulate, Precision precision) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int i = 0; i < M; i++) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  const bool bf16 = precision == Precision::BF16;
  // Few rows against a K-contiguous weight: stream the weight once (decode steps).
  if (!bf16 && M <= kGemmDotsMaxRows && A.cs == 1 && B.rs == 1) {
    gemm_dots(M, N, K, A, B, C, ldc, accumulate);
    return;
  }
  if (!bf16 && A.cs == 1 && B.rs == 1 && gemm_small_rows(M, N, K, A, B, C, ldc, accumulate)) return;
  const Kernels& kern = kernels();
  gemm_packed(M, N, K, A, [&](int n0, int nc, int k0, int kc, float* panel) { kern.pack_b(B, n0, nc, k0, kc, panel); },
              RowMajorC{C, ldc}, accumulate, precision);
}

void linear_compact(int M, const float* X, const QuantizedMatrix& W, float* Y) {
  if (M <= 0 || W.N <= 0) return;
  // The decode dot products read a compact weight as it is stored; below a few hundred rows
  // they beat widening it for the packed path (medium prefill, bf16: 64 rows 151-162 against
  // 97-109 ms, 256 rows 357-373 against 335-339; int8: 128 rows 282-295 against 211-227).
  if (M <= kCompactDotsMaxRows) {
    const LinearOut out{nullptr, W.N, Y, &W};
    linear_rowwise(M, W.K, X, &out, 1);
    return;
  }
  const Kernels& kern = kernels();
  // Where decode's bf16 products round the activations to bf16 (on the CPU's bf16 dot
  // product), these do too, on the bf16 micro-kernel: every form of a bf16 model computes
  // what its decode steps compute.
  const bool bf16_x = W.format == WeightFormat::BF16 && gemm_has_bf16_dot();
  // And int8 decode products take the activations on their grid (quant.h); these round them to it.
  std::vector<float> steps;
  if (W.format == WeightFormat::Int8) {
    steps.resize(M);
    for (int i = 0; i < M; i++) steps[i] = activation_step(X + static_cast<size_t>(i) * W.K, W.K);
  }
  gemm_packed(
      M, W.N, W.K, row_major(X, W.K),
      [&](int n0, int nc, int k0, int kc, float* panel) {
        // The panel's weight rows widened side by side (fetching the next panel's), then
        // packed as an fp32 weight's would be.
        thread_local std::vector<float> wide;
        const int rows = std::min(kern.nr, nc);
        wide.resize(static_cast<size_t>(kern.nr) * kc);
        widen_rows(W, n0, rows, k0, kc, wide.data(), kc, kern.nr);
        kern.pack_b(transposed(wide.data(), kc), 0, rows, 0, kc, panel);
      },
      RowMajorC{Y, W.N}, false, bf16_x ? Precision::BF16 : Precision::F32, steps.empty() ? nullptr : steps.data());
}

void linear_panels(int M, int N, int K, const float* X, const float* P, float* Y, bool accumulate,
                   Precision precision) {
  if (M <= 0 || N <= 0) return;
  // Up to a few hundred rows, the decode products (batch-invariant, no packing).
  if (precision == Precision::F32 && !accumulate && M <= kCompactDotsMaxRows) {
    LinearOut out{P, N, Y};
    out.panels = true;
    linear_rowwise(M, K, X, &out, 1);
    return;
  }
  // A panel is B's columns [64p, 64p + width) as rows of k: each NR-column block packs by
  // copying its lines (NC and NR divide the panel width, so a block never spans two panels).
  const Kernels& kern = kernels();
  gemm_packed(
      M, N, K, row_major(X, K),
      [&](int n0, int nc, int k0, int kc, float* panel) {
        const int p = n0 / kPanelWidth;
        const float* first = P + panel_offset(K, p) + (n0 - p * kPanelWidth);
        kern.pack_b(row_major(first, panel_width(N, p)), 0, std::min(kern.nr, nc), k0, kc, panel);
      },
      RowMajorC{Y, N}, accumulate, precision);
}

void linear_panels_backward(int M, int N, int K, const float* X, const float* P, const float* dY, float* dX, float* dP,
                            bool accumulate_dx, Precision precision) {
  if (M <= 0 || N <= 0) return;
  const Kernels& kern = kernels();
  // dX[M, K] (=|+=) dY[M, N] W[N, K]: B is W itself, rows n, columns k, each NR-column block
  // gathered from the panels' lines (a block of W's rows transposed).
  gemm_packed(
      M, K, N, row_major(dY, N),
      [&](int n0, int nc, int k0, int kc, float* panel) {
        const int cols = std::min(kern.nr, nc);
        from_panels(P, N, K, k0, kc, n0, cols, panel, kern.nr);
        for (int r = 0; r < kc; r++) std::fill(panel + r * kern.nr + cols, panel + (r + 1) * kern.nr, 0.f);
      },
      RowMajorC{dX, K}, accumulate_dx, precision);
  // dW[N, K] += dY^T X, as dW^T[K, N] += X^T dY written into the panels: gemm splits by output
  // tile, so the sum over rows runs in a fixed order.
  gemm_packed(
      K, N, M, transposed(X, K),
      [&](int n0, int nc, int k0, int kc, float* panel) { kern.pack_b(row_major(dY, N), n0, nc, k0, kc, panel); },
      PanelsTransposedC{dP, N, K}, true, precision);
}

}  // namespace retnet
