// AVX-512 CPU GEMM variant (needs AVX512F/BW/VL/DQ; compiled with those flags, chosen at run
// time). Two regimes:
//  * small M (decode): table lookup on bit planes. For every 4 consecutive activations a
//    16-entry table holds all partial sums x·b (b in {0,1}^4); one vpermps looks up 16 output
//    rows at once from the 4 plane bits each row has there. Work is proportional to the bit
//    width, so 2- and 3-bit weights are genuinely cheaper than 4-bit, and the weight is never
//    dequantised at all. Scales/zeros are applied per group: s·(Σ q·x − z·Σx).
//    Per-IC groups scale the activations instead (x'_k = x_k·s[k, n-group]) and subtract
//    Σ x'_k·z[k, n-group] once per output: the inner loop is the same as per-OC.
//  * larger M: the shared tile path (gemm_cpu_tile.inc) with a 6x64 register-blocked kernel.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {
namespace {

constexpr int64_t kMR = 6;
// LUT path up to this many rows, tile path above: LUT work grows with M·bits, the tile path's
// dequantisation is paid once. Crossover measured on a 2-core Zen 4 with bench_gemm_cpu
// (K = N = 4096): about 24 rows at 2 bits, 12 at 4 bits, so 48 / bits. The environment variable
// LAYERPRESS_LUT_MAX_M overrides it (tests use it to run both paths at every M).
int64_t lut_max_m(int bits) {
  const int64_t forced = lut_max_m_override();
  return forced >= 0 ? forced : 48 / bits;
}

template <int ROWS>
void microkernel_rows(const float* A, int64_t lda, const float* P, int64_t R, float* C) {
  __m512 acc[ROWS][4];
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_loadu_ps(C + m * 64 + j * 16);
  for (int64_t r = 0; r < R; ++r) {
    const float* pr = P + r * 64;
    const __m512 p0 = _mm512_load_ps(pr), p1 = _mm512_load_ps(pr + 16);
    const __m512 p2 = _mm512_load_ps(pr + 32), p3 = _mm512_load_ps(pr + 48);
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; ++m) {
      const __m512 av = _mm512_set1_ps(A[m * lda + r]);
      acc[m][0] = _mm512_fmadd_ps(av, p0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(av, p1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(av, p2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(av, p3, acc[m][3]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(C + m * 64 + j * 16, acc[m][j]);
}

void microkernel_avx512(const float* A, int64_t lda, int64_t rows, const float* P, int64_t R,
                        float* C) {
  switch (rows) {
    case 6: microkernel_rows<6>(A, lda, P, R, C); break;
    case 5: microkernel_rows<5>(A, lda, P, R, C); break;
    case 4: microkernel_rows<4>(A, lda, P, R, C); break;
    case 3: microkernel_rows<3>(A, lda, P, R, C); break;
    case 2: microkernel_rows<2>(A, lda, P, R, C); break;
    default: microkernel_rows<1>(A, lda, P, R, C); break;
  }
}
#define LP_MICROKERNEL microkernel_avx512

#include "gemm_cpu_avx512_loads.inc"

// AVX-512 versions of the tile path's panel dequantisation (contract in gemm_cpu_tile.inc).
// Codes are assembled from the bit planes with mask registers: bit i of the 16 plane-p words is
// a 16-lane mask, OR-ed into the code as 1 << p.
void dequant_panel_fwd_avx512(const GemmArgs& a, int64_t n0, int64_t k0, int64_t k1, float* P) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32, G = p.groups_per_line();
  const int32_t* qw = a.qweight;
  const __m512 sym_zero = _mm512_set1_ps(static_cast<float>(p.sym_zero()));
  for (int64_t tt = 0; tt < 4; ++tt) {
    const int64_t t = n0 / kTileRows + tt;
    float* Pt = P + tt * kTileRows;
    if (t >= p.row_tiles()) {
      for (int64_t k = k0; k < k1; ++k) _mm512_store_ps(Pt + (k - k0) * 64, _mm512_setzero_ps());
      continue;
    }
    for (int64_t kb = k0 / 32; kb < k1 / 32; ++kb) {
      __m512i w[8];
      for (int b = 0; b < p.bits; ++b)
        w[b] = _mm512_loadu_si512(qw + ((t * KB + kb) * p.bits + b) * kTileRows);
      // w = (q - z) * s = q * s + (-z * s): one FMA per element.
      __m512 s = _mm512_setzero_ps(), zs = _mm512_setzero_ps();
      alignas(64) float s_ic[32], zs_ic[32];
      if (p.axis == GroupAxis::kPerOC) {
        const int64_t si = (t * G + kb * 32 / p.group) * kTileRows;
        s = load16_float(a.scales, si, p.scale_type);
        const __m512 z = p.symmetric ? sym_zero : load16_zeros(a.zeros + si);
        zs = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), s);
      } else {
        // Per-IC: the 32 columns of the block each own a scale (shared by the 16 rows of the
        // tile, which lie in one group): convert them as vectors once, broadcast per column.
        const int64_t si = (t * kTileRows / p.group) * p.K + kb * 32;
        for (int h = 0; h < 2; ++h) {
          const __m512 sv = load16_float(a.scales, si + 16 * h, p.scale_type);
          const __m512 zv = p.symmetric ? sym_zero : load16_zeros(a.zeros + si + 16 * h);
          _mm512_store_ps(s_ic + 16 * h, sv);
          _mm512_store_ps(zs_ic + 16 * h, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), zv), sv));
        }
      }
      for (int i = 0; i < 32; ++i) {
        const __m512i bit = _mm512_set1_epi32(1 << i);
        __m512i q = _mm512_setzero_si512();
        for (int b = 0; b < p.bits; ++b)
          q = _mm512_mask_or_epi32(q, _mm512_test_epi32_mask(w[b], bit), q, _mm512_set1_epi32(1 << b));
        if (p.axis == GroupAxis::kPerIC) {
          s = _mm512_set1_ps(s_ic[i]);
          zs = _mm512_set1_ps(zs_ic[i]);
        }
        _mm512_store_ps(Pt + (kb * 32 + i - k0) * 64, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, zs));
      }
    }
  }
}

