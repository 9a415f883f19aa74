// Times the CUDA tensor-core low-bit GEMM (gemm_cuda_mma, Layout::kCudaMma) against cuBLAS fp16 /
// bf16 in the same run, with no Python and no torch: random codes and scales, repacked on the CPU,
// Y = X·dequant(W)ᵀ per case; CUDA events, median of repeats, the L2 flushed (a memset of a buffer
// of 4x the L2) before every timed call. One JSON line per case on stdout:
//   {"bench": "gemm_cuda", "M", "K", "N", "bits", "axis", "group", "dtype", "ours_us",
//    "cublas_us", "speedup" (cublas / ours), "packed_bytes", "ours_gbps", "tensor_cores"}
//
//   bench_gemm_cuda [--repeats R] [--M m1,..] [--shapes KxN,..] [--bits b1,..] [--axes 0,1]
//                   [--group g] [--dtypes f16,bf16] [--cublas /path/libcublas.so]
//
// cuBLAS is loaded at run time (dlopen: --cublas, $LP_CUBLAS, libcublas.so.13/.12/.so), so the
// binary builds with any toolkit, including one without cuBLAS; without it "cublas_us" is null.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench_cli.h"
#include "layerpress/cpu_kernels.h"
#include "layerpress/cuda_kernels.h"
#include "layerpress/cuda_mma_layout.h"

using namespace layerpress;
using layerpress_bench::parse_list;

namespace {

#define CHECK_CUDA(x)                                                                              \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "bench_gemm_cuda: %s failed: %s\n", #x, cudaGetErrorString(e_));       \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

// The few cuBLAS entry points used, with the ABI values of cublas_api.h / library_types.h.
struct Cublas {
  using Create = int (*)(void**);
  using SetStream = int (*)(void*, cudaStream_t);
  using GemmEx = int (*)(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int,
                         const void*, void*, int, int, int, int);
  Create create = nullptr;
  SetStream set_stream = nullptr;
  GemmEx gemm_ex = nullptr;
  void* handle = nullptr;
  static constexpr int kOpN = 0, kOpT = 1, kR16F = 2, kR16BF = 14, kCompute32F = 68, kGemmDefault = -1;

