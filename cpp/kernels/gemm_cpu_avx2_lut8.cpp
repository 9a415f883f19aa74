// AVX2 "avx2_lut8" CPU GEMM variant (opt-in: never chosen automatically, because it rounds).
// Small M, per-OC groups, 2-4 bits: the bit-plane table lookup with int8 tables and vpshufb,
// which looks up 32 entries per instruction where the exact avx2 path's vpermps looks up 8
// floats. Everything else (larger M, per-IC groups, 8 bits, the transposed product) is the exact
// avx2 variant.
//
// Tables (one activation row x, per 32-column block kb, per 4-column group c = 0..7 of the block):
//   e_c[i] = Σ_j x[32kb + 4c + j]·(bit_j(i) − ½)           i = 0..15, in fp32, j in order
//   s_kb   = max over the block's 128 |e_c[i]| / 127;   q_c[i] = rne(e_c[i] · (127 / max)) int8
// (0 for an all-zero block). Centring the bits on ±½ halves the table range, so the rounding
// error per looked-up entry is at most s_kb/2 ≤ Σ|x_4 columns|/508. With the codes
// q = Σ_b 2^b·bit_b:
//   Σ_k x_k·q_k = Σ_b 2^b Σ_c e_c[plane-b nibble] + ½·(2^bits − 1)·Σ_k x_k,
// so a per-OC group g of row n gives  y_n += s_gn·(Σ_kb s_kb·D_kb,n + (½·qmax − z_gn)·Σ_{k∈g} x_k),
// D_kb,n the exact integer sum of looked-up int8 entries (int16 per block: ≤ 4·127·15·2 < 2^15).
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {
namespace {

constexpr int64_t kTableBytesPerBlock = 128;  // 8 groups x 16 int8 entries


struct Buffer {  // malloc-based, like gemm_cpu_tile.inc's AlignedBuffer (no std:: templates per ISA)
  void* ptr = nullptr;
  explicit Buffer(int64_t bytes) { ptr = std::aligned_alloc(64, static_cast<size_t>((bytes + 63) / 64 * 64)); }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

#include "gemm_cpu_avx2_loads.inc"

// Block kb's tables as the kernel loads them: four 32-byte vectors [c0|c4], [c1|c5], [c2|c6],
// [c3|c7] (one 16-entry table per 128-bit lane), then the block's scale in `scale[kb]`.
void build_int8_tables(const float* x, int64_t K, int8_t* q, float* scale) {
  __m256 h[4][2];  // h[j][half][i] = bit_j(8·half + i) − ½
  for (int j = 0; j < 4; ++j)
    for (int half = 0; half < 2; ++half) {
      alignas(32) float v[8];
      for (int i = 0; i < 8; ++i) v[i] = ((8 * half + i) >> j & 1) ? 0.5f : -0.5f;
      h[j][half] = _mm256_load_ps(v);
    }
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t kb = 0; kb < K / 32; ++kb) {
    __m256 e[8][2];
    __m256 amax = _mm256_setzero_ps();
    for (int c = 0; c < 8; ++c) {
      const float* xc = x + kb * 32 + 4 * c;
      for (int half = 0; half < 2; ++half) {
        __m256 v = _mm256_mul_ps(_mm256_set1_ps(xc[0]), h[0][half]);
        for (int j = 1; j < 4; ++j) v = _mm256_fmadd_ps(_mm256_set1_ps(xc[j]), h[j][half], v);  // x·±½ is exact
        e[c][half] = v;
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
      }
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float m = 0.0f;
    for (float v : lanes) m = m > v ? m : v;
    scale[kb] = m / 127.0f;
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    for (int c = 0; c < 8; ++c) {
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(e[c][0], inv));  // round to nearest even
      const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(e[c][1], inv));
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);  // entries 0..15
      const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + kb * kTableBytesPerBlock + (c % 4) * 32 + (c / 4) * 16), b);
    }
  }
}

