// AVX2 + FMA CPU GEMM variant (compiled with -mavx2 -mfma -mf16c, chosen at run time on CPUs
// without AVX-512). Same two regimes as the AVX-512 variant (see gemm_cpu_avx512.cpp):
//  * small M: the bit-plane table lookup. vpermps on 8 lanes reads 3 index bits, so a 16-entry
//    table (4 activations) is looked up as T[idx & 7] + bit3(idx)·x3 (T[8] is x3 alone).
//  * larger M: the shared tile path with a 6x16 register-blocked FMA kernel and the portable
//    panel dequantisation.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {
namespace {

constexpr int64_t kMR = 6;

// C[rows][64] += A[rows][R] · P[R][64], as four 16-column strips of ROWSx16 (12 accumulators at
// 6 rows). A is first packed k-major ([R][ROWS]) so that the strips broadcast from one
// contiguous stream instead of ROWS rows K floats apart (which alias in L1).
template <int ROWS>
void microkernel_rows(const float* A, int64_t lda, const float* P, int64_t R, float* C) {
  alignas(32) float apack[256 * ROWS];  // R <= kPanelDepth (256, gemm_cpu_tile.inc)
  for (int64_t r = 0; r < R; ++r)
    for (int m = 0; m < ROWS; ++m) apack[r * ROWS + m] = A[m * lda + r];
  for (int j = 0; j < 64; j += 16) {
    __m256 acc[ROWS][2];
    for (int m = 0; m < ROWS; ++m) {
      acc[m][0] = _mm256_loadu_ps(C + m * 64 + j);
      acc[m][1] = _mm256_loadu_ps(C + m * 64 + j + 8);
    }
    for (int64_t r = 0; r < R; ++r) {
      const __m256 p0 = _mm256_load_ps(P + r * 64 + j), p1 = _mm256_load_ps(P + r * 64 + j + 8);
      for (int m = 0; m < ROWS; ++m) {
        const __m256 av = _mm256_broadcast_ss(apack + r * ROWS + m);
        acc[m][0] = _mm256_fmadd_ps(av, p0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(av, p1, acc[m][1]);
      }
    }
    for (int m = 0; m < ROWS; ++m) {
      _mm256_storeu_ps(C + m * 64 + j, acc[m][0]);
      _mm256_storeu_ps(C + m * 64 + j + 8, acc[m][1]);
    }
  }
}

void microkernel_avx2(const float* A, int64_t lda, int64_t rows, const float* P, int64_t R, float* C) {
  switch (rows) {
    case 6: microkernel_rows<6>(A, lda, P, R, C); break;
    case 5: microkernel_rows<5>(A, lda, P, R, C); break;
    case 4: microkernel_rows<4>(A, lda, P, R, C); break;
    case 3: microkernel_rows<3>(A, lda, P, R, C); break;
    case 2: microkernel_rows<2>(A, lda, P, R, C); break;
    default: microkernel_rows<1>(A, lda, P, R, C); break;
  }
}
#define LP_MICROKERNEL microkernel_avx2

#include "gemm_cpu_tile.inc"

// ---- LUT path -----------------------------------------------------------------------------------

#include "gemm_cpu_avx2_loads.inc"

// tables[j][e] = Σ_b bit_b(e) · x[4j + b], for j < K/4 (the same tables as the AVX-512 variant).
void build_tables(const float* x, int64_t K, float* tables) {
  const __m256i iota = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i one = _mm256_set1_epi32(1);
  __m256 e[3];
  for (int b = 0; b < 3; ++b) e[b] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(iota, b), one));
  for (int64_t j = 0; j < K / 4; ++j) {
    __m256 t = _mm256_mul_ps(_mm256_set1_ps(x[4 * j]), e[0]);
    t = _mm256_fmadd_ps(_mm256_set1_ps(x[4 * j + 1]), e[1], t);
    t = _mm256_fmadd_ps(_mm256_set1_ps(x[4 * j + 2]), e[2], t);
    const __m256 x3 = _mm256_set1_ps(x[4 * j + 3]);
    _mm256_store_ps(tables + j * 16, t);
    _mm256_store_ps(tables + j * 16 + 8, _mm256_add_ps(t, x3));
  }
}

float scale_activations(const float* x, const void* s, int64_t s0, FloatType st, const uint8_t* zeros,
                        float sym_zero, int64_t K, float* xs) {
  __m256 c = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), load8_float(s, s0 + k, st));
    _mm256_storeu_ps(xs + k, v);
    c = _mm256_fmadd_ps(v, zeros ? load8_zeros(zeros + k) : _mm256_set1_ps(sym_zero), c);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, c);
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}