  bool load(const char* path) {
    const char* names[] = {path, std::getenv("LP_CUBLAS"), "libcublas.so.13", "libcublas.so.12", "libcublas.so"};
    for (const char* n : names) {
      if (n == nullptr || *n == 0) continue;
      void* lib = dlopen(n, RTLD_NOW | RTLD_GLOBAL);
      if (lib == nullptr) continue;
      create = reinterpret_cast<Create>(dlsym(lib, "cublasCreate_v2"));
      set_stream = reinterpret_cast<SetStream>(dlsym(lib, "cublasSetStream_v2"));
      gemm_ex = reinterpret_cast<GemmEx>(dlsym(lib, "cublasGemmEx"));
      if (create && set_stream && gemm_ex && create(&handle) == 0) {
        std::fprintf(stderr, "bench_gemm_cuda: cuBLAS from %s\n", n);
        return true;
      }
    }
    std::fprintf(stderr, "bench_gemm_cuda: cuBLAS not found (pass --cublas or set LP_CUBLAS); no baseline\n");
    return false;
  }
  // Y[M, N] = X[M, K] · W[N, K]ᵀ, all row-major: column-major C[N, M] = Wᵀ(col-major [K, N])ᵀ · X.
  int gemm(int64_t M, int64_t N, int64_t K, const void* w, const void* x, void* y, bool bf16) const {
    const float alpha = 1.0f, beta = 0.0f;
    const int t = bf16 ? kR16BF : kR16F;
    return gemm_ex(handle, kOpT, kOpN, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, w, t,
                   static_cast<int>(K), x, t, static_cast<int>(K), &beta, y, t, static_cast<int>(N), kCompute32F,
                   kGemmDefault);
  }
};

std::vector<std::pair<int64_t, int64_t>> parse_shapes(const char* s) {  // "KxN,KxN"
  std::vector<std::pair<int64_t, int64_t>> v;
  for (const std::string& item : layerpress_bench::split_list(s)) {
    const size_t x = item.find('x');
    if (x != std::string::npos) v.push_back({std::atoll(item.substr(0, x).c_str()), std::atoll(item.substr(x + 1).c_str())});
  }
  return v;
}

struct Timer {
  cudaEvent_t start, stop;
  void* flush = nullptr;
  size_t flush_bytes = 0;
  Timer() {
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    int dev = 0, l2 = 0;
    CHECK_CUDA(cudaGetDevice(&dev));
    CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush_bytes = std::max<size_t>(4 * static_cast<size_t>(l2), 64 << 20);
    CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  }
  template <typename F>
  double median_us(int repeats, F&& call) {
    call();  // warm-up
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<double> us;
    for (int r = 0; r < repeats; ++r) {
      CHECK_CUDA(cudaMemsetAsync(flush, r & 0xff, flush_bytes, nullptr));
      CHECK_CUDA(cudaEventRecord(start, nullptr));
      call();
      CHECK_CUDA(cudaEventRecord(stop, nullptr));
      CHECK_CUDA(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(ms * 1e3);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  }
};

uint16_t to_half_bits(float f, bool bf16) { return bf16 ? f32_to_bf16(f) : f32_to_f16(f); }

}  // namespace

int main(int argc, char** argv) {
  int repeats = 20;
  std::vector<int64_t> Ms = {1, 16, 64, 128, 512}, bitss = {4, 3, 2, 8}, axes = {0, 1};
  std::vector<std::pair<int64_t, int64_t>> shapes = {{8192, 8192}, {4096, 11008}, {11008, 4096}};
  std::vector<std::string> dtypes = {"f16"};
  int64_t group = 128;
  const char* cublas_path = nullptr;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--repeats") repeats = std::atoi(argv[i + 1]);
    else if (a == "--M") Ms = parse_list(argv[i + 1]);
    else if (a == "--shapes") shapes = parse_shapes(argv[i + 1]);
    else if (a == "--bits") bitss = parse_list(argv[i + 1]);
    else if (a == "--axes") axes = parse_list(argv[i + 1]);
    else if (a == "--group") group = std::atoll(argv[i + 1]);
    else if (a == "--cublas") cublas_path = argv[i + 1];
    else if (a == "--dtypes") dtypes = layerpress_bench::split_list(argv[i + 1]);
    else {
      std::fprintf(stderr, "bench_gemm_cuda: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "bench_gemm_cuda: no CUDA device\n");
    return 2;
  }
  Cublas cublas;
  const bool have_cublas = cublas.load(cublas_path);
  Timer timer;
  std::mt19937 rng(1234);
  const int64_t max_m = *std::max_element(Ms.begin(), Ms.end());

  for (const auto& shape : shapes) {
    const int64_t K = shape.first, N = shape.second;
    // dense weights for cuBLAS and activations, both dtypes
    std::vector<uint16_t> host(std::max(N * K, max_m * K));
    std::normal_distribution<float> nd(0.0f, 0.02f);
    void *w_dense = nullptr, *x = nullptr, *y = nullptr, *y_ref = nullptr;
    CHECK_CUDA(cudaMalloc(&w_dense, N * K * 2));
    CHECK_CUDA(cudaMalloc(&x, max_m * K * 2));
    CHECK_CUDA(cudaMalloc(&y, max_m * N * 2));
    CHECK_CUDA(cudaMalloc(&y_ref, max_m * N * 2));
    for (int64_t bits : bitss)
      for (int64_t axis : axes) {
        QuantParams p;
        p.N = N;
        p.K = K;
        p.bits = static_cast<int>(bits);
        p.axis = static_cast<GroupAxis>(axis);
        p.group = static_cast<int>(group == -1 ? (axis == 0 ? K : N) : group);
        p.symmetric = false;
        p.scale_type = FloatType::kF16;
        if ((axis == 0 && K % p.group) || (axis == 1 && N % p.group)) continue;
        std::vector<uint8_t> codes(N * K), zeros;
        std::uniform_int_distribution<int> cd(0, (1 << bits) - 1);
        for (auto& c : codes) c = static_cast<uint8_t>(cd(rng));
        std::vector<int32_t> canonical(N * p.words_per_row());
        pack_codes(codes.data(), N, K, p.bits, canonical.data(), serial_for());
        const int64_t ns = axis == 0 ? N * (K / p.group) : K * (N / p.group);
        std::vector<uint16_t> scales(ns);
        zeros.resize(ns);
        for (int64_t i = 0; i < ns; ++i) {
          scales[i] = f32_to_f16(0.001f + 0.01f * (i % 97) / 97.0f);
          zeros[i] = static_cast<uint8_t>(cd(rng));
        }
        const int64_t qn = mma_layout::n_tiles(N) * (K / 16) * 32 * bits;
        const int64_t sn = mma_layout::scale_entries(axis == 0, N, K, p.group);
        std::vector<int32_t> q_mma(qn);
        std::vector<uint16_t> s_mma(sn);
        std::vector<uint8_t> z_mma(sn);
        repack_canonical_to_cuda_mma(canonical.data(), scales.data(), zeros.data(), p, q_mma.data(), s_mma.data(),
                                     z_mma.data(), serial_for());
        void *dq = nullptr, *ds = nullptr, *dz = nullptr;
        CHECK_CUDA(cudaMalloc(&dq, qn * 4));
        CHECK_CUDA(cudaMalloc(&ds, sn * 2));
        CHECK_CUDA(cudaMalloc(&dz, sn));
        CHECK_CUDA(cudaMemcpy(dq, q_mma.data(), qn * 4, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(ds, s_mma.data(), sn * 2, cudaMemcpyHostToDevice));
        CHECK_CUDA(cudaMemcpy(dz, z_mma.data(), sn, cudaMemcpyHostToDevice));
        const double packed_bytes = qn * 4.0 + sn * 3.0;
        for (const std::string& dt : dtypes) {
          const bool bf16 = dt == "bf16";
          for (int64_t i = 0; i < N * K; ++i) host[i] = to_half_bits(nd(rng), bf16);
          CHECK_CUDA(cudaMemcpy(w_dense, host.data(), N * K * 2, cudaMemcpyHostToDevice));
          for (int64_t i = 0; i < max_m * K; ++i) host[i] = to_half_bits(nd(rng) * 50.0f, bf16);
          CHECK_CUDA(cudaMemcpy(x, host.data(), max_m * K * 2, cudaMemcpyHostToDevice));
          for (int64_t M : Ms) {
            GemmArgs a;
            a.p = p;
            a.qweight = static_cast<const int32_t*>(dq);
            a.scales = ds;
            a.zeros = static_cast<const uint8_t*>(dz);
            a.M = M;
            a.act_type = bf16 ? FloatType::kBF16 : FloatType::kF16;
            a.x = x;
            a.ldx = K;
            a.y = y;
            const size_t ws_bytes = gemm_cuda_mma_workspace_bytes(a);
            void* ws = nullptr;
            if (ws_bytes) CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
            const double ours = timer.median_us(repeats, [&] { CHECK_CUDA(gemm_cuda_mma(a, ws, nullptr)); });
            double theirs = -1;
            if (have_cublas)
              theirs = timer.median_us(repeats, [&] {
                if (cublas.gemm(M, N, K, w_dense, x, y_ref, bf16) != 0) {
                  std::fprintf(stderr, "bench_gemm_cuda: cublasGemmEx failed\n");
                  std::exit(1);
                }
              });
            if (ws) CHECK_CUDA(cudaFree(ws));
            char cb[64];
            if (theirs > 0) std::snprintf(cb, sizeof cb, "%.3f", theirs);
            else std::snprintf(cb, sizeof cb, "null");
            char sp[64];
            if (theirs > 0) std::snprintf(sp, sizeof sp, "%.3f", theirs / ours);
            else std::snprintf(sp, sizeof sp, "null");
            std::printf("{\"bench\": \"gemm_cuda\", \"M\": %lld, \"K\": %lld, \"N\": %lld, \"bits\": %lld, "
                        "\"axis\": \"%s\", \"group\": %lld, \"dtype\": \"%s\", \"ours_us\": %.3f, "
                        "\"cublas_us\": %s, \"speedup\": %s, \"packed_bytes\": %.0f, \"ours_gbps\": %.1f, "
                        "\"tensor_cores\": %s, \"repeats\": %d}\n",
                        static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(N),
                        static_cast<long long>(bits), axis == 0 ? "oc" : "ic", static_cast<long long>(group),
                        dt.c_str(), ours, cb, sp, packed_bytes, packed_bytes / (ours * 1e-6) / 1e9,
                        gemm_cuda_mma_uses_tensor_cores(a) ? "true" : "false", repeats);
            std::fflush(stdout);
          }
        }
        CHECK_CUDA(cudaFree(dq));
        CHECK_CUDA(cudaFree(ds));
        CHECK_CUDA(cudaFree(dz));
      }
    CHECK_CUDA(cudaFree(w_dense));
    CHECK_CUDA(cudaFree(x));
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(y_ref));
  }
  return 0;
}
