// AVX-512 CPU norm kernels for fp32/bf16/fp16 elements (fp64 goes to the portable kernels).
// Compiled with AVX-512 flags, chosen at run time (norm_cpu_generic.cpp). Per row: one pass for
// the statistics in fp32 (LayerNorm: mean, then the centred sum of squares re-read from cache),
// one pass writing the output. Tails use masked loads/stores, so any hidden size works.
// Large outputs with 64-byte aligned rows are written with non-temporal stores (they would
// only evict the input from the cache).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "layerpress/norm_kernels.h"

namespace layerpress {
namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

struct F32V {
  using T = float;
  static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static void store(T* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
  static void stream(T* p, __m512 v) { _mm512_stream_ps(p, v); }
  static __m512 round(__m512 v) { return v; }
};

inline __m512i bf16_bits(__m512 v) {  // round to nearest even, NaN kept quiet; result in low 16 bits
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_srli_epi32(r, 16);
}

struct BF16V {
  using T = uint16_t;
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(const T* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
  static void store(T* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_bits(v))); }
  static void stream(T* p, __m512 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
  static __m512 round(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
};

struct F16V {
  using T = uint16_t;
  static constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  static __m512 load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, kRound));
  }
  static void store(T* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, kRound)); }
  static void stream(T* p, __m512 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, kRound));
  }
  static __m512 round(__m512 v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, kRound)); }
};

// Bytes of output above which the non-temporal path is used (LAYERPRESS_NORM_STREAM_BYTES
// overrides it; -1 disables streaming stores).
int64_t stream_bytes() {  // read at every call (one getenv per op call), so tests can set it
  const char* e = std::getenv("LAYERPRESS_NORM_STREAM_BYTES");
  return e ? std::atoll(e) : (int64_t{64} << 20);
}