// One 16-row tile over all of K for one activation row: out[l] = Σ_k x_k·(q_lk − z)·s, rows in
// order. Within the kernel rows are kept in the order (0-3, 8-11 | 4-7, 12-15) that the
// bit-plane byte transpose produces; scales and outputs are permuted to match.
template <int BITS>
void lut8_tile(const GemmArgs& a, const int8_t* tq, const float* tscale, const float* group_xsum, int64_t t,
               float* out) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32, G = p.groups_per_line(), blocks_per_group = p.group / 32;
  const char* qw = reinterpret_cast<const char*>(a.qweight);
  // 4x4 byte transpose inside each 4-word quarter: [row][byte] -> [byte][row]
  const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                             0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256 half_qmax = _mm256_set1_ps(0.5f * static_cast<float>(p.qmax()));
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 gacc0 = _mm256_setzero_ps(), gacc1 = _mm256_setzero_ps();
    for (int64_t kb = g * blocks_per_group; kb < (g + 1) * blocks_per_group; ++kb) {
      const __m256i* tb = reinterpret_cast<const __m256i*>(tq + kb * kTableBytesPerBlock);
      const __m256i ta_lo = _mm256_loadu_si256(tb), ta_hi = _mm256_loadu_si256(tb + 1);
      const __m256i tb_lo = _mm256_loadu_si256(tb + 2), tb_hi = _mm256_loadu_si256(tb + 3);
      const char* src = qw + ((t * KB + kb) * BITS) * kTileRows * 4;
      _mm_prefetch(src + 4096, _MM_HINT_T0);
      _mm_prefetch(src + 4096 + 64 * (BITS - 1), _MM_HINT_T0);
      __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
      for (int b = 0; b < BITS; ++b) {
        // the plane's 16 words: rows 0-7 and 8-15, 4 bytes (8 nibbles = 8 column groups) each
        const __m256i y0 = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b * 64)), transpose);
        const __m256i y1 = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b * 64 + 32)), transpose);
        const __m256i t0 = _mm256_unpacklo_epi32(y0, y1), t1 = _mm256_unpackhi_epi32(y0, y1);
        const __m256i s0 = _mm256_permute2x128_si256(t0, t1, 0x20), s1 = _mm256_permute2x128_si256(t0, t1, 0x31);
        // va: byte 0 (groups 0,1) of all 16 rows | byte 2 (groups 4,5); vb: bytes 1 | 3
        const __m256i va = _mm256_unpacklo_epi64(s0, s1), vb = _mm256_unpackhi_epi64(s0, s1);
        const __m256i weight = _mm256_set1_epi8(static_cast<char>(1 << b));
        const __m256i ra_lo = _mm256_shuffle_epi8(ta_lo, _mm256_and_si256(va, low4));
        const __m256i ra_hi = _mm256_shuffle_epi8(ta_hi, _mm256_and_si256(_mm256_srli_epi16(va, 4), low4));
        const __m256i rb_lo = _mm256_shuffle_epi8(tb_lo, _mm256_and_si256(vb, low4));
        const __m256i rb_hi = _mm256_shuffle_epi8(tb_hi, _mm256_and_si256(_mm256_srli_epi16(vb, 4), low4));
        // pairs (group 2i, 2i+1) of one row side by side; maddubs adds them times 2^b
        acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(weight, _mm256_unpacklo_epi8(ra_lo, ra_hi)));
        acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(weight, _mm256_unpackhi_epi8(ra_lo, ra_hi)));
        acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(weight, _mm256_unpacklo_epi8(rb_lo, rb_hi)));
        acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(weight, _mm256_unpackhi_epi8(rb_lo, rb_hi)));
      }
      // the two lanes hold the same rows (other column groups)
      const __m128i d0 = _mm_add_epi16(_mm256_castsi256_si128(acc0), _mm256_extracti128_si256(acc0, 1));
      const __m128i d1 = _mm_add_epi16(_mm256_castsi256_si128(acc1), _mm256_extracti128_si256(acc1, 1));
      const __m256 s = _mm256_set1_ps(tscale[kb]);
      gacc0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(d0)), gacc0);
      gacc1 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(d1)), gacc1);
    }
    const int64_t si = (t * G + g) * kTileRows;
    const __m256 s_lo = load8_float(a.scales, si, p.scale_type), s_hi = load8_float(a.scales, si + 8, p.scale_type);
    __m256 z_lo, z_hi;
    if (p.symmetric) {
      z_lo = z_hi = _mm256_set1_ps(static_cast<float>(p.sym_zero()));
    } else {
      z_lo = load8_zeros(a.zeros + si);
      z_hi = load8_zeros(a.zeros + si + 8);
    }
    const __m256 xsum = _mm256_set1_ps(group_xsum[g]);
    const __m256 c0 = _mm256_mul_ps(_mm256_sub_ps(half_qmax, _mm256_permute2f128_ps(z_lo, z_hi, 0x20)), xsum);
    const __m256 c1 = _mm256_mul_ps(_mm256_sub_ps(half_qmax, _mm256_permute2f128_ps(z_lo, z_hi, 0x31)), xsum);
    tot0 = _mm256_fmadd_ps(_mm256_permute2f128_ps(s_lo, s_hi, 0x20), _mm256_add_ps(gacc0, c0), tot0);
    tot1 = _mm256_fmadd_ps(_mm256_permute2f128_ps(s_lo, s_hi, 0x31), _mm256_add_ps(gacc1, c1), tot1);
  }
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(tot0, tot1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(tot0, tot1, 0x31));
}