void dequant_panel_t_avx512(const GemmArgs& a, int64_t n0, int64_t n1, int64_t k0, int64_t cols, float* P) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32, G = p.groups_per_line();
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  const __m512 sym_zero = _mm512_set1_ps(static_cast<float>(p.sym_zero()));
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = n / kTileRows, l = n % kTileRows;
    float* dst = P + (n - n0) * 64;
    if (cols < 64) {
      _mm512_store_ps(dst + 32, _mm512_setzero_ps());
      _mm512_store_ps(dst + 48, _mm512_setzero_ps());
    }
    for (int64_t kb = k0 / 32; kb < (k0 + cols) / 32; ++kb) {
      __m512i q_lo = _mm512_setzero_si512(), q_hi = _mm512_setzero_si512();
      const uint32_t* w = qw + (t * KB + kb) * p.bits * kTileRows + l;
      for (int b = 0; b < p.bits; ++b) {
        const uint32_t word = w[b * kTileRows];
        const __m512i one = _mm512_set1_epi32(1 << b);
        q_lo = _mm512_mask_or_epi32(q_lo, static_cast<__mmask16>(word & 0xffffu), q_lo, one);
        q_hi = _mm512_mask_or_epi32(q_hi, static_cast<__mmask16>(word >> 16), q_hi, one);
      }
      __m512 s_lo, s_hi, z_lo, z_hi;
      if (p.axis == GroupAxis::kPerOC) {
        const int64_t si = (t * G + kb * 32 / p.group) * kTileRows + l;
        s_lo = s_hi = _mm512_set1_ps(load_float(a.scales, si, p.scale_type));
        z_lo = z_hi = p.symmetric ? sym_zero : _mm512_set1_ps(static_cast<float>(a.zeros[si]));
      } else {
        const int64_t si = (n / p.group) * p.K + kb * 32;
        s_lo = load16_float(a.scales, si, p.scale_type);
        s_hi = load16_float(a.scales, si + 16, p.scale_type);
        z_lo = p.symmetric ? sym_zero : load16_zeros(a.zeros + si);
        z_hi = p.symmetric ? sym_zero : load16_zeros(a.zeros + si + 16);
      }
      float* d = dst + (kb * 32 - k0);
      _mm512_store_ps(d, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q_lo), z_lo), s_lo));
      _mm512_store_ps(d + 16, _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q_hi), z_hi), s_hi));
    }
  }
}
#define LP_DEQUANT_PANEL_FWD dequant_panel_fwd_avx512
#define LP_DEQUANT_PANEL_T dequant_panel_t_avx512

#include "gemm_cpu_tile.inc"

// ---- LUT path -----------------------------------------------------------------------------------

// tables[j][e] = Σ_b bit_b(e) · x[4j + b], for j < K/4.
void build_tables(const float* x, int64_t K, float* tables) {
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i one = _mm512_set1_epi32(1);
  __m512 e[4];
  for (int b = 0; b < 4; ++b)
    e[b] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(iota, b), one));
  for (int64_t j = 0; j < K / 4; ++j) {
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(x[4 * j]), e[0]);
    t = _mm512_fmadd_ps(_mm512_set1_ps(x[4 * j + 1]), e[1], t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(x[4 * j + 2]), e[2], t);
    t = _mm512_fmadd_ps(_mm512_set1_ps(x[4 * j + 3]), e[3], t);
    _mm512_store_ps(tables + j * 16, t);
  }
}

// xs[k] = x[k]·s[s0 + k] and returns Σ_k xs[k]·z[k] (z = zeros[k], or sym_zero when zeros is null):
// the per-IC activation scaling of one output group.
float scale_activations(const float* x, const void* s, int64_t s0, FloatType st, const uint8_t* zeros,
                        float sym_zero, int64_t K, float* xs) {
  __m512 c = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + k), load16_float(s, s0 + k, st));
    _mm512_storeu_ps(xs + k, v);
    const __m512 z = zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros + k))))
                           : _mm512_set1_ps(sym_zero);
    c = _mm512_fmadd_ps(v, z, c);
  }
  return _mm512_reduce_add_ps(c);
}

