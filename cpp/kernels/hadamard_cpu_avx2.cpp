// AVX2 Walsh–Hadamard transform (8 fp32 lanes; blocks up to 64 columns in registers).
// Compiled with AVX2/FMA/F16C flags, chosen at run time (hadamard_cpu_generic.cpp).
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "layerpress/hadamard_kernels.h"

namespace layerpress {
namespace {

struct V {
  using vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxRegVecs = 8;  // 16 ymm registers: the block, constants, temporaries
  static vec set1(float f) { return _mm256_set1_ps(f); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec partner(vec v, int h) {
    switch (h) {
      case 1: return _mm256_permute_ps(v, 0xB1);
      case 2: return _mm256_permute_ps(v, 0x4E);
      default: return _mm256_permute2f128_ps(v, v, 0x01);  // swap 128-bit halves
    }
  }
  static vec lane_sign(int h) {
    alignas(32) float s[8];
    for (int i = 0; i < 8; ++i) s[i] = (i & h) ? -1.f : 1.f;
    return _mm256_load_ps(s);
  }
};

inline __m128i bf16_bits(__m256 v) {  // round to nearest even, NaN kept quiet
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  const __m256i packed = _mm256_packus_epi32(r, r);  // [r0..3 r0..3 | r4..7 r4..7]
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

struct IoF32 {
  using T = float;
  static __m256 load(const T* p) { return _mm256_loadu_ps(p); }
  static void store(T* p, __m256 v) { _mm256_storeu_ps(p, v); }
};
struct IoBF16 {
  using T = uint16_t;
  static __m256 load(const T* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(T* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits(v)); }
};
struct IoF16 {
  using T = uint16_t;
  static __m256 load(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(T* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

#include "hadamard_cpu_simd.inc"

}  // namespace

void hadamard_avx2(const HadamardArgs& a, const ParallelFor& pf) { run_simd(a, pf); }

}  // namespace layerpress
