// Portable CPU norm kernels (any element type, fp64 included) and the run-time choice of the
// CPU norm variant. Scalar code with several independent accumulators so the compiler can
// vectorise the reductions without reassociation flags.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "layerpress/norm_kernels.h"

namespace layerpress {
namespace {

#include "cpu_elem.inc"

constexpr int kLanes = 8;

template <typename T>
void forward_rows(const NormFwdArgs& a, int64_t r0, int64_t r1) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t C = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = static_cast<const T*>(a.x) + r * a.x_stride;
    if (a.residual) {
      const T* res = static_cast<const T*>(a.residual) + r * a.res_stride;
      T* h = static_cast<T*>(a.h) + r * C;
      for (int64_t c = 0; c < C; ++c) h[c] = E::st(E::ld(src[c]) + E::ld(res[c]));
      src = h;
    }
    Acc mean = 0;
    if (a.center) {
      Acc s[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes)
        for (int l = 0; l < kLanes; ++l) s[l] += E::ld(src[c + l]);
      Acc tot = 0;
      for (; c < C; ++c) tot += E::ld(src[c]);
      for (int l = 0; l < kLanes; ++l) tot += s[l];
      mean = tot / static_cast<Acc>(C);
    }
    Acc q[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const Acc d = E::ld(src[c + l]) - mean;
        q[l] += d * d;
      }
    Acc tot = 0;
    for (; c < C; ++c) {
      const Acc d = E::ld(src[c]) - mean;
      tot += d * d;
    }
    for (int l = 0; l < kLanes; ++l) tot += q[l];
    const Acc rstd = static_cast<Acc>(1) / std::sqrt(tot / static_cast<Acc>(C) + static_cast<Acc>(a.eps));
    static_cast<Acc*>(a.rstd)[r] = rstd;
    if (a.center) static_cast<Acc*>(a.mean)[r] = mean;
    T* y = static_cast<T*>(a.y) + r * C;
    for (int64_t k = 0; k < C; ++k) {
      Acc v = (E::ld(src[k]) - mean) * rstd;
      if (w) v *= E::ld(w[k]);
      if (b) v += E::ld(b[k]);
      y[k] = E::st(v);
    }
  }
}

template <typename T>
void forward_t(const NormFwdArgs& a, const ParallelFor& pf) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.cols));
  pf(a.rows, grain, [&](int64_t r0, int64_t r1) { forward_rows<T>(a, r0, r1); });
}

template <typename T>
void backward_t(const NormBwdArgs& a, const ParallelFor& pf) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t C = a.cols, R = a.rows;
  const T* w = static_cast<const T*>(a.weight);
  const bool want_w = a.grad_weight != nullptr, want_b = a.grad_bias != nullptr;
  const int64_t nb = (want_w || want_b) ? norm_row_blocks(R, C) : std::min<int64_t>(R, 256);
  std::vector<Acc> pw(want_w ? nb * C : 0, Acc(0)), pb(want_b ? nb * C : 0, Acc(0));
  const Acc invC = static_cast<Acc>(1) / static_cast<Acc>(C);
  pf(nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      Acc* dw = want_w ? pw.data() + blk * C : nullptr;
      Acc* db = want_b ? pb.data() + blk * C : nullptr;
      const int64_t r0 = R * blk / nb, r1 = R * (blk + 1) / nb;
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
        const T* g = static_cast<const T*>(a.grad_y) + r * a.gy_stride;
        const Acc rstd = static_cast<const Acc*>(a.rstd)[r];
        const Acc mean = a.center ? static_cast<const Acc*>(a.mean)[r] : Acc(0);
        Acc s1 = 0, s2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const Acc gw = E::ld(g[c]) * (w ? E::ld(w[c]) : Acc(1));
          const Acc xh = (E::ld(x[c]) - mean) * rstd;
          s1 += gw;
          s2 += gw * xh;
        }
        const Acc m1 = a.center ? s1 * invC : Acc(0), m2 = s2 * invC;
        T* dx = static_cast<T*>(a.grad_x) + r * C;
        const T* gh = a.grad_h ? static_cast<const T*>(a.grad_h) + r * a.gh_stride : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const Acc gv = E::ld(g[c]);
          const Acc gw = gv * (w ? E::ld(w[c]) : Acc(1));
          const Acc xh = (E::ld(x[c]) - mean) * rstd;
          Acc v = rstd * (gw - m1 - xh * m2);
          if (gh) v += E::ld(gh[c]);
          dx[c] = E::st(v);
          if (dw) dw[c] += gv * xh;
          if (db) db[c] += gv;
        }
      }
    }
  });
  if (want_w || want_b) {
    pf(C, 256, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        if (want_w) {
          Acc s = 0;
          for (int64_t blk = 0; blk < nb; ++blk) s += pw[blk * C + c];
          static_cast<T*>(a.grad_weight)[c] = E::st(s);
        }
        if (want_b) {
          Acc s = 0;
          for (int64_t blk = 0; blk < nb; ++blk) s += pb[blk * C + c];
          static_cast<T*>(a.grad_bias)[c] = E::st(s);
        }
      }
    });
  }
}

bool always() { return true; }
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace

void norm_forward_generic(const NormFwdArgs& a, const ParallelFor& pf) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.type) {
    case NormType::kF32: forward_t<float>(a, pf); break;
    case NormType::kF64: forward_t<double>(a, pf); break;
    case NormType::kBF16: forward_t<BF16>(a, pf); break;
    case NormType::kF16: forward_t<F16>(a, pf); break;
  }
}

void norm_backward_generic(const NormBwdArgs& a, const ParallelFor& pf) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.type) {
    case NormType::kF32: backward_t<float>(a, pf); break;
    case NormType::kF64: backward_t<double>(a, pf); break;
    case NormType::kBF16: backward_t<BF16>(a, pf); break;
    case NormType::kF16: backward_t<F16>(a, pf); break;
  }
}

const std::vector<CpuNormVariant>& cpu_norm_variants() {
  static const std::vector<CpuNormVariant> v = {
      {"generic", always, norm_forward_generic, norm_backward_generic},
      {"avx512", has_avx512, norm_forward_avx512, norm_backward_avx512},
  };
  return v;
}

const CpuNormVariant& cpu_norm_active() {
  const auto& v = cpu_norm_variants();
  static const int automatic = [&] {
    for (int i = static_cast<int>(v.size()) - 1; i >= 0; --i)
      if (v[i].supported()) return i;
    return 0;
  }();
  if (const char* env = std::getenv("LAYERPRESS_CPU_NORM_KERNEL")) {
    for (const auto& k : v)
      if (std::strcmp(env, k.name) == 0 && k.supported()) return k;
  }
  return v[automatic];
}

}  // namespace layerpress
