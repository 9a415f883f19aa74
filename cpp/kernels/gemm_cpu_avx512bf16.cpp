// AVX512-BF16 CPU GEMM variant (needs AVX-512 F/BW/VL/DQ plus BF16, VBMI and GFNI; compiled
// with those flags, chosen at run time). For M above the table-lookup threshold, the tile path
// runs in bf16: the weight is decoded once per panel into the pair-interleaved bf16 layout that
// vdpbf16ps reads, and every activation row is multiplied against it with fp32 accumulation,
// twice the multiply rate of the fp32 FMA path. Small M, fp16 activations and 8-bit weights go
// to the exact AVX-512 variant (see gemm_avx512bf16 at the bottom for why).
//
// Panel layout: Pb[kp][n] (uint32) = bf16 pair {w[n][2kp] (low half), w[n][2kp+1] (high half)}
// for the 64 output columns n of the panel, so one 64-byte load feeds one vdpbf16ps for 16
// columns and a broadcast activation pair.
//
// What the panel holds:
//  * per-OC groups: the raw codes q (exact in bf16); the scale and zero point are applied once
//    per group on the accumulators: y += s·(Σ x·q − z·Σx), with Σx of the bf16 activations. The
//    only rounding beyond fp32 accumulation is the activations' rounding to bf16.
//  * per-IC groups: the scale varies along K inside a pair, so the panel holds the dequantised
//    weight bf16((q − z)·s), looked up from a 32-entry table per (group, k-pair); the weight is
//    rounded to bf16 once (relative error ≤ 2⁻⁹).
//
// Decoding (per 16-row tile and 32-column block, the planes of kCpuBitplane16):
//  1. two vpermt2b gather, for each pair of rows (l, l+8) and byte cb of the plane words, the
//     bytes of every plane into one qword (row l in bytes 7..4, row l+8 in bytes 3..0, plane p at
//     byte 7−p resp. 3−p);
//  2. gf2p8affineqb with the data as the matrix transposes each 8x8 bit block: byte c of the
//     result is code(l, 8cb+c) | code(l+8, 8cb+c) << 4 — 32 codes of 2 rows per qword lane;
//  3. per k-pair, one vpermb puts the two codes of each row into the two 16-bit halves of its
//     lane, one vpsrlvw moves rows 8..15 down from the high nibble, one vpermw maps codes to bf16
//     (vpermw reads only index bits 0..4, so the table repeats every 16 entries and the other
//     row's nibble is ignored).
// Three vector instructions per 32 weights, against about 20 for a bit-test decode.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {
namespace {

constexpr int64_t kMR = 6;            // activation rows per micro-kernel call
constexpr int64_t kPanelCols = 64;    // output columns per panel (4 tiles of 16)
constexpr int64_t kPanelDepth = 128;  // reduction depth per decoded panel (multiple of 32)

struct Aligned {  // malloc-based, like the tile path's AlignedBuffer
  void* ptr = nullptr;
  explicit Aligned(int64_t bytes) {
    ptr = std::aligned_alloc(64, static_cast<size_t>((std::max<int64_t>(bytes, 64) + 63) / 64 * 64));
  }
  ~Aligned() { std::free(ptr); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  template <class T> T* as() const { return static_cast<T*>(ptr); }
};

#include "gemm_cpu_avx512_loads.inc"

// ---- decode -------------------------------------------------------------------------------------

struct DecodeConsts {
  __m512i gather_lo, gather_hi;  // step 1 indices: planes 0,1 (from P0,P1) and 2,3 (from P2,P3)
  __m512i unit;                  // byte c of each qword = 1 << c (the GFNI operand)
  __m512i pick[4];               // step 3 vpermb indices, for the pair jj of a byte
  __m512i row_shift;             // words of rows 8..15 shift right by 4
  __m512i code_table;            // bf16(i mod 16)
  __m512i low_nibble, odd_word;  // per-IC: index = (code & 15) | 16·(word is odd)
};

DecodeConsts make_decode_consts() {
  DecodeConsts c;
  alignas(64) uint8_t lo[64], hi[64], unit[64], pick[4][64];
  alignas(64) uint16_t shift[32], table[32], nib[32], odd[32];
  // The two gathers fill complementary bytes of each qword; byte values outside are zeroed.
  // Qword q (q = 0..7) of output vector cb holds rows q and q+8: byte 7-p = plane p of row q,
  // byte 3-p = plane p of row q+8, both at byte cb of the plane word.
  for (int q = 0; q < 8; ++q)
    for (int b = 0; b < 8; ++b) {
      const int row = b >= 4 ? q : q + 8;
      const int plane = b >= 4 ? 7 - b : 3 - b;
      const uint8_t src = static_cast<uint8_t>((plane & 1) * 64 + 4 * row);  // + cb at run time
      lo[8 * q + b] = plane < 2 ? src : 0;
      hi[8 * q + b] = plane >= 2 ? src : 0;
    }
  for (int i = 0; i < 64; ++i) unit[i] = static_cast<uint8_t>(1u << (i % 8));
  // Pair jj of an 8-column byte: columns 2jj, 2jj+1 sit in result bytes 2jj, 2jj+1 of each qword.
  for (int jj = 0; jj < 4; ++jj)
    for (int l = 0; l < 16; ++l) {
      const int q = l % 8;
      pick[jj][4 * l + 0] = static_cast<uint8_t>(8 * q + 2 * jj);
      pick[jj][4 * l + 1] = 0;
      pick[jj][4 * l + 2] = static_cast<uint8_t>(8 * q + 2 * jj + 1);
      pick[jj][4 * l + 3] = 0;
    }
  for (int w = 0; w < 32; ++w) {
    shift[w] = w >= 16 ? 4 : 0;
    table[w] = f32_to_bf16(static_cast<float>(w % 16));
    nib[w] = 0x000f;
    odd[w] = (w & 1) ? 0x0010 : 0;
  }
  c.gather_lo = _mm512_load_si512(lo);
  c.gather_hi = _mm512_load_si512(hi);
  c.unit = _mm512_load_si512(unit);
  for (int jj = 0; jj < 4; ++jj) c.pick[jj] = _mm512_load_si512(pick[jj]);
  c.row_shift = _mm512_load_si512(shift);
  c.code_table = _mm512_load_si512(table);
  c.low_nibble = _mm512_load_si512(nib);
  c.odd_word = _mm512_load_si512(odd);
  return c;
}

// Steps 1-2 for one tile and 32-column block (bits <= 4): T[cb] qword q byte c =
// code(q, 8cb+c) | code(q+8, 8cb+c) << 4.
inline void transpose_block(const DecodeConsts& c, const uint32_t* w, int bits, __m512i T[4]) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i p0 = _mm512_loadu_si512(w);
  const __m512i p1 = bits > 1 ? _mm512_loadu_si512(w + 16) : z;
  const __m512i p2 = bits > 2 ? _mm512_loadu_si512(w + 32) : z;
  const __m512i p3 = bits > 3 ? _mm512_loadu_si512(w + 48) : z;
  const __mmask64 lo_bytes = 0xc0c0c0c0c0c0c0c0ull | 0x0c0c0c0c0c0c0c0cull;  // bytes 7,6,3,2
  for (int cb = 0; cb < 4; ++cb) {
    const __m512i off = _mm512_set1_epi8(static_cast<char>(cb));
    __m512i m = _mm512_maskz_permutex2var_epi8(lo_bytes, p0, _mm512_add_epi8(c.gather_lo, off), p1);
    if (bits > 2)
      m = _mm512_or_si512(m, _mm512_maskz_permutex2var_epi8(~lo_bytes, p2, _mm512_add_epi8(c.gather_hi, off), p3));
    T[cb] = _mm512_gf2p8affine_epi64_epi8(c.unit, m, 0);
  }
}

// Step 3: the code words of k-pair j (0..15) of a transposed block, before the table lookup:
// word 2l = code(l, 2j), word 2l+1 = code(l, 2j+1) in bits 0..3 (rows < 8 carry another code in
// bits 4..7).
inline __m512i pair_codes(const DecodeConsts& c, const __m512i T[4], int j) {
  const __m512i v = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, c.pick[j & 3], T[j >> 2]);
  return _mm512_srlv_epi16(v, c.row_shift);
}

