// Calls the layerpress ops through the PyTorch dispatcher from plain C++, as another framework
// would: look the op up by name, get a typed handle, call it. No Python anywhere.
//
//   dispatcher_caller [--library PATH] [--bits 2,3,4,8] [--M 5] [--threads 1]
//
// For each bit width and both group axes (per-OC, per-IC): quantise a random weight
// (layerpress::quantize), pack it (layerpress::pack), repack it for the CPU kernel
// (layerpress::repack) and run the low-bit GEMM (layerpress::gemm); check the result against a
// float64 reference Y = X · ((q - z) · s)ᵀ + b whose dequantisation is written here in plain ATen
// from the codes, scales and zeros the quantise op returned (docs/format.md §2.2). Prints one
// line per case; exits 1 if any case is off, 2 on bad arguments or a library that does not load.
//
// How the ops get here: this program loads layerpress's op library (layerpress/_C.abi3.so; by
// default the one installed next to this binary's bin/ directory) with dlopen, as any LibTorch
// program loads an extension; its static initialisers register the ops with the dispatcher. The
// library is built on the stable ABI, so this program (built on torch's full C++ API, like a
// framework) and the library need not come from the same torch build. Its PyInit__C is never
// called, and lazy binding leaves the CPython symbols it names unresolved.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <dlfcn.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "example_util.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

// Typed handles: the C++ signatures must match the kernels' (checked by typed<>()).
auto quantize_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("layerpress::quantize", "")
      .typed<Triple(const Tensor&, int64_t, int64_t, int64_t, bool, c10::ScalarType, const OptTensor&,
                    const OptTensor&)>();
}
auto pack_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("layerpress::pack", "").typed<Tensor(const Tensor&, int64_t)>();
}
auto repack_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("layerpress::repack", "")
      .typed<Triple(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t, int64_t, int64_t)>();
}
auto gemm_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("layerpress::gemm", "")
      .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                    int64_t, int64_t, int64_t, int64_t, const OptTensor&, int64_t)>();
}

constexpr int64_t kCpuBitplaneLayout = 1;  // Layout.CPU_BITPLANE16

// (q - z) · s in float64, from canonical codes [N, K] and per-group scales/zeros.
Tensor dequantize_reference(const Tensor& codes, const Tensor& scales, const Tensor& zeros, int64_t group,
                            int64_t axis) {
  Tensor s = scales.to(at::kDouble), z = zeros.to(at::kDouble);
  if (axis == 0) {  // per-OC: [N, K/g], groups run along a row
    s = s.repeat_interleave(group, 1);
    z = z.repeat_interleave(group, 1);
  } else {  // per-IC: [K, N/g], groups run down a column
    s = s.repeat_interleave(group, 1).t();
    z = z.repeat_interleave(group, 1).t();
  }
  return (codes.to(at::kDouble) - z) * s;
}

// build_info's "cpu_gemm_bf16_min_m"[bits]: from this M on, the active CPU variant multiplies
// bf16-rounded operands (activations; per-IC weights); -1 when it never does.
int64_t bf16_min_m(int64_t bits) {
  const auto info_op = c10::Dispatcher::singleton().findSchemaOrThrow("layerpress::build_info", "").typed<std::string()>();
  const std::string info = info_op.call();
  const size_t at = info.find("\"cpu_gemm_bf16_min_m\": {");
  if (at == std::string::npos) return -1;
  const std::string body = info.substr(at, info.find('}', at) - at);
  const std::string key = "\"" + std::to_string(bits) + "\": ";
  const size_t k = body.find(key);
  return k == std::string::npos ? -1 : std::atoll(body.c_str() + k + key.size());
}

// Runs every case; returns how many differ from the reference.
int run_cases(const std::vector<int64_t>& bits_list, int64_t M) {
  const int64_t N = 96, K = 256, group = 32;
  const auto quantize = quantize_op();
  const auto pack = pack_op();
  const auto repack = repack_op();
  const auto gemm = gemm_op();

  int failures = 0;
  for (const int64_t bits : bits_list) {
    for (const int64_t axis : {0, 1}) {
      const Tensor w = at::randn({N, K});
      const Tensor x = at::randn({M, K});
      const Tensor bias = at::randn({N});
      Tensor codes, scales, zeros;
      std::tie(codes, scales, zeros) =
          quantize.call(w, bits, group, axis, /*symmetric=*/false, at::kHalf, std::nullopt, std::nullopt);
      const Tensor qweight = pack.call(codes, bits);
      Tensor q1, s1, z1;
      std::tie(q1, s1, z1) = repack.call(qweight, scales, zeros, bits, group, axis, kCpuBitplaneLayout);
      // the last two: no input rotation (rot_signs=None, rot_block=0)
      const Tensor y = gemm.call(x, q1, s1, z1, bias, bits, group, axis, kCpuBitplaneLayout, N, std::nullopt, 0);

      Tensor w_ref = dequantize_reference(codes, scales, zeros, group, axis);
      Tensor x_ref = x.to(at::kDouble);
      const int64_t min_m = bf16_min_m(bits);
      if (min_m >= 0 && M >= min_m) {  // the operands the bf16 tile path multiplies
        x_ref = x.to(at::kBFloat16).to(at::kDouble);
        if (axis == 1) w_ref = w_ref.to(at::kFloat).to(at::kBFloat16).to(at::kDouble);
      }
      const Tensor y_ref = at::matmul(x_ref, w_ref.t()) + bias.to(at::kDouble);
      const double err = (y.to(at::kDouble) - y_ref).abs().max().item<double>();
      const double scale = y_ref.abs().max().item<double>();
      // The kernel accumulates in fp32 (order differs from the reference): about 1e-6 relative to
      // the largest output here; 1e-5 leaves a margin and still catches any wrong code or group.
      const bool ok = y.sizes() == y_ref.sizes() && y.scalar_type() == at::kFloat && err <= 1e-5 * scale + 1e-5;
      std::printf("{\"op\": \"layerpress::gemm\", \"bits\": %lld, \"axis\": \"%s\", \"M\": %lld, \"N\": %lld, "
                  "\"K\": %lld, \"group\": %lld, \"max_abs_err\": %.3g, \"max_abs_ref\": %.3g, \"ok\": %s}\n",
                  static_cast<long long>(bits), axis == 0 ? "oc" : "ic", static_cast<long long>(M),
                  static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(group), err, scale,
                  ok ? "true" : "false");
      if (!ok) ++failures;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> bits_list = {2, 3, 4, 8};
  std::string library;
  int64_t M = 5;
  int threads = 1;
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "dispatcher_caller: %s needs a value\n", a.c_str());
      return 2;
    }
    if (a == "--library") library = argv[i + 1];
    else if (a == "--bits") bits_list = lp_example::parse_list(argv[i + 1]);
    else if (a == "--M") M = std::atoll(argv[i + 1]);
    else if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "dispatcher_caller: unknown argument %s (expected --library, --bits, --M, --threads)\n", a.c_str());
      return 2;
    }
  }
  if (library.empty()) library = lp_example::default_library();
  if (dlopen(library.c_str(), RTLD_LAZY | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "dispatcher_caller: cannot load the layerpress op library %s: %s\n", library.c_str(),
                 dlerror());
    return 2;
  }
  at::set_num_threads(threads);
  at::manual_seed(0);

  int failures = 0;
  try {
    failures = run_cases(bits_list, M);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "dispatcher_caller: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {  // an op refused its arguments: its message says why
    std::fprintf(stderr, "dispatcher_caller: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::fprintf(stderr, "dispatcher_caller: %d case(s) differ from the reference\n", failures);
    return 1;
  }
  return 0;
}