template <class V>
void forward_rows(const NormFwdArgs& a, int64_t r0, int64_t r1, bool nt) {
  using T = typename V::T;
  const int64_t C = a.cols;
  const int64_t Cv = C & ~int64_t{15};
  const __mmask16 mt = tail_mask(C - Cv);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = static_cast<const T*>(a.x) + r * a.x_stride;
    __m512 s0 = zero, s1 = zero;
    float mean = 0.f;
    if (a.residual) {
      const T* res = static_cast<const T*>(a.residual) + r * a.res_stride;
      T* h = static_cast<T*>(a.h) + r * C;
      for (int64_t c = 0; c < Cv; c += 16) {
        const __m512 v = V::round(_mm512_add_ps(V::load(src + c), V::load(res + c)));
        V::store(h + c, v);
        if (a.center) s0 = _mm512_add_ps(s0, v);
        else s0 = _mm512_fmadd_ps(v, v, s0);
      }
      if (Cv < C) {
        const __m512 v = V::round(_mm512_add_ps(V::load(src + Cv, mt), V::load(res + Cv, mt)));
        V::store(h + Cv, v, mt);
        if (a.center) s0 = _mm512_add_ps(s0, v);
        else s0 = _mm512_fmadd_ps(v, v, s0);
      }
      src = h;
    } else {
      int64_t c = 0;
      if (a.center) {
        for (; c + 32 <= Cv; c += 32) {
          s0 = _mm512_add_ps(s0, V::load(src + c));
          s1 = _mm512_add_ps(s1, V::load(src + c + 16));
        }
        for (; c < Cv; c += 16) s0 = _mm512_add_ps(s0, V::load(src + c));
        if (Cv < C) s0 = _mm512_add_ps(s0, V::load(src + Cv, mt));
      } else {
        for (; c + 32 <= Cv; c += 32) {
          const __m512 v0 = V::load(src + c), v1 = V::load(src + c + 16);
          s0 = _mm512_fmadd_ps(v0, v0, s0);
          s1 = _mm512_fmadd_ps(v1, v1, s1);
        }
        for (; c < Cv; c += 16) {
          const __m512 v = V::load(src + c);
          s0 = _mm512_fmadd_ps(v, v, s0);
        }
        if (Cv < C) {
          const __m512 v = V::load(src + Cv, mt);
          s0 = _mm512_fmadd_ps(v, v, s0);
        }
      }
    }
    float ss;
    if (a.center) {
      mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / static_cast<float>(C);
      const __m512 mv = _mm512_set1_ps(mean);
      __m512 q0 = zero, q1 = zero;
      int64_t c = 0;
      for (; c + 32 <= Cv; c += 32) {
        const __m512 d0 = _mm512_sub_ps(V::load(src + c), mv), d1 = _mm512_sub_ps(V::load(src + c + 16), mv);
        q0 = _mm512_fmadd_ps(d0, d0, q0);
        q1 = _mm512_fmadd_ps(d1, d1, q1);
      }
      for (; c < Cv; c += 16) {
        const __m512 d = _mm512_sub_ps(V::load(src + c), mv);
        q0 = _mm512_fmadd_ps(d, d, q0);
      }
      if (Cv < C) {
        const __m512 d = _mm512_maskz_sub_ps(mt, V::load(src + Cv, mt), mv);
        q0 = _mm512_fmadd_ps(d, d, q0);
      }
      ss = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1));
    } else {
      ss = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(a.eps));
    static_cast<float*>(a.rstd)[r] = rstd;
    if (a.center) static_cast<float*>(a.mean)[r] = mean;
    T* y = static_cast<T*>(a.y) + r * C;
    const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
    auto out = [&](int64_t c, __m512 v, __mmask16 m) {
      v = _mm512_mul_ps(_mm512_sub_ps(v, mv), rv);
      const __m512 wv = w ? V::load(w + c, m) : one;
      v = b ? _mm512_fmadd_ps(v, wv, V::load(b + c, m)) : _mm512_mul_ps(v, wv);
      return v;
    };
    if (nt) {
      for (int64_t c = 0; c < Cv; c += 16) V::stream(y + c, out(c, V::load(src + c), 0xffff));
    } else {
      for (int64_t c = 0; c < Cv; c += 16) V::store(y + c, out(c, V::load(src + c), 0xffff));
    }
    if (Cv < C) V::store(y + Cv, out(Cv, V::load(src + Cv, mt), mt), mt);
  }
}

template <class V>
void forward_t(const NormFwdArgs& a, const ParallelFor& pf) {
  const int64_t row_bytes = a.cols * static_cast<int64_t>(sizeof(typename V::T));
  const bool nt = row_bytes % 64 == 0 && (reinterpret_cast<uintptr_t>(a.y) & 63) == 0 &&
                  stream_bytes() >= 0 && a.rows * row_bytes >= stream_bytes();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.cols));
  pf(a.rows, grain, [&](int64_t r0, int64_t r1) { forward_rows<V>(a, r0, r1, nt); });
  if (nt) _mm_sfence();
}

