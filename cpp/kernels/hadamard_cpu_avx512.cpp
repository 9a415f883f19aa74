// AVX-512 Walsh–Hadamard transform (16 fp32 lanes; blocks up to 256 columns in registers).
// Compiled with AVX-512 flags, chosen at run time (hadamard_cpu_generic.cpp).
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "layerpress/hadamard_kernels.h"

namespace layerpress {
namespace {

struct V {
  using vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRegVecs = 16;
  static vec set1(float f) { return _mm512_set1_ps(f); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec partner(vec v, int h) {
    switch (h) {
      case 1: return _mm512_permute_ps(v, 0xB1);
      case 2: return _mm512_permute_ps(v, 0x4E);
      case 4: return _mm512_shuffle_f32x4(v, v, 0xB1);  // swap neighbouring 128-bit chunks
      default: return _mm512_shuffle_f32x4(v, v, 0x4E);  // swap 256-bit halves
    }
  }
  static vec lane_sign(int h) {
    alignas(64) float s[16];
    for (int i = 0; i < 16; ++i) s[i] = (i & h) ? -1.f : 1.f;
    return _mm512_load_ps(s);
  }
};

inline __m256i bf16_bits(__m512 v) {  // round to nearest even, NaN kept quiet
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

struct IoF32 {
  using T = float;
  static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
};
struct IoBF16 {
  using T = uint16_t;
  static __m512 load(const T* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(T* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(v)); }
};
struct IoF16 {
  using T = uint16_t;
  static __m512 load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

#include "hadamard_cpu_simd.inc"

}  // namespace

void hadamard_avx512(const HadamardArgs& a, const ParallelFor& pf) { run_simd(a, pf); }

}  // namespace layerpress
