// WTA-CRS CPU kernels: row norms, the seeded selection draw, gather-and-scale, and the sampled
// weight-gradient GEMM with the row gather fused into its packing step.
//
// wgrad: dW[N, D] = Σ_i scale_i · G[idx_i, :]ᵀ R[i, :]. The output is cut into tasks of
// kTaskN rows × kTaskD columns. A task packs its rows of the gathered, scaled gradient once
// (fp32 panel [kTaskN/4][k][4]: the gather and the scale happen here) and, per 64-column chunk, the
// compact rows R (fp32 panel [k][64]); the micro-kernel then keeps a 4 × 64 fp32 tile of dW in 16
// vector registers and streams i = 0..k-1 (4 vector loads, 4 broadcasts, 16 FMAs per i). Packing
// costs 1/64 of the FMAs. The same source is compiled twice: for AVX-512 (target attribute,
// chosen at run time) and for the baseline ISA.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "layerpress/wtacrs_kernels.h"

namespace layerpress {
namespace {

#define LP_INLINE inline __attribute__((always_inline))
#define LP_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))

typedef float v16f __attribute__((vector_size(64)));

struct F32 { using raw = float; };
struct BF16 { using raw = uint16_t; };
struct F16 { using raw = _Float16; };

LP_INLINE float ld(const float* p, int64_t i) { return p[i]; }
LP_INLINE float ld(const uint16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
LP_INLINE float ld(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); }
LP_INLINE void st(float* p, int64_t i, float v) { p[i] = v; }
LP_INLINE void st(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
LP_INLINE void st(_Float16* p, int64_t i, float v) { p[i] = static_cast<_Float16>(v); }

template <typename Fn>
LP_INLINE void dispatch_type(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::kF32: fn(F32{}); break;
    case FloatType::kBF16: fn(BF16{}); break;
    default: fn(F16{}); break;
  }
}

// ---- row norms ------------------------------------------------------------------------------------
template <typename T>
LP_INLINE void row_norms_rows(const T* x, int64_t D, int64_t ld_, float* out, int64_t b, int64_t e) {
  for (int64_t m = b; m < e; ++m) {
    const T* row = x + m * ld_;
    float acc[16] = {};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
      for (int l = 0; l < 16; ++l) {
        const float v = ld(row, d + l);
        acc[l] += v * v;
      }
    for (; d < D; ++d) {
      const float v = ld(row, d);
      acc[0] += v * v;
    }
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[l];
    out[m] = std::sqrt(s);
  }
}

// ---- sampled weight gradient ----------------------------------------------------------------------
constexpr int kNB = 4;        // dW rows per micro tile
constexpr int kDB = 64;       // dW columns per micro tile (4 vectors of 16 floats)
constexpr int kTaskN = 64;    // dW rows per task
constexpr int kTaskD = 256;   // dW columns per task

template <typename T>
LP_INLINE void wgrad_task(const T* g, int64_t ldg, int64_t N, const T* rows, int64_t D,
                          const int64_t* idx, const float* scale, int64_t k, T* dw, int64_t n0,
                          int64_t d0, std::vector<float>& gp, std::vector<float>& rp) {
  const int64_t nn = std::min<int64_t>(kTaskN, N - n0);
  const int64_t nblocks = (nn + kNB - 1) / kNB;
  // Gathered, scaled gradient rows of this task: gp[b][i][r] = scale_i · G[idx_i, n0 + 4b + r].
  gp.assign(static_cast<size_t>(nblocks * k * kNB), 0.0f);
  for (int64_t i = 0; i < k; ++i) {
    const T* grow = g + idx[i] * ldg + n0;
    const float s = scale ? scale[i] : 1.0f;
    for (int64_t n = 0; n < nn; ++n) gp[((n / kNB) * k + i) * kNB + n % kNB] = s * ld(grow, n);
  }
  const int64_t dend = std::min<int64_t>(D, d0 + kTaskD);
  for (int64_t dc = d0; dc < dend; dc += kDB) {
    const int64_t w = std::min<int64_t>(kDB, dend - dc);
    // Compact rows, this 64-column chunk, in fp32 (zero-padded past D).
    rp.resize(static_cast<size_t>(k * kDB));
    float* rpf = rp.data();
    for (int64_t i = 0; i < k; ++i) {
      const T* r = rows + i * D + dc;
      float* o = rpf + i * kDB;
      int64_t d = 0;
      for (; d < w; ++d) o[d] = ld(r, d);
      for (; d < kDB; ++d) o[d] = 0.0f;
    }
    for (int64_t b = 0; b < nblocks; ++b) {
      v16f acc[kNB][4];
      for (int r = 0; r < kNB; ++r)
        for (int v = 0; v < 4; ++v) acc[r][v] = v16f{};
      const float* gb = gp.data() + b * k * kNB;
      const float* h = rp.data();
      for (int64_t i = 0; i < k; ++i) {
        v16f h0, h1, h2, h3;  // unaligned loads (memcpy): no alignment assumption on the panel
        std::memcpy(&h0, h + i * kDB, 64);
        std::memcpy(&h1, h + i * kDB + 16, 64);
        std::memcpy(&h2, h + i * kDB + 32, 64);
        std::memcpy(&h3, h + i * kDB + 48, 64);
        for (int r = 0; r < kNB; ++r) {
          const float gv = gb[i * kNB + r];
          acc[r][0] += gv * h0;
          acc[r][1] += gv * h1;
          acc[r][2] += gv * h2;
          acc[r][3] += gv * h3;
        }
      }
      for (int r = 0; r < kNB; ++r) {
        const int64_t n = n0 + b * kNB + r;
        if (n >= N) break;
        float tile[kDB];
        std::memcpy(tile, acc[r], sizeof(tile));
        T* out = dw + n * D + dc;
        for (int64_t d = 0; d < w; ++d) st(out, d, tile[d]);
      }
    }
  }
}

struct WgradArgs {
  const void* g;
  int64_t ldg, N;
  const void* rows;
  int64_t D;
  const int64_t* idx;
  const float* scale;
  int64_t k;
  void* dw;
  int64_t td;  // tasks along D
};
using RunTasks = void (*)(const WgradArgs&, int64_t, int64_t);

template <typename T>
LP_INLINE void run_tasks(const WgradArgs& a, int64_t b, int64_t e) {
  std::vector<float> gp, rp;
  for (int64_t t = b; t < e; ++t)
    wgrad_task<T>(static_cast<const T*>(a.g), a.ldg, a.N, static_cast<const T*>(a.rows), a.D, a.idx,
                  a.scale, a.k, static_cast<T*>(a.dw), (t / a.td) * kTaskN, (t % a.td) * kTaskD, gp, rp);
}
// The task loop is where the target attribute must sit (a lambda would not inherit it).
template <typename T>
void run_tasks_generic(const WgradArgs& a, int64_t b, int64_t e) { run_tasks<T>(a, b, e); }
template <typename T>
LP_AVX512 void run_tasks_avx512(const WgradArgs& a, int64_t b, int64_t e) { run_tasks<T>(a, b, e); }

bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace

void wtacrs_row_norms_cpu(const void* x, FloatType t, int64_t M, int64_t D, int64_t ld_, float* out,
                          const ParallelFor& pf) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  dispatch_type(t, [&](auto tag) {
    using T = typename decltype(tag)::raw;
    pf(M, grain, [&](int64_t b, int64_t e) { row_norms_rows(static_cast<const T*>(x), D, ld_, out, b, e); });
  });
}

void wtacrs_select_cpu(const double* sorted, const double* cum, const int64_t* order, int64_t M,
                       int64_t k, const int64_t* c_ptr, uint64_t seed, int64_t* idx, float* scale,
                       const ParallelFor& pf) {
  const int64_t c = *c_ptr, s = k - c;
  pf(k, 1024, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      if (j < c) {
        idx[j] = order[j];
        scale[j] = 1.0f;
      } else {
        int64_t pos;
        wtacrs_draw(sorted, cum, M, c, s, wtacrs_uniform(seed, j - c), &pos, &scale[j]);
        idx[j] = order[pos];
      }
    }
  });
}