// One half tile (8 rows, lanes h*8..h*8+7 of tile t) over all of K; see lut_tiles.
template <int BITS>
__m256 lut_half_tile(const GemmArgs& a, const float* tables, const float* group_xsum, int64_t t,
                     int h, const uint32_t* last_vector, const uint32_t* last_copy) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32, G = p.groups_per_line();
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const int64_t fold_blocks = per_oc ? p.group / 32 : KB;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  const __m256 zero = _mm256_setzero_ps();
  __m256 total = zero;
  for (int64_t kb0 = 0; kb0 < KB; kb0 += fold_blocks) {
    __m256 acc[BITS];
    for (int b = 0; b < BITS; ++b) acc[b] = zero;
    for (int64_t kb = kb0; kb < kb0 + fold_blocks; ++kb) {
      const float* tb = tables + kb * 8 * 16;
      const char* src[BITS];
      for (int b = 0; b < BITS; ++b) {
        const uint32_t* ptr = qw + ((t * KB + kb) * BITS + b) * kTileRows;
        // byte-offset loads read 3 bytes past the 16 words; the buffer's last vector is copied
        src[b] = reinterpret_cast<const char*>((ptr == last_vector ? last_copy : ptr) + h * 8);
      }
      for (int o = 0; o < 4; ++o) {
        const __m256 lo_even = _mm256_load_ps(tb + (2 * o) * 16), x3_even = _mm256_broadcast_ss(tb + (2 * o) * 16 + 8);
        const __m256 lo_odd = _mm256_load_ps(tb + (2 * o + 1) * 16), x3_odd = _mm256_broadcast_ss(tb + (2 * o + 1) * 16 + 8);
        for (int b = 0; b < BITS; ++b) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[b] + o));
          const __m256i w = _mm256_srli_epi32(v, 4);
          acc[b] = _mm256_add_ps(acc[b], _mm256_permutevar8x32_ps(lo_even, v));
          acc[b] = _mm256_add_ps(acc[b], _mm256_blendv_ps(zero, x3_even, _mm256_castsi256_ps(_mm256_slli_epi32(v, 28))));
          acc[b] = _mm256_add_ps(acc[b], _mm256_permutevar8x32_ps(lo_odd, w));
          acc[b] = _mm256_add_ps(acc[b], _mm256_blendv_ps(zero, x3_odd, _mm256_castsi256_ps(_mm256_slli_epi32(w, 28))));
        }
      }
    }
    __m256 sum = acc[BITS - 1];
    for (int b = BITS - 2; b >= 0; --b) sum = _mm256_fmadd_ps(sum, _mm256_set1_ps(2.0f), acc[b]);
    if (per_oc) {
      const int64_t si = (t * G + kb0 * 32 / p.group) * kTileRows + h * 8;
      const __m256 s = load8_float(a.scales, si, p.scale_type);
      const __m256 z = p.symmetric ? _mm256_set1_ps(static_cast<float>(p.sym_zero())) : load8_zeros(a.zeros + si);
      total = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, _mm256_set1_ps(group_xsum[kb0 * 32 / p.group]), sum), total);
    } else {
      total = sum;
    }
  }
  return total;
}

// Same contract as the AVX-512 lut_tiles: R row tiles starting at t0 for one activation row.
template <int BITS, int R>
void lut_tiles(const GemmArgs& a, const float* tables, const float* group_xsum, int64_t t0, float* out) {
  const QuantParams& p = a.p;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  const uint32_t* last_vector = qw + (p.row_tiles() * (p.K / 32) * BITS - 1) * kTileRows;
  alignas(32) uint32_t last_copy[kTileRows + 1] = {};
  std::memcpy(last_copy, last_vector, kTileRows * 4);
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_ps(out + r * 16 + h * 8,
                       lut_half_tile<BITS>(a, tables, group_xsum, t0 + r, h, last_vector, last_copy));
}

#include "gemm_cpu_lut.inc"

// Crossover between the paths (LAYERPRESS_LUT_MAX_M overrides). Without mask registers the
// tile path's panel dequantisation is the expensive part here, so the lookup stays ahead longer
// than with AVX-512: measured single-threaded on Zen 4 (AVX2 variant forced), K = N = 4096, W4
// lookup 21.8 ms vs tile 30.8 ms at M = 16, W2 16.3 vs 20.1 ms.
int64_t lut_max_m(int bits) {
  const int64_t forced = lut_max_m_override();
  return forced >= 0 ? forced : 64 / bits;
}

}  // namespace

void gemm_avx2(const GemmArgs& a, const ParallelFor& pf) {
  if (a.M <= lut_max_m(a.p.bits)) gemm_lut_path(a, pf);
  else gemm_tile_path(a, pf);
}
void gemm_t_avx2(const GemmArgs& a, const ParallelFor& pf) { gemm_t_tile_path(a, pf); }

}  // namespace layerpress