template <class V>
void backward_t(const NormBwdArgs& a, const ParallelFor& pf) {
  using T = typename V::T;
  const int64_t C = a.cols, R = a.rows;
  const int64_t Cv = C & ~int64_t{15};
  const __mmask16 mt = tail_mask(C - Cv);
  const T* w = static_cast<const T*>(a.weight);
  const bool want_w = a.grad_weight != nullptr, want_b = a.grad_bias != nullptr;
  const int64_t nb = (want_w || want_b) ? norm_row_blocks(R, C) : std::min<int64_t>(R, 256);
  const int64_t Cp = (C + 15) & ~int64_t{15};  // partial rows padded so masked tails stay inside
  std::vector<float> pw(want_w ? nb * Cp : 0, 0.f), pb(want_b ? nb * Cp : 0, 0.f);
  const float invC = 1.f / static_cast<float>(C);
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  pf(nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw = want_w ? pw.data() + blk * Cp : nullptr;
      float* db = want_b ? pb.data() + blk * Cp : nullptr;
      const int64_t r0 = R * blk / nb, r1 = R * (blk + 1) / nb;
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
        const T* g = static_cast<const T*>(a.grad_y) + r * a.gy_stride;
        const float rstd = static_cast<const float*>(a.rstd)[r];
        const float mean = a.center ? static_cast<const float*>(a.mean)[r] : 0.f;
        const __m512 mv = _mm512_set1_ps(mean), rv = _mm512_set1_ps(rstd);
        __m512 s1 = zero, s2 = zero;
        auto stats = [&](int64_t c, __mmask16 m) {
          const __m512 gw = _mm512_mul_ps(V::load(g + c, m), w ? V::load(w + c, m) : one);
          const __m512 xh = _mm512_maskz_mul_ps(m, _mm512_sub_ps(V::load(x + c, m), mv), rv);
          s1 = _mm512_add_ps(s1, gw);
          s2 = _mm512_fmadd_ps(gw, xh, s2);
        };
        for (int64_t c = 0; c < Cv; c += 16) stats(c, 0xffff);
        if (Cv < C) stats(Cv, mt);
        const __m512 m1 = _mm512_set1_ps(a.center ? _mm512_reduce_add_ps(s1) * invC : 0.f);
        const __m512 m2 = _mm512_set1_ps(_mm512_reduce_add_ps(s2) * invC);
        T* dx = static_cast<T*>(a.grad_x) + r * C;
        const T* gh = a.grad_h ? static_cast<const T*>(a.grad_h) + r * a.gh_stride : nullptr;
        auto grad = [&](int64_t c, __mmask16 m) {
          const __m512 gv = V::load(g + c, m);
          const __m512 gw = _mm512_mul_ps(gv, w ? V::load(w + c, m) : one);
          const __m512 xh = _mm512_maskz_mul_ps(m, _mm512_sub_ps(V::load(x + c, m), mv), rv);
          __m512 v = _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(gw, m1), _mm512_mul_ps(xh, m2)));
          if (gh) v = _mm512_add_ps(v, V::load(gh + c, m));
          V::store(dx + c, v, m);
          if (dw) _mm512_storeu_ps(dw + c, _mm512_fmadd_ps(gv, xh, _mm512_loadu_ps(dw + c)));
          if (db) _mm512_storeu_ps(db + c, _mm512_add_ps(gv, _mm512_loadu_ps(db + c)));
        };
        for (int64_t c = 0; c < Cv; c += 16) grad(c, 0xffff);
        if (Cv < C) grad(Cv, mt);
      }
    }
  });
  if (want_w || want_b) {
    pf((Cp / 16), 16, [&](int64_t c0, int64_t c1) {
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t c = cb * 16;
        const __mmask16 m = tail_mask(C - c);
        if (want_w) {
          __m512 s = zero;
          for (int64_t blk = 0; blk < nb; ++blk) s = _mm512_add_ps(s, _mm512_loadu_ps(pw.data() + blk * Cp + c));
          V::store(static_cast<T*>(a.grad_weight) + c, s, m);
        }
        if (want_b) {
          __m512 s = zero;
          for (int64_t blk = 0; blk < nb; ++blk) s = _mm512_add_ps(s, _mm512_loadu_ps(pb.data() + blk * Cp + c));
          V::store(static_cast<T*>(a.grad_bias) + c, s, m);
        }
      }
    });
  }
}

}  // namespace

void norm_forward_avx512(const NormFwdArgs& a, const ParallelFor& pf) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.type) {
    case NormType::kF32: forward_t<F32V>(a, pf); break;
    case NormType::kBF16: forward_t<BF16V>(a, pf); break;
    case NormType::kF16: forward_t<F16V>(a, pf); break;
    default: norm_forward_generic(a, pf); break;
  }
}

void norm_backward_avx512(const NormBwdArgs& a, const ParallelFor& pf) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.type) {
    case NormType::kF32: backward_t<F32V>(a, pf); break;
    case NormType::kBF16: backward_t<BF16V>(a, pf); break;
    case NormType::kF16: backward_t<F16V>(a, pf); break;
    default: norm_backward_generic(a, pf); break;
  }
}

}  // namespace layerpress