// Per-IC lookup tables of one (group row, k-pair): entries 0..15 = bf16((i − z_k)·s_k) for the
// pair's first column, 16..31 for its second.
void build_ic_tables(const GemmArgs& a, int64_t group_row, int64_t k0, int64_t k1, __m512i* tables) {
  const QuantParams& p = a.p;
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const float symz = static_cast<float>(p.sym_zero());
  for (int64_t k = k0; k < k1; k += 2) {
    const int64_t si = group_row * p.K + k;
    const float s0 = load_float(a.scales, si, p.scale_type), s1 = load_float(a.scales, si + 1, p.scale_type);
    const float z0 = p.symmetric ? symz : static_cast<float>(a.zeros[si]);
    const float z1 = p.symmetric ? symz : static_cast<float>(a.zeros[si + 1]);
    const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z0)), _mm512_set1_ps(s0));
    const __m512 hi = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z1)), _mm512_set1_ps(s1));
    tables[(k - k0) / 2] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
}

// Decodes panel columns [n0, n0+64) x reduction [k0, k1) into Pb (layout above). Per-OC: raw
// codes; per-IC: dequantised, with tables[tile][kp] built by the caller.
void decode_panel(const GemmArgs& a, const DecodeConsts& c, int64_t n0, int64_t k0, int64_t k1,
                  const __m512i* const ic_tables[4], uint32_t* Pb) {
  const QuantParams& p = a.p;
  const int64_t KB = p.K / 32;
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(a.qweight);
  const bool per_ic = p.axis == GroupAxis::kPerIC;
  for (int64_t tt = 0; tt < 4; ++tt) {
    const int64_t t = n0 / kTileRows + tt;
    uint32_t* Pt = Pb + tt * kTileRows;
    if (t >= p.row_tiles()) {
      for (int64_t kp = 0; kp < (k1 - k0) / 2; ++kp) _mm512_store_si512(Pt + kp * 64, _mm512_setzero_si512());
      continue;
    }
    for (int64_t kb = k0 / 32; kb < k1 / 32; ++kb) {
      __m512i T[4];
      transpose_block(c, qw + (t * KB + kb) * p.bits * kTileRows, p.bits, T);
      uint32_t* dst = Pt + (kb * 32 - k0) / 2 * 64;
      const __m512i* tab = per_ic ? ic_tables[tt] + (kb * 32 - k0) / 2 : nullptr;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const __m512i codes = pair_codes(c, T, j);
        __m512i v;
        if (per_ic) {
          // (codes & 15) | odd-word bit 4, then the pair's table.
          v = _mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(codes, c.low_nibble, c.odd_word, 0xea), tab[j]);
        } else {
          v = _mm512_permutexvar_epi16(codes, c.code_table);
        }
        _mm512_store_si512(dst + j * 64, v);
      }
    }
  }
}

