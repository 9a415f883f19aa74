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
constexpr int64_t kLutMaxM = 4;  // LUT path up to this many rows (see bench/README for the choice)

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

#include "gemm_cpu_tile.inc"

// ---- LUT path -----------------------------------------------------------------------------------

inline __m512 load16_float(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kF32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    case FloatType::kBF16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

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
void lut_tiles(const CpuGemmArgs& a, const float* tables, const float* group_xsum, int64_t t0,
               float* out) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32;
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const int64_t fold_blocks = per_oc ? p.group / 32 : KB;
  const int64_t G = p.groups_per_line();
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t kb0 = 0; kb0 < KB; kb0 += fold_blocks) {
    __m512 acc[R][BITS];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < BITS; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t kb = kb0; kb < kb0 + fold_blocks; ++kb) {
      __m512i w[R][BITS];
      for (int r = 0; r < R; ++r)
        for (int b = 0; b < BITS; ++b)
          w[r][b] = _mm512_loadu_si512(qw + (((t0 + r) * KB + kb) * BITS + b) * kTileRows);
      const float* tb = tables + kb * 8 * 16;
      // Nibble j of every word indexes table j; shift the words down as we go (vpermps reads
      // only the low 4 bits of each index).
#pragma GCC unroll 1
      for (int j = 0; j < 8; ++j) {
        const __m512 tab = _mm512_load_ps(tb + j * 16);
        for (int r = 0; r < R; ++r)
          for (int b = 0; b < BITS; ++b) {
            acc[r][b] = _mm512_add_ps(acc[r][b], _mm512_permutexvar_ps(w[r][b], tab));
            w[r][b] = _mm512_srli_epi32(w[r][b], 4);
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

using LutFn = void (*)(const CpuGemmArgs&, const float*, const float*, int64_t, float*);

template <int BITS>
LutFn pick_lut(int R) {
  switch (R) {
    case 4: return lut_tiles<BITS, 4>;
    case 2: return lut_tiles<BITS, 2>;
    default: return lut_tiles<BITS, 1>;
  }
}

void gemm_lut_path(const CpuGemmArgs& a, const ParallelFor& pf) {
  const QuantParams& p = a.p;
  const int64_t M = a.M, K = p.K, T = p.row_tiles();
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  int R = std::max(1, 8 / p.bits);  // keeps R*bits accumulators and words in registers
  if (!per_oc) R = static_cast<int>(std::min<int64_t>(R, std::max<int64_t>(1, p.group / kTileRows)));
  while (R > 1 && T % R) R /= 2;  // every unit holds R whole tiles
  LutFn fn = nullptr;
  switch (p.bits) {
    case 2: fn = pick_lut<2>(R); break;
    case 3: fn = pick_lut<3>(R); break;
    case 4: fn = pick_lut<4>(R); break;
    default: fn = pick_lut<8>(R); break;
  }
  AlignedBuffer xf(M * K);
  to_f32_rows(a.x, a.act_type, M, K, a.ldx, xf.ptr, serial_for());
  const int64_t G = p.groups_per_line();
  // Per-OC: tables and per-group activation sums are shared by all tiles; build them once.
  AlignedBuffer shared_tables(per_oc ? M * K * 4 : 1), xsum(per_oc ? M * G : 1);
  if (per_oc) {
    pf(M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        build_tables(xf.ptr + m * K, K, shared_tables.ptr + m * K * 4);
        for (int64_t g = 0; g < G; ++g) {
          float s = 0.0f;
          for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += xf.ptr[m * K + k];
          xsum.ptr[m * G + g] = s;
        }
      }
    });
  }
  const int64_t units = T / R;
  pf(units, 1, [&](int64_t u0, int64_t u1) {
    AlignedBuffer own_tables(per_oc ? 1 : M * K * 4), xs(per_oc ? 1 : K);
    float* ic_offset = static_cast<float*>(std::malloc(sizeof(float) * M));
    int64_t built_group = -1;
    alignas(64) float out[4 * 16];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t0 = u * R;
      if (!per_oc) {
        const int64_t ng = t0 * kTileRows / p.group;
        if (ng != built_group) {  // per-IC: tables of x' = x·s for this output group
          for (int64_t m = 0; m < M; ++m) {
            float c = 0.0f;
            for (int64_t k = 0; k < K; ++k) {
              const float s = load_float(a.scales, ng * K + k, p.scale_type);
              xs.ptr[k] = xf.ptr[m * K + k] * s;
              c += xs.ptr[k] * static_cast<float>(p.symmetric ? p.sym_zero() : a.zeros[ng * K + k]);
            }
            ic_offset[m] = c;
            build_tables(xs.ptr, K, own_tables.ptr + m * K * 4);
          }
          built_group = ng;
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* tables = per_oc ? shared_tables.ptr + m * K * 4 : own_tables.ptr + m * K * 4;
        fn(a, tables, per_oc ? xsum.ptr + m * G : nullptr, t0, out);
        for (int r = 0; r < R; ++r)
          for (int l = 0; l < kTileRows; ++l) {
            const int64_t n = (t0 + r) * kTileRows + l;
            if (n >= p.N) break;
            float v = out[r * 16 + l];
            if (!per_oc) v -= ic_offset[m];
            if (a.bias) v += load_float(a.bias, n, a.act_type);
            store_float(a.y, m * p.N + n, a.act_type, v);
          }
      }
    }
    std::free(ic_offset);
  });
}

}  // namespace

void gemm_avx512(const CpuGemmArgs& a, const ParallelFor& pf) {
  if (a.M <= kLutMaxM) gemm_lut_path(a, pf);
  else gemm_tile_path(a, pf);
}
void gemm_t_avx512(const CpuGemmArgs& a, const ParallelFor& pf) { gemm_t_tile_path(a, pf); }

}  // namespace layerpress
