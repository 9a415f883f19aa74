// Runs an AOTInductor package (.pt2) of a model with layerpress QuantLinear layers from plain C++,
// as a deployment without Python would: load the layerpress op library (it registers
// layerpress::gemm, which the compiled model calls through the dispatcher), load the package with
// torch::inductor::AOTIModelPackageLoader, run it.
//
//   aoti_runner --package m.pt2 [--library PATH] [--threads 1]
//               [--input m.input0.lpt --reference m.output0.lpt [--rtol 1e-5]]
//               [--bench-M 1,32 --repeats 50]
//
// The package comes from layerpress.interop.aoti.export_aoti (docs/interop.md), which also writes
// the example input and the eager output beside it in a raw format (LPT1: magic, int32 dtype code
// 0 = float32, int32 ndim, int64 sizes, data; little-endian). With --input/--reference the runner
// checks its output against that reference (max |y - y_ref| <= rtol * max |y_ref| + 1e-6) and
// prints one JSON line. With --bench-M it times the model on random inputs of M rows (the
// example input's other dimensions) and prints one JSON line per M with the median latency.
// Exits 1 if the check fails, 2 on bad arguments, a library or package that does not load.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "example_util.h"

namespace {

// Reads an LPT1 raw tensor; returns an undefined tensor and sets err on failure.
at::Tensor read_raw(const std::string& path, std::string& err) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    err = "cannot open " + path;
    return {};
  }
  char magic[4];
  int32_t code = -1, ndim = -1;
  f.read(magic, 4);
  f.read(reinterpret_cast<char*>(&code), 4);
  f.read(reinterpret_cast<char*>(&ndim), 4);
  if (!f || std::memcmp(magic, "LPT1", 4) != 0 || code != 0 || ndim < 0 || ndim > 8) {
    err = path + ": not an LPT1 float32 tensor file";
    return {};
  }
  std::vector<int64_t> shape(static_cast<size_t>(ndim));
  f.read(reinterpret_cast<char*>(shape.data()), 8 * ndim);
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  at::Tensor t = at::empty(shape, at::kFloat);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), 4 * numel);
  if (!f || f.peek() != EOF) {
    err = path + ": data size does not match its shape";
    return {};
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string package, library, input_path, reference_path;
  std::vector<int64_t> bench_m;
  int repeats = 50, threads = 1;
  double rtol = 1e-5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    if (a == "--package" && has) package = argv[++i];
    else if (a == "--library" && has) library = argv[++i];
    else if (a == "--input" && has) input_path = argv[++i];
    else if (a == "--reference" && has) reference_path = argv[++i];
    else if (a == "--rtol" && has) rtol = std::atof(argv[++i]);
    else if (a == "--bench-M" && has) bench_m = lp_example::parse_list(argv[++i]);
    else if (a == "--repeats" && has) repeats = std::max(1, std::atoi(argv[++i]));
    else if (a == "--threads" && has) threads = std::max(1, std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "aoti_runner: unknown argument %s (expected --package, --library, --input, "
                   "--reference, --rtol, --bench-M, --repeats, --threads)\n", a.c_str());
      return 2;
    }
  }
  if (package.empty() || input_path.empty()) {
    std::fprintf(stderr, "aoti_runner: --package and --input are required\n");
    return 2;
  }
  at::set_num_threads(threads);
  if (library.empty()) library = lp_example::default_library();
  if (dlopen(library.c_str(), RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "aoti_runner: cannot load the layerpress op library %s: %s\n", library.c_str(),
                 dlerror());
    return 2;
  }
  std::string err;
  const at::Tensor x = read_raw(input_path, err);
  if (!x.defined()) {
    std::fprintf(stderr, "aoti_runner: %s\n", err.c_str());
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(package);
    int status = 0;
    if (!reference_path.empty()) {
      const at::Tensor ref = read_raw(reference_path, err);
      if (!ref.defined()) {
        std::fprintf(stderr, "aoti_runner: %s\n", err.c_str());
        return 2;
      }
      const std::vector<at::Tensor> out = loader.run({x});
      if (out.empty() || out[0].sizes() != ref.sizes()) {
        std::fprintf(stderr, "aoti_runner: the model's output shape does not match the reference\n");
        return 1;
      }
      const double max_ref = ref.abs().max().item<double>();
      const double max_err = (out[0].to(at::kFloat) - ref).abs().max().item<double>();
      const bool ok = max_err <= rtol * max_ref + 1e-6;
      std::printf("{\"check\": \"reference\", \"ok\": %s, \"max_abs_err\": %.3g, \"max_abs_ref\": %.4g, "
                  "\"shape\": [%lld, %lld]}\n", ok ? "true" : "false", max_err, max_ref,
                  static_cast<long long>(ref.size(0)), static_cast<long long>(ref.dim() > 1 ? ref.size(1) : 1));
      if (!ok) status = 1;
    }
    for (const int64_t m : bench_m) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape[0] = m;
      const std::vector<at::Tensor> in = {at::randn(shape)};
      for (int w = 0; w < 3; ++w) loader.run(in);
      std::vector<double> ms;
      for (int r = 0; r < repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        loader.run(in);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("{\"check\": \"bench\", \"runner\": \"aoti_cpp\", \"M\": %lld, \"threads\": %d, "
                  "\"repeats\": %d, \"median_ms\": %.4f}\n", static_cast<long long>(m), threads, repeats,
                  ms[ms.size() / 2]);
    }
    return status;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "aoti_runner: %s\n", e.what());
    return 2;
  }
}
