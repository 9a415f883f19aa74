// The library layerpress/_C.abi3.so. Loading it registers the torch.ops.layerpress.* ops (static
// initialisers of the STABLE_TORCH_LIBRARY blocks); PyInit__C only makes it importable as the
// (empty) module layerpress._C, with the CPython limited API, so the wheel is cp310-abi3 and
// needs neither pybind11 nor a particular Python minor version. A C++ program loads the same
// file with dlopen (cpp/examples/dispatcher_caller.cpp): PyInit__C is then never called.
//
// Build facts and the CPU GEMM override are ops (build_info, set_cpu_gemm_variant,
// cpu_output_cache_held_bytes), registered for CompositeExplicitAutograd: they take no tensor.
#include <Python.h>

#include "launch_utils.h"

#ifndef LAYERPRESS_VERSION
#define LAYERPRESS_VERSION "0.0.0"
#endif
#ifndef LAYERPRESS_TORCH_BUILD_VERSION
#define LAYERPRESS_TORCH_BUILD_VERSION ""
#endif

namespace layerpress {
size_t cpu_output_cache_held_bytes();  // cpu_output_cache.cpp

namespace {

std::string json_string(const std::string& s) { return "\"" + s + "\""; }  // names only: no escapes

std::string json_list(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + json_string(v[i]);
  return out + "]";
}

// JSON object: version, the torch it was built against and the oldest it loads on, the stable-ABI
// target, CPU features found at run time and the kernel variant chosen per op. The CUDA library
// (cuda/ops) adds its own facts in Python.
std::string build_info() {
  std::vector<std::string> variants, opt_in;  // opt-in ones round more: only chosen by name
  for (const auto& v : cpu_gemm_variants())
    if (v.supported()) (v.opt_in ? opt_in : variants).push_back(v.name);
  const std::string g = json_string(cpu_gemm_active().name);
  std::string bf16_min_m;  // bits -> smallest M computed from bf16-rounded operands (tests read it)
  std::string int8_max_m;  // bits -> largest M computed from int8 activation tables (per-OC groups)
  for (const int bits : {2, 3, 4, 8}) {
    if (cpu_gemm_bf16_min_m(bits) >= 0)
      bf16_min_m += str_cat(bf16_min_m.empty() ? "" : ", ", "\"", bits, "\": ", cpu_gemm_bf16_min_m(bits));
    if (cpu_gemm_int8_table_max_m(bits) >= 0)
      int8_max_m += str_cat(int8_max_m.empty() ? "" : ", ", "\"", bits, "\": ", cpu_gemm_int8_table_max_m(bits));
  }
  return str_cat("{\"version\": ", json_string(LAYERPRESS_VERSION),
                 ", \"torch_version\": ", json_string(LAYERPRESS_TORCH_BUILD_VERSION),
                 ", \"stable_abi_target\": ", json_string(str_cat(TORCH_FEATURE_VERSION >> 56, ".",
                                                                   (TORCH_FEATURE_VERSION >> 48) & 0xff)),
                 ", \"cpu_features\": ", json_list(cpu_features()),
                 ", \"cpu_gemm_variants\": ", json_list(variants),
                 ", \"cpu_gemm_opt_in_variants\": ", json_list(opt_in),
                 ", \"cpu_gemm_bf16_min_m\": {", bf16_min_m, "}",
                 ", \"cpu_gemm_int8_table_max_m\": {", int8_max_m, "}",
                 ", \"cpu_kernels\": {\"gemm\": ", g, ", \"gemm_t\": ", g,
                 ", \"quantize\": \"portable\", \"dequantize\": \"portable\", \"repack\": \"portable\"}}");
}

void set_cpu_gemm_variant(std::string name) {
  LP_CHECK_VALUE(cpu_gemm_select(name), "unknown or unsupported CPU GEMM variant '", name, "'");
}

int64_t output_cache_held_bytes() { return static_cast<int64_t>(cpu_output_cache_held_bytes()); }

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CompositeExplicitAutograd, m) {
  m.impl("build_info", TORCH_BOX(&layerpress::build_info));
  m.impl("set_cpu_gemm_variant", TORCH_BOX(&layerpress::set_cpu_gemm_variant));
  m.impl("cpu_output_cache_held_bytes", TORCH_BOX(&layerpress::output_cache_held_bytes));
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "layerpress's op library: loading it registers torch.ops.layerpress.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