// Software prefetch distance of the LUT path, in 32-column blocks: about 4 KB ahead in each
// tile's stream, into L2. Measured on a 2-core Zen 4 VM (bench.bench_gemv, W4, weights 3x L3):
// 256 B ahead gave 16-18 GB/s, 1.5 KB 20-23, 4 KB 20-25, 12 KB 18-22; the host's memory
// bandwidth varied by ±20 % between runs, so only the ordering is trustworthy.
template <int BITS>
constexpr int64_t kLutPrefetchBlocks = (4096 + BITS * 64 - 1) / (BITS * 64);

// Σ_p 2^p · acc[p]
template <int BITS>
inline __m512 combine_planes(const __m512* acc) {
  __m512 s = acc[BITS - 1];
  for (int b = BITS - 2; b >= 0; --b) s = _mm512_fmadd_ps(s, _mm512_set1_ps(2.0f), acc[b]);
  return s;
}

// Computes R consecutive row tiles starting at tile t0 for one activation row:
// out[r*16 + l] = Σ_k q[16(t0+r)+l][k] · x[k] with per-OC scaling per group applied, or, for
// per-IC (tables built from x' = x·s), the raw Σ q·x'.
template <int BITS, int R>
void lut_tiles(const GemmArgs& a, const float* tables, const float* group_xsum, int64_t t0,
               float* out) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32;
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const int64_t fold_blocks = per_oc ? p.group / 32 : KB;
  const int64_t G = p.groups_per_line();
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  const uint32_t* last_vector = qw + (p.row_tiles() * KB * BITS - 1) * kTileRows;
  alignas(64) uint32_t last_copy[kTileRows + 1] = {};
  std::memcpy(last_copy, last_vector, kTileRows * 4);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t kb0 = 0; kb0 < KB; kb0 += fold_blocks) {
    __m512 acc[R][BITS];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BITS; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t kb = kb0; kb < kb0 + fold_blocks; ++kb) {
      const float* tb = tables + kb * 8 * 16;
      // Each tile is one sequential stream (and the next tile continues it). On weights larger
      // than L3 the hardware prefetcher alone left M = 1 about 20 % slower than this.
      for (int r = 0; r < R; ++r) {
        const int64_t ahead_block = (t0 + r) * KB + kb + kLutPrefetchBlocks<BITS>;
        if (ahead_block >= p.row_tiles() * KB) break;
        const char* ahead = reinterpret_cast<const char*>(qw + ahead_block * BITS * kTileRows);
        for (int b = 0; b < BITS; ++b) _mm_prefetch(ahead + 64 * b, _MM_HINT_T1);
      }
      // Nibble j of a word indexes table j (vpermps reads only the low 4 bits of an index).
      // Loading the 16 words at byte offset o puts nibble 2o in the low bits; one shift by 4
      // gives nibble 2o+1. The 3 bytes read past a vector belong to the next one, except at the
      // very end of the weight, where a padded copy is read instead.
      const uint32_t* src[R][BITS];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < BITS; ++b) src[r][b] = qw + (((t0 + r) * KB + kb) * BITS + b) * kTileRows;
      if (src[R - 1][BITS - 1] == last_vector) src[R - 1][BITS - 1] = last_copy;
#pragma GCC unroll 1
      for (int o = 0; o < 4; ++o) {
        const __m512 tab_even = _mm512_load_ps(tb + (2 * o) * 16);
        const __m512 tab_odd = _mm512_load_ps(tb + (2 * o + 1) * 16);
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < BITS; ++b) {
            const __m512i v = _mm512_loadu_si512(reinterpret_cast<const char*>(src[r][b]) + o);
            // x·1 + acc rounds exactly like x + acc; issuing half the sums as FMAs spreads them
            // over the FMA pipes as well as the add pipes (Zen 4 adds only on two of four).
            acc[r][b] = _mm512_add_ps(acc[r][b], _mm512_permutexvar_ps(v, tab_even));
            acc[r][b] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab_odd), one, acc[r][b]);
          }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 sum = combine_planes<BITS>(acc[r]);
      if (per_oc) {
        const int64_t si = ((t0 + r) * G + kb0 * 32 / p.group) * kTileRows;
        const __m512 s = load16_float(a.scales, si, p.scale_type);
        __m512 z;
        if (p.symmetric) {
          z = _mm512_set1_ps(static_cast<float>(p.sym_zero()));
        } else {
          z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.zeros + si))));
        }
        const __m512 xs = _mm512_set1_ps(group_xsum[kb0 * 32 / p.group]);
        total[r] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, sum), total[r]);
      } else {
        total[r] = sum;
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * 16, total[r]);
}

#include "gemm_cpu_lut.inc"

}  // namespace

void gemm_avx512(const GemmArgs& a, const ParallelFor& pf) {
  if (a.M <= lut_max_m(a.p.bits)) gemm_lut_path(a, pf);
  else gemm_tile_path(a, pf);
}
void gemm_t_avx512(const GemmArgs& a, const ParallelFor& pf) { gemm_t_tile_path(a, pf); }

}  // namespace layerpress