void wtacrs_gather_scale_cpu(const void* x, FloatType t, int64_t D, int64_t ld_, const int64_t* idx,
                             const float* scale, int64_t k, void* out, const ParallelFor& pf) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  dispatch_type(t, [&](auto tag) {
    using T = typename decltype(tag)::raw;
    const T* xs = static_cast<const T*>(x);
    T* os = static_cast<T*>(out);
    pf(k, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* src = xs + idx[i] * ld_;
        T* dst = os + i * D;
        if (scale == nullptr) {
          std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(T));
        } else {
          const float sc = scale[i];
          for (int64_t d = 0; d < D; ++d) st(dst, d, sc * ld(src, d));
        }
      }
    });
  });
}

void wtacrs_wgrad_cpu(const void* g, int64_t ldg, int64_t N, const void* rows, int64_t D,
                      const int64_t* idx, const float* scale, int64_t k, FloatType t, void* dw,
                      const ParallelFor& pf) {
  if (N == 0 || D == 0) return;
  const bool wide = have_avx512();
  RunTasks fn;
  switch (t) {
    case FloatType::kF32: fn = wide ? run_tasks_avx512<float> : run_tasks_generic<float>; break;
    case FloatType::kBF16: fn = wide ? run_tasks_avx512<uint16_t> : run_tasks_generic<uint16_t>; break;
    default: fn = wide ? run_tasks_avx512<_Float16> : run_tasks_generic<_Float16>; break;
  }
  const int64_t tn = (N + kTaskN - 1) / kTaskN, td = (D + kTaskD - 1) / kTaskD;
  const WgradArgs a{g, ldg, N, rows, D, idx, scale, k, dw, td};
  if (k == 0) {  // no rows: dW = 0
    const size_t bytes = static_cast<size_t>(N * D) * float_type_size(t);
    std::memset(dw, 0, bytes);
    return;
  }
  if (tn * td == 1) {  // one task: run it here (no parallel region for a small product)
    fn(a, 0, 1);
    return;
  }
  pf(tn * td, 1, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

const char* wtacrs_wgrad_variant() { return have_avx512() ? "avx512" : "generic"; }

}  // namespace layerpress