// ---- micro-kernel -------------------------------------------------------------------------------

// C[ROWS][64] += A · Pb[KP][64] (bf16 pairs, fp32 accumulation), A packed as [KP][kMR] bf16 pairs
// (one row block of the packed activations). SCALED: the sum is taken over one per-OC group and
// added as s·(acc − z·xs[m]) with s, z per column.
template <int ROWS, bool SCALED>
void microkernel(const uint32_t* A, const uint32_t* Pb, int64_t KP, float* C,
                 const float* s, const float* z, const float* xs, int64_t xs_stride) {
  __m512 acc[ROWS][4];
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint32_t* pr = Pb + kp * 64;
    const __m512bh b0 = (__m512bh)_mm512_load_si512(pr), b1 = (__m512bh)_mm512_load_si512(pr + 16);
    const __m512bh b2 = (__m512bh)_mm512_load_si512(pr + 32), b3 = (__m512bh)_mm512_load_si512(pr + 48);
    const uint32_t* ar = A + kp * kMR;
#pragma GCC unroll 8
    for (int m = 0; m < ROWS; ++m) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(ar[m]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, b1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], av, b2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], av, b3);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < ROWS; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      float* c = C + m * 64 + j * 16;
      if (SCALED) {
        const __m512 t = _mm512_fnmadd_ps(_mm512_load_ps(z + 16 * j), _mm512_set1_ps(xs[m * xs_stride]), acc[m][j]);
        _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_load_ps(s + 16 * j), t, _mm512_loadu_ps(c)));
      } else {
        _mm512_storeu_ps(c, _mm512_add_ps(acc[m][j], _mm512_loadu_ps(c)));
      }
    }
}