using Lut8Fn = void (*)(const GemmArgs&, const int8_t*, const float*, const float*, int64_t, float*);

void gemm_lut8_path(const GemmArgs& a, const ParallelFor& pf) {
  const QuantParams& p = a.p;
  const int64_t M = a.M, K = p.K, KB = K / 32, G = p.groups_per_line(), T = p.row_tiles();
  const Lut8Fn fn = p.bits == 2 ? lut8_tile<2> : p.bits == 3 ? lut8_tile<3> : lut8_tile<4>;
  Buffer xf(M * K * 4), tq(M * KB * kTableBytesPerBlock), ts(M * KB * 4), xsum(M * G * 4);
  pf(M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* xr = xf.as<float>() + m * K;
      for (int64_t k = 0; k < K; ++k) xr[k] = load_float(a.x, m * a.ldx + k, a.act_type);
      build_int8_tables(xr, K, tq.as<int8_t>() + m * KB * kTableBytesPerBlock, ts.as<float>() + m * KB);
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) s += xr[k];
        xsum.as<float>()[m * G + g] = s;
      }
    }
  });
  pf(T, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float out[kTileRows];
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = 0; m < M; ++m) {
        fn(a, tq.as<int8_t>() + m * KB * kTableBytesPerBlock, ts.as<float>() + m * KB, xsum.as<float>() + m * G, t,
           out);
        for (int l = 0; l < kTileRows; ++l) {
          const int64_t n = t * kTileRows + l;
          if (n >= p.N) break;
          float v = out[l];
          if (a.bias) v += load_float(a.bias, n, a.act_type);
          store_float(a.y, m * p.N + n, a.act_type, v);
        }
      }
  });
}

}  // namespace

// Largest M on this path: each activation row re-reads the tile from cache, while the tile
// path's cost barely grows with M. Crossover: docs/kernels.md (avx2_lut8).
int64_t avx2_lut8_max_m(int bits) {
  const int64_t forced = lut_max_m_override();
  return forced >= 0 ? forced : 64 / bits;
}

void gemm_avx2_lut8(const GemmArgs& a, const ParallelFor& pf) {
  if (a.M <= avx2_lut8_max_m(a.p.bits) && a.p.axis == GroupAxis::kPerOC && a.p.bits <= 4) gemm_lut8_path(a, pf);
  else gemm_avx2(a, pf);
}

}  // namespace layerpress
