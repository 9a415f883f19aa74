// Portable CPU Walsh–Hadamard transform (any element type, fp64 included) and the run-time choice
// of the CPU variant. In-place radix-2 butterflies on one block at a time in an fp32 (fp64)
// buffer; the AVX2/AVX-512 variants (hadamard_cpu_simd.inc) do the same in registers.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "layerpress/hadamard_kernels.h"

namespace layerpress {
namespace {

#include "cpu_elem.inc"

template <typename Acc>
void fwht(Acc* v, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const Acc a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

template <typename T>
void run_t(const HadamardArgs& a, const ParallelFor& pf) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t B = a.block, C = a.cols;
  const Acc scale = static_cast<Acc>(1.0 / std::sqrt(static_cast<double>(B)));
  pf(a.rows, hadamard_row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<Acc> buf(B);
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
      T* y = static_cast<T*>(a.y) + r * a.y_stride;
      for (int64_t c0 = 0; c0 < C; c0 += B) {
        const float* s = a.signs ? a.signs + c0 : nullptr;
        for (int64_t i = 0; i < B; ++i) {
          Acc v = E::ld(x[c0 + i]) * scale;
          if (s && !a.transpose) v *= static_cast<Acc>(s[i]);
          buf[i] = v;
        }
        fwht(buf.data(), B);
        for (int64_t i = 0; i < B; ++i) {
          Acc v = buf[i];
          if (s && a.transpose) v *= static_cast<Acc>(s[i]);
          y[c0 + i] = E::st(v);
        }
      }
    }
  });
}

bool always() { return true; }
// The SIMD variants also convert fp16 with F16C.
bool has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}
bool avx2_f16c() { return cpu_has_avx2() && has_f16c(); }
bool avx512_f16c() { return cpu_has_avx512() && has_f16c(); }

}  // namespace

void hadamard_generic(const HadamardArgs& a, const ParallelFor& pf) {
  if (a.rows == 0 || a.cols == 0) return;
  switch (a.type) {
    case NormType::kF32: run_t<float>(a, pf); break;
    case NormType::kF64: run_t<double>(a, pf); break;
    case NormType::kBF16: run_t<BF16>(a, pf); break;
    case NormType::kF16: run_t<F16>(a, pf); break;
  }
}

const std::vector<CpuHadamardVariant>& cpu_hadamard_variants() {
  static const std::vector<CpuHadamardVariant> v = {
      {"generic", always, hadamard_generic},
      {"avx2", avx2_f16c, hadamard_avx2},
      {"avx512", avx512_f16c, hadamard_avx512},
  };
  return v;
}

const CpuHadamardVariant& cpu_hadamard_active() {
  const auto& v = cpu_hadamard_variants();
  static const int automatic = [&] {
    for (int i = static_cast<int>(v.size()) - 1; i >= 0; --i)
      if (v[i].supported()) return i;
    return 0;
  }();
  if (const char* env = std::getenv("LAYERPRESS_CPU_HADAMARD_KERNEL")) {
    for (const auto& k : v)
      if (std::strcmp(env, k.name) == 0 && k.supported()) return k;
  }
  return v[automatic];
}

}  // namespace layerpress
