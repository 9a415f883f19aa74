// Times the CPU low-bit GEMM with no Python and no torch: quantise a random weight, repack it,
// run Y = X·dequant(W)ᵀ for each case, print one JSON line per case (median of repeats).
//   bench_gemm_cpu [--threads T] [--repeats R] [--M m1,m2,..] [--K k] [--N n] [--bits b1,..]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_cli.h"
#include "layerpress/cpu_kernels.h"

using namespace layerpress;
using layerpress_bench::parse_list;

namespace {

ParallelFor thread_for(int threads) {
  return [threads](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    const int64_t t = std::min<int64_t>(threads, n);
    if (t <= 1) {
      body(0, n);
      return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (n + t - 1) / t;
    for (int64_t i = 0; i < t; ++i) {
      const int64_t b = i * chunk, e = std::min(n, b + chunk);
      if (b < e) pool.emplace_back([&body, b, e] { body(b, e); });
    }
    for (auto& th : pool) th.join();
  };
}

}  // namespace

int main(int argc, char** argv) {
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int repeats = 20;
  std::vector<int64_t> Ms = {1, 16, 128}, bitss = {2, 3, 4, 8}, axes = {0, 1};
  int64_t K = 4096, N = 4096, group = 128;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--repeats") repeats = std::atoi(argv[i + 1]);
    else if (a == "--M") Ms = parse_list(argv[i + 1]);
    else if (a == "--K") K = std::atoll(argv[i + 1]);
    else if (a == "--N") N = std::atoll(argv[i + 1]);
    else if (a == "--bits") bitss = parse_list(argv[i + 1]);
    else if (a == "--group") group = std::atoll(argv[i + 1]);
    else if (a == "--axis") axes = parse_list(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  const ParallelFor pf = thread_for(threads);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(N * K));
  for (auto& v : w) v = normal(rng) * 0.02f;
  const auto& variant = cpu_gemm_active();
  for (int64_t bits : bitss)
    for (int64_t axis : axes) {
      QuantParams p;
      p.N = N; p.K = K; p.bits = static_cast<int>(bits);
      p.axis = static_cast<GroupAxis>(axis);
      p.group = static_cast<int>(group);
      p.symmetric = false;
      p.scale_type = FloatType::kF32;
      const int64_t ns = p.axis == GroupAxis::kPerOC ? N * (K / group) : K * (N / group);
      std::vector<uint8_t> codes(static_cast<size_t>(N * K)), zeros(ns), zn(bitplane_scales_numel(p));
      std::vector<float> scales(ns), sn(bitplane_scales_numel(p));
      std::vector<int32_t> packed(static_cast<size_t>(N * K * bits / 32)), qn(bitplane_qweight_numel(p));
      quantize_rtn(w.data(), FloatType::kF32, p, codes.data(), scales.data(), zeros.data(), false, pf);
      pack_codes(codes.data(), N, K, p.bits, packed.data(), pf);
      repack_canonical_to_bitplane(packed.data(), scales.data(), zeros.data(), p, qn.data(), sn.data(),
                                   zn.data(), pf);
      for (int64_t M : Ms) {
        std::vector<float> x(static_cast<size_t>(M * K)), y(static_cast<size_t>(M * N));
        for (auto& v : x) v = normal(rng);
        GemmArgs a;
        a.p = p; a.qweight = qn.data(); a.scales = sn.data(); a.zeros = zn.data();
        a.M = M; a.act_type = FloatType::kF32; a.x = x.data(); a.ldx = K; a.y = y.data();
        std::vector<double> ms;
        for (int r = 0; r < repeats + 3; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          variant.gemm(a, pf);
          const auto t1 = std::chrono::steady_clock::now();
          if (r >= 3) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        }
        std::sort(ms.begin(), ms.end());
        std::printf("{\"op\": \"gemm\", \"impl\": \"layerpress-%s (C++)\", \"device\": \"cpu\", \"M\": %lld, "
                    "\"K\": %lld, \"N\": %lld, \"bits\": %lld, \"group_size\": %lld, \"axis\": \"%s\", "
                    "\"dtype\": \"float32\", \"threads\": %d, \"median_ms\": %.4f}\n",
                    variant.name, static_cast<long long>(M), static_cast<long long>(K),
                    static_cast<long long>(N), static_cast<long long>(bits), static_cast<long long>(group),
                    axis == 0 ? "oc" : "ic", threads, ms[ms.size() / 2]);
        if (std::getenv("LP_BENCH_MIN")) std::printf("  min_ms %.4f\n", ms.front());
      }
    }
  return 0;
}
