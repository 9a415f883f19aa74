// The Python extension module layerpress._C. Loading it registers the torch.ops.layerpress.*
// ops (static TORCH_LIBRARY initialisers in this library); it also reports build facts.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "layerpress/cpu_kernels.h"

#ifndef LAYERPRESS_VERSION
#define LAYERPRESS_VERSION "0.0.0"
#endif
#ifndef LAYERPRESS_CUDA_ARCHS
#define LAYERPRESS_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace layerpress {
bool cuda_ops_built();  // cuda_registry.cpp: true when the CUDA op library was compiled in
size_t cpu_output_cache_held_bytes();  // cpu_output_cache.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "layerpress C++/CUDA extension: registers torch.ops.layerpress.*";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = LAYERPRESS_VERSION;
    d["torch_version"] = TORCH_VERSION;
    d["cuda"] = layerpress::cuda_ops_built();
    d["cuda_archs"] = std::string(LAYERPRESS_CUDA_ARCHS);
    d["cpu_features"] = layerpress::cpu_features();
    py::list variants;
    for (const auto& v : layerpress::cpu_gemm_variants())
      if (v.supported()) variants.append(v.name);
    d["cpu_gemm_variants"] = variants;
    py::dict chosen;
    const char* g = layerpress::cpu_gemm_active().name;
    chosen["gemm"] = g;
    chosen["gemm_t"] = g;
    chosen["quantize"] = "portable";
    chosen["dequantize"] = "portable";
    chosen["repack"] = "portable";
    d["cpu_kernels"] = chosen;
    return d;
  }, "Version, torch built against, CUDA on/off and architectures, CPU features found at run "
     "time, and the kernel variant chosen per op.");
  m.def("set_cpu_gemm_variant", [](const std::string& name) {
    if (!layerpress::cpu_gemm_select(name))
      throw py::value_error("unknown or unsupported CPU GEMM variant '" + name + "'");
  }, "Force a CPU GEMM variant by name ('' restores the automatic choice). For tests and benchmarks.");
  m.def("cpu_output_cache_held_bytes", &layerpress::cpu_output_cache_held_bytes,
        "Bytes of freed large CPU outputs held for reuse (cpp/ops/cpu_output_cache.h). For tests.");
}