template <bool SCALED>
void microkernel_rows(const uint32_t* A, int64_t rows, const uint32_t* Pb, int64_t KP,
                      float* C, const float* s, const float* z, const float* xs, int64_t xs_stride) {
  switch (rows) {
    case 6: microkernel<6, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
    case 5: microkernel<5, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
    case 4: microkernel<4, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
    case 3: microkernel<3, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
    case 2: microkernel<2, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
    default: microkernel<1, SCALED>(A, Pb, KP, C, s, z, xs, xs_stride); break;
  }
}

// ---- driver -------------------------------------------------------------------------------------

// Activations [M, K] (fp32 or bf16, row stride ldx) -> bf16 (RNE), packed for the micro-kernel:
// [K-chunk of kPanelDepth][row block of kMR rows][pair in the chunk][kMR] bf16 pairs, rows past
// M zero. One panel's pass over all rows then streams memory in order (the prefetcher keeps up
// at large M), and rows K·2 bytes apart never alias in the cache.
// Per-OC also gets xs[m][g] = Σ over group g of the rounded activations (fp32).
void pack_activations(const GemmArgs& a, uint32_t* xp, float* xs, const ParallelFor& pf) {
  const int64_t K = a.p.K, MB = (a.M + kMR - 1) / kMR, CKP = kPanelDepth / 2;
  const int64_t group = a.p.group, G = xs ? K / group : 0;
  pf(MB, 1, [&](int64_t mb0, int64_t mb1) {
    alignas(64) uint16_t row[32];
    for (int64_t mb = mb0; mb < mb1; ++mb) {
      for (int64_t r = 0; r < kMR; ++r) {
        const int64_t m = mb * kMR + r;
        if (m >= a.M) {
          for (int64_t kp = 0; kp < K / 2; ++kp) xp[((kp / CKP * MB + mb) * CKP + kp % CKP) * kMR + r] = 0;
          continue;
        }
        __m512 gacc = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {  // K % 32 == 0
          __m512i h;
          if (a.act_type == FloatType::kBF16) {
            h = _mm512_loadu_si512(static_cast<const uint16_t*>(a.x) + m * a.ldx + k);
          } else {
            const float* src = static_cast<const float*>(a.x) + m * a.ldx + k;
            h = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
          }
          _mm512_store_si512(row, h);
          const uint32_t* pairs = reinterpret_cast<const uint32_t*>(row);
          uint32_t* dst = xp + ((k / kPanelDepth * MB + mb) * CKP + (k % kPanelDepth) / 2) * kMR + r;
          for (int i = 0; i < 16; ++i) dst[i * kMR] = pairs[i];
          if (xs) {
            const __m512i lo = _mm512_slli_epi32(h, 16), hi = _mm512_and_si512(h, _mm512_set1_epi32(-65536));
            gacc = _mm512_add_ps(gacc, _mm512_add_ps(_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi)));
            if ((k + 32) % group == 0) {
              xs[m * G + k / group] = _mm512_reduce_add_ps(gacc);
              gacc = _mm512_setzero_ps();
            }
          }
        }
      }
    }
  });
}

