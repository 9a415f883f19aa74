// Run-time choice of the CPU GEMM variant: the best one this CPU supports, unless
// LAYERPRESS_CPU_KERNEL names another or cpu_gemm_select() overrides it (tests use that to run
// every variant the machine can).
#include <atomic>
#include <cstdlib>

#include "layerpress/cpu_kernels.h"

namespace layerpress {
namespace {

bool always() { return true; }
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

// The bf16 variant also needs VBMI (vpermb, vpermt2b) and GFNI (the bit-plane transpose).
bool has_avx512bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("gfni");
}

std::atomic<int> g_override{-1};

int best_index() {
  const auto& v = cpu_gemm_variants();
  if (const char* env = std::getenv("LAYERPRESS_CPU_KERNEL")) {
    for (size_t i = 0; i < v.size(); ++i)
      if (env == std::string(v[i].name) && v[i].supported()) return static_cast<int>(i);
  }
  for (int i = static_cast<int>(v.size()) - 1; i >= 0; --i)
    if (v[i].supported() && !v[i].opt_in) return i;
  return 0;
}

}  // namespace

bool cpu_has_avx2() { return has_avx2(); }
bool cpu_has_avx512() { return has_avx512(); }

const std::vector<CpuGemmVariant>& cpu_gemm_variants() {
  static const std::vector<CpuGemmVariant> v = {
      {"generic", always, gemm_generic, gemm_t_generic},
      {"avx2", has_avx2, gemm_avx2, gemm_t_avx2},
      {"avx512", has_avx512, gemm_avx512, gemm_t_avx512},
      {"avx512_bf16", has_avx512bf16, gemm_avx512bf16, gemm_t_avx512bf16},
      {"avx2_lut8", has_avx2, gemm_avx2_lut8, gemm_t_avx2, /*opt_in=*/true},
  };
  return v;
}

const CpuGemmVariant& cpu_gemm_active() {
  static const int automatic = best_index();
  const int o = g_override.load();
  return cpu_gemm_variants()[o >= 0 ? o : automatic];
}

bool cpu_gemm_select(const std::string& name) {
  if (name.empty()) {
    g_override = -1;
    return true;
  }
  const auto& v = cpu_gemm_variants();
  for (size_t i = 0; i < v.size(); ++i)
    if (name == v[i].name) {
      if (!v[i].supported()) return false;
      g_override = static_cast<int>(i);
      return true;
    }
  return false;
}

// Baseline code on purpose (the avx512_bf16 translation unit and build_info both ask): small M
// stays on the exact table-lookup path, whose work grows with M·bits, while the bf16 tile path
// pays its decode once. Crossover measured on a 2-core Zen 4 (K = 4096, N = 4096 and 11008, one
// thread): 8 rows at 2 bits, 2 at 3 and 4 bits.
int64_t bf16_variant_lut_max_m(int bits) {
  const int64_t forced = lut_max_m_override();
  return forced >= 0 ? forced : bits == 2 ? 8 : 2;
}

int64_t cpu_gemm_bf16_min_m(int bits) {
  if (std::string(cpu_gemm_active().name) != "avx512_bf16" || bits > 4) return -1;
  return bf16_variant_lut_max_m(bits) + 1;
}

int64_t cpu_gemm_int8_table_max_m(int bits) {
  if (std::string(cpu_gemm_active().name) != "avx2_lut8" || bits > 4) return -1;
  return avx2_lut8_max_m(bits);
}

int64_t lut_max_m_override() {
  static const int64_t v = [] {
    const char* e = std::getenv("LAYERPRESS_LUT_MAX_M");
    return e ? std::atoll(e) : int64_t{-1};
  }();
  return v;
}

std::vector<std::string> cpu_features() {
  __builtin_cpu_init();
  std::vector<std::string> f;
#define LP_FEATURE(x) \
  if (__builtin_cpu_supports(x)) f.push_back(x);
  LP_FEATURE("sse4.2") LP_FEATURE("avx") LP_FEATURE("avx2") LP_FEATURE("fma")
  LP_FEATURE("f16c") LP_FEATURE("avx512f") LP_FEATURE("avx512bw") LP_FEATURE("avx512vl")
  LP_FEATURE("avx512dq") LP_FEATURE("avx512vbmi") LP_FEATURE("gfni") LP_FEATURE("avx512vnni") LP_FEATURE("avx512bf16")
  LP_FEATURE("avx512fp16") LP_FEATURE("amx-tile") LP_FEATURE("amx-bf16")
#undef LP_FEATURE
  return f;
}

}  // namespace layerpress