void store_panel(const GemmArgs& a, const float* C, int64_t n0) {
  const int64_t cols = std::min(kPanelCols, a.p.N - n0);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t c = 0; c < cols; ++c) {
      float v = C[m * kPanelCols + c];
      if (a.bias) v += load_float(a.bias, n0 + c, a.act_type);
      store_float(a.y, m * a.p.N + n0 + c, a.act_type, v);
    }
}

void gemm_bf16_tile_path(const GemmArgs& a, const ParallelFor& pf) {
  const QuantParams& p = a.p;
  const int64_t M = a.M, K = p.K;
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const int64_t G = p.groups_per_line();
  const int64_t MB = (M + kMR - 1) / kMR, CKP = kPanelDepth / 2;
  const int64_t chunks = (K + kPanelDepth - 1) / kPanelDepth;
  Aligned xp(chunks * MB * CKP * kMR * 4), xs(per_oc ? M * G * 4 : 0);
  // The packed activations of rows [m, m+kMR) from reduction index k (inside one chunk).
  auto a_block = [&](int64_t m, int64_t k) {
    return xp.as<uint32_t>() + ((k / kPanelDepth * MB + m / kMR) * CKP + (k % kPanelDepth) / 2) * kMR;
  };
  pack_activations(a, xp.as<uint32_t>(), per_oc ? xs.as<float>() : nullptr, pf);
  static const DecodeConsts consts = make_decode_consts();
  const int64_t panels = (p.N + kPanelCols - 1) / kPanelCols;
  pf(panels, 1, [&](int64_t b0, int64_t b1) {
    Aligned Pb(kPanelDepth / 2 * kPanelCols * 4), C(M * kPanelCols * 4);
    // Per-OC groups longer than a panel's depth accumulate their raw sums here first.
    const bool long_groups = per_oc && p.group > kPanelDepth;
    Aligned Craw(long_groups ? M * kPanelCols * 4 : 0);
    Aligned tables(per_oc ? 0 : 2 * (kPanelDepth / 2) * 64);  // at most 2 groups per panel
    alignas(64) float s[kPanelCols], z[kPanelCols];
    float* Cp = C.as<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kPanelCols;
      std::memset(Cp, 0, static_cast<size_t>(M * kPanelCols) * 4);
      if (long_groups) std::memset(Craw.ptr, 0, static_cast<size_t>(M * kPanelCols) * 4);
      for (int64_t k0 = 0; k0 < K; k0 += kPanelDepth) {
        const int64_t k1 = std::min(K, k0 + kPanelDepth);
        const __m512i* tab[4] = {nullptr, nullptr, nullptr, nullptr};
        if (!per_oc) {
          // Tiles of one group share its tables; a 64-row panel spans at most 2 groups (g >= 32).
          int64_t built[2] = {-1, -1};
          for (int tt = 0; tt < 4; ++tt) {
            const int64_t t = n0 / kTileRows + tt;
            if (t >= p.row_tiles()) break;
            const int64_t gr = t * kTileRows / p.group;
            int slot = built[0] == gr ? 0 : built[1] == gr ? 1 : -1;
            if (slot < 0) {
              slot = built[0] < 0 ? 0 : 1;
              built[slot] = gr;
              build_ic_tables(a, gr, k0, k1, tables.as<__m512i>() + slot * (kPanelDepth / 2));
            }
            tab[tt] = tables.as<__m512i>() + slot * (kPanelDepth / 2);
          }
        }
        decode_panel(a, consts, n0, k0, k1, tab, Pb.as<uint32_t>());
        if (!per_oc) {
          for (int64_t m = 0; m < M; m += kMR)
            microkernel_rows<false>(a_block(m, k0), std::min(kMR, M - m),
                                    Pb.as<uint32_t>(), (k1 - k0) / 2, Cp + m * kPanelCols,
                                    nullptr, nullptr, nullptr, 0);
          continue;
        }
        // Per-OC: one call per group segment inside [k0, k1).
        for (int64_t ks = k0; ks < k1;) {
          const int64_t g = ks / p.group;
          const int64_t ke = std::min(k1, (g + 1) * p.group);
          for (int tt = 0; tt < 4; ++tt) {
            const int64_t t = n0 / kTileRows + tt;
            if (t < p.row_tiles()) {
              const int64_t si = (t * G + g) * kTileRows;
              _mm512_store_ps(s + 16 * tt, load16_float(a.scales, si, p.scale_type));
              _mm512_store_ps(z + 16 * tt, p.symmetric ? _mm512_set1_ps(static_cast<float>(p.sym_zero()))
                                                       : load16_zeros(a.zeros + si));
            } else {
              _mm512_store_ps(s + 16 * tt, _mm512_setzero_ps());
              _mm512_store_ps(z + 16 * tt, _mm512_setzero_ps());
            }
          }
          const uint32_t* P0 = Pb.as<uint32_t>() + (ks - k0) / 2 * kPanelCols;
          const float* xsg = xs.as<float>() + g;
          if (!long_groups) {
            for (int64_t m = 0; m < M; m += kMR)
              microkernel_rows<true>(a_block(m, ks), std::min(kMR, M - m), P0,
                                     (ke - ks) / 2, Cp + m * kPanelCols, s, z, xsg + m * G, G);
          } else {
            float* R = Craw.as<float>();
            for (int64_t m = 0; m < M; m += kMR)
              microkernel_rows<false>(a_block(m, ks), std::min(kMR, M - m), P0,
                                      (ke - ks) / 2, R + m * kPanelCols, nullptr, nullptr, nullptr, 0);
            if (ke == (g + 1) * p.group) {  // group complete: C += s·(raw − z·Σx), raw = 0
              for (int64_t m = 0; m < M; ++m)
                for (int j = 0; j < 4; ++j) {
                  float* r = R + m * kPanelCols + 16 * j;
                  float* c = Cp + m * kPanelCols + 16 * j;
                  const __m512 t = _mm512_fnmadd_ps(_mm512_load_ps(z + 16 * j), _mm512_set1_ps(xsg[m * G]), _mm512_loadu_ps(r));
                  _mm512_storeu_ps(c, _mm512_fmadd_ps(_mm512_load_ps(s + 16 * j), t, _mm512_loadu_ps(c)));
                  _mm512_storeu_ps(r, _mm512_setzero_ps());
                }
            }
          }
          ks = ke;
        }
      }
      store_panel(a, Cp, n0);
    }
  });
}

}  // namespace

// The exact AVX-512 variant keeps: small M (its table-lookup path reads only the packed weight),
// fp16 activations (rounding them to bf16 would lose 3 bits the caller asked for), 8-bit weights
// (256 codes exceed one vpermw table) and the transposed product (the input gradient).
void gemm_avx512bf16(const GemmArgs& a, const ParallelFor& pf) {
  if (a.act_type == FloatType::kF16 || a.p.bits > 4 || a.M <= bf16_variant_lut_max_m(a.p.bits)) {
    gemm_avx512(a, pf);
    return;
  }
  gemm_bf16_tile_path(a, pf);
}
void gemm_t_avx512bf16(const GemmArgs& a, const ParallelFor& pf) { gemm_t_avx512(a, pf); }

}  // namespace layerpress
