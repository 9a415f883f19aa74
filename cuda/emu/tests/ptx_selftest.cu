// Self-test of the CUDA primitives the kernels use: the tensor-core mma and ldmatrix fragment
// layouts, cp.async groups, warp shuffles/votes, block barriers with predicates, atomics, lop3/prmt
// and dynamic shared memory. One CUDA program, two builds:
//   * the CUDA emulator (cuda/emu/CMakeLists.txt, target ptx_selftest): run by the CPU test suite;
//   * nvcc for a real GPU (scripts/emu_selftest_gpu.sh): the same checks on the hardware, which is
//     what tells whether the emulator's layouts are the hardware's.
// Every expectation below is written from the PTX ISA / CUDA programming guide independently of
// the emulator's code. Output: one "PASS name" / "FAIL name: why" line per check, then
// "N passed, M failed"; the exit status is 1 if anything failed.
// Under the emulator a second group checks the emulator's own diagnostics (deadlock, barrier and
// warp divergence, bad masks, misaligned ldmatrix, early reads of cp.async destinations).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "launch.cuh"
#include "ptx.cuh"

namespace ptx = layerpress::ptx;

namespace {

int g_passed = 0, g_failed = 0;

void report(const char* name, bool ok, const std::string& why = "") {
  if (ok) {
    ++g_passed;
    std::printf("PASS %s\n", name);
  } else {
    ++g_failed;
    std::printf("FAIL %s: %s\n", name, why.c_str());
  }
  std::fflush(stdout);
}

#if defined(LP_CUDA_EMU)
#define LP_ERROR_DETAIL ::lp_emu::last_error_message()
#else
#define LP_ERROR_DETAIL ""
#endif
#define CHECK_CUDA(call)                                                                                 \
  do {                                                                                                   \
    const cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                             \
      std::printf("FAIL %s: %s returned %s %s\n", __func__, #call, cudaGetErrorString(e_), LP_ERROR_DETAIL); \
      ++g_failed;                                                                                        \
      return;                                                                                            \
    }                                                                                                    \
  } while (0)

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    if (cudaMalloc(reinterpret_cast<void**>(&ptr), count * sizeof(T)) != cudaSuccess) ptr = nullptr;
    cudaMemset(ptr, 0, count * sizeof(T));
  }
  DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

uint32_t lcg(uint32_t& s) {
  s = s * 1664525u + 1013904223u;
  return s >> 8;
}

// Host-side conversions through the storage bytes (the _as_ushort intrinsics are device-only in
// some CUDA releases).
uint16_t f16_bits(float v) {
  const __half h = __float2half_rn(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float f16_value(uint16_t u) {
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}
uint16_t bf16_bits(float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float bf16_value(uint16_t u) {
  uint32_t w = static_cast<uint32_t>(u) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
// Values k/8, |k| <= 32, are exact in f16 and bf16 alike.
uint16_t exact_f16_bits(float v) { return f16_bits(v); }
uint16_t exact_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>(u >> 16);  // exact: the low 16 bits of these floats are zero
}

// ==== mma.m16n8k16, fragments filled by the documented lane mapping ==================================
// A 16x16 (row-major), B 16x8 (K x N), C/D 16x8, all given as plain matrices in global memory.
__global__ void mma_from_fragments(const uint16_t* A, const uint16_t* B, const float* C, float* D, int bf16) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  auto pack = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  // PTX ISA 9.7.14.5.8: a_i at row g (+8 for i = 2,3,6,7), column 2t + (i & 1) (+8 for i >= 4).
  a[0] = pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  // b_i at row 2t + (i & 1) (+8 for i >= 2), column g.
  b[0] = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  b[1] = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  // c_i at row g (+8 for i >= 2), column 2t + (i & 1).
  c[0] = C[g * 8 + 2 * t];
  c[1] = C[g * 8 + 2 * t + 1];
  c[2] = C[(g + 8) * 8 + 2 * t];
  c[3] = C[(g + 8) * 8 + 2 * t + 1];
  if (bf16) ptx::mma_m16n8k16_bf16(d, a, b, c);
  else ptx::mma_m16n8k16_f16(d, a, b, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

struct MmaCase {
  std::vector<float> a, b, c;  // values, row-major 16x16, 16x8, 16x8
};

MmaCase mma_case(uint32_t seed, bool exact) {
  MmaCase m;
  uint32_t s = seed;
  auto val = [&]() {
    const int k = static_cast<int>(lcg(s) % 65) - 32;
    return exact ? k / 8.0f : k / 8.0f + static_cast<float>(lcg(s) % 1000) / 4096.0f;
  };
  m.a.resize(256);
  m.b.resize(128);
  m.c.resize(128);
  for (float& v : m.a) v = val();
  for (float& v : m.b) v = val();
  for (float& v : m.c) v = val();
  return m;
}

void test_mma(bool bf16, bool exact) {
  const std::string name = std::string("mma.m16n8k16.") + (bf16 ? "bf16" : "f16") + (exact ? " exact" : " rounded");
  MmaCase m = mma_case(bf16 ? 11u : 7u, exact);
  std::vector<uint16_t> ah(256), bh(128);
  // Non-exact inputs are first rounded to the input type; the reference uses the rounded values.
  for (int i = 0; i < 256; ++i) {
    ah[i] = bf16 ? bf16_bits(m.a[i]) : f16_bits(m.a[i]);
    m.a[i] = bf16 ? bf16_value(ah[i]) : f16_value(ah[i]);
  }
  for (int i = 0; i < 128; ++i) {
    bh[i] = bf16 ? bf16_bits(m.b[i]) : f16_bits(m.b[i]);
    m.b[i] = bf16 ? bf16_value(bh[i]) : f16_value(bh[i]);
  }
  DeviceBuffer<uint16_t> A(ah), B(bh);
  DeviceBuffer<float> C(m.c), D(128);
  LP_LAUNCH(1, 32, 0, nullptr, mma_from_fragments)(A.ptr, B.ptr, C.ptr, D.ptr, bf16 ? 1 : 0);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> d = D.get();
  double worst = 0;
  int bad = -1;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = m.c[i * 8 + j], mag = std::fabs(ref);
      for (int k = 0; k < 16; ++k) {
        ref += static_cast<double>(m.a[i * 16 + k]) * m.b[k * 8 + j];
        mag += std::fabs(static_cast<double>(m.a[i * 16 + k]) * m.b[k * 8 + j]);
      }
      // Exact inputs: every partial sum is a multiple of 1/64 below 2^15, exact in fp32.
      // Otherwise: fp32 accumulation of 17 terms in some order.
      const double tol = exact ? 0.0 : 18 * std::ldexp(1.0, -23) * mag;
      const double err = std::fabs(d[i * 8 + j] - ref);
      if (err > tol && bad < 0) bad = i * 8 + j;
      if (mag > 0) worst = std::max(worst, err / mag);
    }
  char why[160];
  std::snprintf(why, sizeof why, "D[%d][%d] = %g, worst relative error %.3g", bad / 8, bad % 8,
                bad >= 0 ? d[bad] : 0.0, worst);
  report(name.c_str(), bad < 0, why);
}

// ==== ldmatrix: which lane receives which element =====================================================
// Four 8x8 matrices of ids (matrix i, row r, column c) -> 256 i + 16 r + c, rows 48 bytes apart
// (24 elements) so that each row address really comes from its own lane.
constexpr int kLdStride = 24;

__global__ void ldmatrix_kernel(int num, int trans, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[4 * 8 * kLdStride];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 8 * kLdStride; i += 32) {
    const int m = i / (8 * kLdStride), r = (i / kLdStride) % 8, c = i % kLdStride;
    tile[i] = c < 8 ? static_cast<uint16_t>(256 * m + 16 * r + c) : 0xdead;
  }
  __syncthreads();
  const uint16_t* row = &tile[(lane / 8) * 8 * kLdStride + (lane % 8) * kLdStride];
  uint32_t r[4] = {0, 0, 0, 0};
  if (num == 1) {
    uint32_t v[1];
    if (trans) ptx::ldmatrix_x1_trans(v, row); else ptx::ldmatrix_x1(v, row);
    r[0] = v[0];
  } else if (num == 2) {
    uint32_t v[2];
    if (trans) ptx::ldmatrix_x2_trans(v, row); else ptx::ldmatrix_x2(v, row);
    r[0] = v[0];
    r[1] = v[1];
  } else {
    uint32_t v[4];
    if (trans) ptx::ldmatrix_x4_trans(v, row); else ptx::ldmatrix_x4(v, row);
    for (int i = 0; i < 4; ++i) r[i] = v[i];
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

void test_ldmatrix(int num, bool trans) {
  char name[64];
  std::snprintf(name, sizeof name, "ldmatrix.x%d%s", num, trans ? ".trans" : "");
  DeviceBuffer<uint32_t> out(128);
  LP_LAUNCH(1, 32, 0, nullptr, ldmatrix_kernel)(num, trans ? 1 : 0, out.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint32_t> o = out.get();
  std::string why;
  for (int l = 0; l < 32 && why.empty(); ++l)
    for (int i = 0; i < num; ++i) {
      // Lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix i; transposed: column l/4, rows 2(l%4), 2(l%4)+1.
      const int g = l / 4, t = l % 4;
      const uint32_t lo = trans ? 256 * i + 16 * (2 * t) + g : 256 * i + 16 * g + 2 * t;
      const uint32_t hi = trans ? 256 * i + 16 * (2 * t + 1) + g : 256 * i + 16 * g + 2 * t + 1;
      const uint32_t want = lo | (hi << 16);
      if (o[l * 4 + i] != want) {
        char b[96];
        std::snprintf(b, sizeof b, "lane %d reg %d = 0x%08x, want 0x%08x", l, i, o[l * 4 + i], want);
        why = b;
        break;
      }
    }
  report(name, why.empty(), why);
}

// ==== ldmatrix feeding mma, as a GEMM tile does =========================================================
// A 16x16 row-major in shared memory -> ldmatrix.x4; B both as [n][k] (-> ldmatrix.x2) and as [k][n]
// (-> ldmatrix.x2.trans). Both products must equal A·B + C.
__global__ void ldmatrix_mma_kernel(const uint16_t* A, const uint16_t* B_kn, const float* C, float* D_nk,
                                    float* D_kn, int bf16) {
  __shared__ __align__(16) uint16_t sa[16 * 16];
  __shared__ __align__(16) uint16_t sb_nk[8 * 16];
  __shared__ __align__(16) uint16_t sb_kn[16 * 8];
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) sa[i] = A[i];
  for (int i = lane; i < 128; i += 32) {
    sb_kn[i] = B_kn[i];
    const int k = i / 8, n = i % 8;
    sb_nk[n * 16 + k] = B_kn[i];
  }
  __syncthreads();
  uint32_t a[4], b1[2], b2[2];
  // Matrices 0..3 = rows 0-7 / 8-15 x columns 0-7 / 8-15 in the order of the A fragment registers.
  ptx::ldmatrix_x4(a, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  ptx::ldmatrix_x2(b1, &sb_nk[(lane % 8) * 16 + ((lane / 8) % 2) * 8]);
  ptx::ldmatrix_x2_trans(b2, &sb_kn[(lane % 16) * 8]);
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  float d1[4], d2[4];
  if (bf16) {
    ptx::mma_m16n8k16_bf16(d1, a, b1, c);
    ptx::mma_m16n8k16_bf16(d2, a, b2, c);
  } else {
    ptx::mma_m16n8k16_f16(d1, a, b1, c);
    ptx::mma_m16n8k16_f16(d2, a, b2, c);
  }
  const int idx[4] = {g * 8 + 2 * t, g * 8 + 2 * t + 1, (g + 8) * 8 + 2 * t, (g + 8) * 8 + 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    D_nk[idx[i]] = d1[i];
    D_kn[idx[i]] = d2[i];
  }
}

void test_ldmatrix_mma(bool bf16) {
  const char* name = bf16 ? "ldmatrix+mma tile bf16" : "ldmatrix+mma tile f16";
  MmaCase m = mma_case(23u, true);
  std::vector<uint16_t> ah(256), bh(128);
  for (int i = 0; i < 256; ++i) ah[i] = bf16 ? exact_bf16_bits(m.a[i]) : exact_f16_bits(m.a[i]);
  for (int i = 0; i < 128; ++i) bh[i] = bf16 ? exact_bf16_bits(m.b[i]) : exact_f16_bits(m.b[i]);
  DeviceBuffer<uint16_t> A(ah), B(bh);
  DeviceBuffer<float> C(m.c), D1(128), D2(128);
  LP_LAUNCH(1, 32, 0, nullptr, ldmatrix_mma_kernel)(A.ptr, B.ptr, C.ptr, D1.ptr, D2.ptr, bf16 ? 1 : 0);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> d1 = D1.get(), d2 = D2.get();
  std::string why;
  for (int i = 0; i < 16 && why.empty(); ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = m.c[i * 8 + j];
      for (int k = 0; k < 16; ++k) ref += static_cast<double>(m.a[i * 16 + k]) * m.b[k * 8 + j];
      if (d1[i * 8 + j] != ref || d2[i * 8 + j] != ref) {
        char b[128];
        std::snprintf(b, sizeof b, "D[%d][%d]: B[n][k] path %g, B[k][n] path %g, want %g", i, j, d1[i * 8 + j],
                      d2[i * 8 + j], ref);
        why = b;
        break;
      }
    }
  report(name, why.empty(), why);
}

// ==== cp.async: a 3-stage ring buffer, commit groups, zero fill, 4/8/16-byte forms ====================
constexpr int kStages = 3, kPipeThreads = 64, kChunks = 10;

__global__ void cp_async_pipeline(const uint4* src, int chunks, uint4* out) {
  __shared__ __align__(16) uint4 ring[kStages][kPipeThreads];
  const int t = threadIdx.x;
  // Chunk 3 is "out of bounds": zero-filled instead of read.
  auto issue = [&](int chunk) {
    if (chunk < chunks) ptx::cp_async_16_zfill(&ring[chunk % kStages][t], &src[chunk * kPipeThreads + t], chunk != 3);
    ptx::cp_async_commit();  // one group per chunk, empty past the end: the wait counts stay uniform
  };
  issue(0);
  issue(1);
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int c = 0; c < chunks; ++c) {
    issue(c + 2);
    ptx::cp_async_wait<2>();  // chunk c has landed (c+1, c+2 may still be in flight)
    __syncthreads();
    const uint4 v = ring[c % kStages][(t + c) % kPipeThreads];  // read another thread's copy
    acc.x += v.x;
    acc.y ^= v.y;
    acc.z += v.z * static_cast<unsigned>(c + 1);
    acc.w = acc.w * 31u + v.w;
    __syncthreads();  // the slot is refilled by the next iteration's issue
  }
  out[t] = acc;
}

__global__ void cp_async_small(const uint32_t* src, uint32_t* out) {
  __shared__ __align__(16) uint32_t buf[96];
  const int t = threadIdx.x;  // 32 threads: 4-byte copies of words 0..31, 8-byte copies of words 32..95
  ptx::cp_async_4(&buf[t], &src[t]);
  ptx::cp_async_commit();
  ptx::cp_async_8(&buf[32 + 2 * t], &src[32 + 2 * t]);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = t; i < 96; i += 32) out[i] = buf[95 - i];
}

void test_cp_async() {
  std::vector<uint4> src(kChunks * kPipeThreads);
  uint32_t s = 5;
  for (uint4& v : src) v = make_uint4(lcg(s), lcg(s), lcg(s), lcg(s));
  DeviceBuffer<uint4> S(src), O(kPipeThreads);
  LP_LAUNCH(1, kPipeThreads, 0, nullptr, cp_async_pipeline)(S.ptr, kChunks, O.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint4> o = O.get();
  std::string why;
  for (int t = 0; t < kPipeThreads && why.empty(); ++t) {
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (int c = 0; c < kChunks; ++c) {
      const uint4 v = c == 3 ? make_uint4(0, 0, 0, 0) : src[c * kPipeThreads + (t + c) % kPipeThreads];
      acc.x += v.x;
      acc.y ^= v.y;
      acc.z += v.z * static_cast<unsigned>(c + 1);
      acc.w = acc.w * 31u + v.w;
    }
    if (acc.x != o[t].x || acc.y != o[t].y || acc.z != o[t].z || acc.w != o[t].w) why = "thread " + std::to_string(t);
  }
  report("cp.async 3-stage pipeline + zfill", why.empty(), why);

  std::vector<uint32_t> small(96);
  for (uint32_t& v : small) v = lcg(s);
  DeviceBuffer<uint32_t> S2(small), O2(96);
  LP_LAUNCH(1, 32, 0, nullptr, cp_async_small)(S2.ptr, O2.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint32_t> o2 = O2.get();
  bool ok = true;
  for (int i = 0; i < 96; ++i) ok = ok && o2[i] == small[95 - i];
  report("cp.async 4- and 8-byte forms", ok);
}

// ==== warp shuffles (every form, widths 32..2, 32- and 64-bit values) ====================================
// out[(form * 5 + width_index) * 32 + lane] for int; the same layout + 1280 for the 64-bit run.
__global__ void shfl_kernel(long long* out) {
  const int lane = threadIdx.x;
  const int widths[5] = {32, 16, 8, 4, 2};
  for (int wi = 0; wi < 5; ++wi) {
    const int w = widths[wi];
    const int v = lane * 7 + 3;
    const long long v64 = (static_cast<long long>(lane) << 40) | (lane * 5 + 1);
    const int src = (lane * 5 + 3) % 32;  // per-lane source lane for the idx form
    out[(0 * 5 + wi) * 32 + lane] = __shfl_sync(0xffffffffu, v, src, w);
    out[(1 * 5 + wi) * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 3, w);
    out[(2 * 5 + wi) * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 3, w);
    out[(3 * 5 + wi) * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 5, w);
    out[1280 + (0 * 5 + wi) * 32 + lane] = __shfl_sync(0xffffffffu, v64, src, w);
    out[1280 + (1 * 5 + wi) * 32 + lane] = __shfl_up_sync(0xffffffffu, v64, 1, w);
    out[1280 + (2 * 5 + wi) * 32 + lane] = __shfl_down_sync(0xffffffffu, v64, 1, w);
    out[1280 + (3 * 5 + wi) * 32 + lane] = __shfl_xor_sync(0xffffffffu, v64, 1, w);
  }
  // a float butterfly reduction, the pattern of every reduction kernel here
  float f = static_cast<float>(lane) + 0.5f;
  for (int o = 16; o > 0; o >>= 1) f += __shfl_xor_sync(0xffffffffu, f, o);
  out[2560 + lane] = static_cast<long long>(f * 2);
}

void test_shfl() {
  DeviceBuffer<long long> out(2592);
  LP_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(out.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<long long> o = out.get();
  const int widths[5] = {32, 16, 8, 4, 2};
  std::string why;
  // CUDA programming guide, warp shuffle functions: lanes form groups of `width`; idx reads lane
  // srcLane % width of its group; up/down read lane -/+ delta if that stays inside the group, else
  // their own value; xor reads lane ^ mask unless that lies in a later group (then its own).
  auto expect = [&](int form, int w, int lane, int delta) {
    const int base = lane / w * w;
    switch (form) {
      case 0: return base + ((lane * 5 + 3) % 32) % w;
      case 1: return lane - base >= delta ? lane - delta : lane;
      case 2: return lane - base + delta < w ? lane + delta : lane;
      default: { const int j = lane ^ delta; return j >= base + w ? lane : j; }
    }
  };
  for (int form = 0; form < 4 && why.empty(); ++form)
    for (int wi = 0; wi < 5 && why.empty(); ++wi)
      for (int lane = 0; lane < 32; ++lane) {
        const int w = widths[wi];
        const int j32 = expect(form, w, lane, form == 3 ? 5 : 3), j64 = expect(form, w, lane, 1);
        const long long want32 = j32 * 7 + 3;
        const long long want64 = (static_cast<long long>(j64) << 40) | (j64 * 5 + 1);
        if (o[(form * 5 + wi) * 32 + lane] != want32 || o[1280 + (form * 5 + wi) * 32 + lane] != want64) {
          why = "form " + std::to_string(form) + " width " + std::to_string(w) + " lane " + std::to_string(lane);
          break;
        }
      }
  for (int lane = 0; lane < 32 && why.empty(); ++lane)
    if (o[2560 + lane] != 1024) why = "butterfly sum at lane " + std::to_string(lane);  // 2 * (496 + 16)
  report("__shfl_sync / _up / _down / _xor, widths 32..2, 32- and 64-bit", why.empty(), why);
}

// ==== votes, __syncwarp, partial masks =====================================================================
__global__ void vote_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned full = 0xffffffffu;
  out[warp * 8 + 0] = __ballot_sync(full, lane % 3 == 0);
  out[warp * 8 + 1] = __any_sync(full, lane == 17 + warp);
  out[warp * 8 + 2] = __all_sync(full, lane < 40);
  out[warp * 8 + 3] = __all_sync(full, lane != 5);
  __syncwarp();
  if (lane < 16) {  // the lower half votes alone, with its own mask
    const unsigned r = __ballot_sync(0x0000ffffu, lane & 1);
    if (lane == 0) out[warp * 8 + 4] = r;
  } else {
    const unsigned r = __ballot_sync(0xffff0000u, lane >= 24);
    if (lane == 16) out[warp * 8 + 5] = r;
  }
  __syncwarp(full);
  const int s = __shfl_down_sync(0xffffffffu, lane, 16);
  if (lane == 0) out[warp * 8 + 6] = static_cast<unsigned>(s);
  if (lane == 0) out[warp * 8 + 7] = __activemask();
}

void test_votes() {
  DeviceBuffer<unsigned> out(16);
  LP_LAUNCH(1, 64, 0, nullptr, vote_kernel)(out.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<unsigned> o = out.get();
  unsigned third = 0;
  for (int l = 0; l < 32; l += 3) third |= 1u << l;
  bool ok = true;
  for (int w = 0; w < 2; ++w) {
    ok = ok && o[w * 8 + 0] == third && o[w * 8 + 1] != 0u && o[w * 8 + 2] != 0u && o[w * 8 + 3] == 0u;
    ok = ok && o[w * 8 + 4] == 0x0000aaaau && o[w * 8 + 5] == 0xff000000u && o[w * 8 + 6] == 16u;
    // __activemask() in converged code of a full warp: at least the calling lane; all 32 here.
    ok = ok && (o[w * 8 + 7] & 1u) != 0;
  }
  report("__ballot/__any/__all_sync, __syncwarp, partial masks", ok);
}

// ==== block barriers with predicates ========================================================================
__global__ void barrier_kernel(int* out) {
  const int t = threadIdx.x;
  __shared__ int cell[256];
  cell[t] = t * 3;
  const int count = __syncthreads_count(t % 5 == 0);
  const int all = __syncthreads_and(t < 1000);
  const int any = __syncthreads_or(t == 77);
  const int none = __syncthreads_or(t > 1000);
  out[t] = cell[(t + 101) % blockDim.x];  // written by another warp before the barriers
  if (t == 0) {
    out[blockDim.x + 0] = count;
    out[blockDim.x + 1] = all;
    out[blockDim.x + 2] = any;
    out[blockDim.x + 3] = none;
  }
}

void test_barriers() {
  const int n = 200;  // not a multiple of 32: a partial last warp
  DeviceBuffer<int> out(n + 4);
  LP_LAUNCH(1, n, 0, nullptr, barrier_kernel)(out.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<int> o = out.get();
  bool ok = o[n] == 40 && o[n + 1] != 0 && o[n + 2] != 0 && o[n + 3] == 0;
  for (int t = 0; t < n; ++t) ok = ok && o[t] == ((t + 101) % n) * 3;
  report("__syncthreads / _count / _and / _or, partial last warp", ok);
}

// ==== atomics on global and shared memory ====================================================================
__global__ void atomics_kernel(int* gi, float* gf, unsigned long long* gu, int* gmax, unsigned* hist_out) {
  __shared__ unsigned hist[16];
  const int t = threadIdx.x, b = blockIdx.x;
  if (t < 16) hist[t] = 0;
  __syncthreads();
  atomicAdd(gi, 1);
  atomicAdd(gf, 0.25f);
  atomicAdd(gu, static_cast<unsigned long long>(b) << 33);
  atomicMax(gmax, b * 1000 + t);
  atomicMin(gmax + 1, -(b * 1000 + t));
  atomicAdd(&hist[(t * 7 + b) % 16], 1u);
  if (t == 0) atomicCAS(gi + 1, b, b + 1);  // ends at the number of blocks only if they line up
  __syncthreads();
  if (t < 16) atomicAdd(&hist_out[t], hist[t]);
}

void test_atomics() {
  const int blocks = 37, threads = 96;
  DeviceBuffer<int> gi(2), gmax(2);
  DeviceBuffer<float> gf(1);
  DeviceBuffer<unsigned long long> gu(1);
  DeviceBuffer<unsigned> hist(16);
  LP_LAUNCH(blocks, threads, 0, nullptr, atomics_kernel)(gi.ptr, gf.ptr, gu.ptr, gmax.ptr, hist.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<int> i = gi.get(), mx = gmax.get();
  const std::vector<float> f = gf.get();
  const std::vector<unsigned long long> u = gu.get();
  const std::vector<unsigned> h = hist.get();
  unsigned long long usum = 0;
  for (int b = 0; b < blocks; ++b) usum += (static_cast<unsigned long long>(b) << 33) * threads;
  std::vector<unsigned> want(16, 0);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) ++want[(t * 7 + b) % 16];
  bool ok = i[0] == blocks * threads && f[0] == 0.25f * blocks * threads && u[0] == usum &&
            mx[0] == (blocks - 1) * 1000 + threads - 1 && mx[1] == -((blocks - 1) * 1000 + threads - 1) && want == h &&
            i[1] >= 1 && i[1] <= blocks;
  char why[200];
  std::snprintf(why, sizeof why, "int %d, float %g, u64 %llu (want %llu), max %d, min %d, cas %d, histogram %s", i[0],
                f[0], u[0], usum, mx[0], mx[1], i[1], want == h ? "ok" : "wrong");
  report("atomics (global int/float/u64/max/min/CAS, shared)", ok, why);
}

// ==== lop3 / prmt ===============================================================================================
__global__ void bits_kernel(const uint32_t* in, uint32_t* out) {
  const int t = threadIdx.x;
  const uint32_t a = in[3 * t], b = in[3 * t + 1], c = in[3 * t + 2];
  out[10 * t + 0] = ptx::lop3<0x96>(a, b, c);  // a ^ b ^ c
  out[10 * t + 1] = ptx::lop3<0xE8>(a, b, c);  // majority
  out[10 * t + 2] = ptx::lop3<0xF8>(a, b, c);  // a | (b & c)
  out[10 * t + 3] = ptx::lop3<0xEA>(a, b, c);  // (a & b) | c
  out[10 * t + 4] = ptx::lop3<0x0F>(a, b, c);  // ~a
  out[10 * t + 5] = ptx::prmt(a, b, 0x3210);   // a
  out[10 * t + 6] = ptx::prmt(a, b, 0x7654);   // b
  out[10 * t + 7] = ptx::prmt(a, b, 0x0123);   // bytes of a reversed
  out[10 * t + 8] = ptx::prmt(a, b, 0x5140);   // a0 b0 a1 b1 (low to high)
  out[10 * t + 9] = ptx::prmt(a, b, 0x8bda);   // signs of a2, b1, a3, a0 replicated (low to high)
}

void test_bits() {
  const int n = 64;
  std::vector<uint32_t> in(3 * n);
  uint32_t s = 99;
  for (uint32_t& v : in) v = lcg(s) ^ (lcg(s) << 12);
  in[0] = 0x80ff017fu;  // signs mixed within one word
  DeviceBuffer<uint32_t> I(in), O(10 * n);
  LP_LAUNCH(1, n, 0, nullptr, bits_kernel)(I.ptr, O.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint32_t> o = O.get();
  bool ok = true;
  for (int t = 0; t < n; ++t) {
    const uint32_t a = in[3 * t], b = in[3 * t + 1], c = in[3 * t + 2];
    auto byte = [](uint32_t w, int i) { return (w >> (8 * i)) & 0xffu; };
    auto sign = [](uint32_t v) { return (v & 0x80u) ? 0xffu : 0u; };
    const uint32_t want[10] = {
        a ^ b ^ c, (a & b) | (a & c) | (b & c), a | (b & c), (a & b) | c, ~a, a, b,
        byte(a, 3) | byte(a, 2) << 8 | byte(a, 1) << 16 | byte(a, 0) << 24,
        byte(a, 0) | byte(b, 0) << 8 | byte(a, 1) << 16 | byte(b, 1) << 24,
        sign(byte(a, 2)) | sign(byte(b, 1)) << 8 | sign(byte(a, 3)) << 16 | sign(byte(a, 0)) << 24};
    for (int k = 0; k < 10; ++k) ok = ok && o[10 * t + k] == want[k];
  }
  report("lop3 / prmt", ok);
}

// ==== dynamic shared memory beyond the default 48 KB ==========================================================
__global__ void dynamic_smem_kernel(int words, int* out) {
  LP_DYNAMIC_SMEM(int, buf);
  for (int i = threadIdx.x; i < words; i += blockDim.x) buf[i] = i * 3 + static_cast<int>(blockIdx.x);
  __syncthreads();
  int s = 0;
  for (int i = threadIdx.x; i < words; i += blockDim.x) s += buf[words - 1 - i];
  atomicAdd(out, s);
}

void test_dynamic_smem() {
  const int words = 64 * 1024 / 4;  // 64 KB
  DeviceBuffer<int> out(1);
  LP_LAUNCH(2, 128, words * 4, nullptr, dynamic_smem_kernel)(words, out.ptr);
  const cudaError_t refused = cudaGetLastError();
  cudaDeviceSynchronize();
  CHECK_CUDA(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, words * 4));
  LP_LAUNCH(2, 128, words * 4, nullptr, dynamic_smem_kernel)(words, out.ptr);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  long long want = 0;
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < words; ++i) want += i * 3 + b;
  const int got = out.get()[0];
  report("dynamic shared memory: 64 KB refused by default, runs after cudaFuncSetAttribute",
         refused != cudaSuccess && got == static_cast<int>(want),
         "first launch " + std::string(cudaGetErrorName(refused)) + ", sum " + std::to_string(got));
}

#if defined(LP_CUDA_EMU)
// ==== the emulator's own diagnostics (undefined behaviour or a hang on a GPU) ================================
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) __syncthreads();
  else __syncthreads();
}
__global__ void shfl_vs_barrier_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half the warp never joins
  else __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void mask_without_self_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0);  // lanes 16..31 are not in their mask
}
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}
__global__ void shfl_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);
}
__global__ void misaligned_ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[8 * 16];
  for (int i = threadIdx.x; i < 128; i += 32) tile[i] = static_cast<uint16_t>(i);
  __syncthreads();
  uint32_t r[1];
  ptx::ldmatrix_x1(r, &tile[(threadIdx.x % 8) * 16 + 1]);  // rows 2 bytes off 16-byte alignment
  out[threadIdx.x] = r[0];
}
__global__ void early_read_kernel(const uint4* src, uint4* out) {
  __shared__ __align__(16) uint4 buf[32];
  ptx::cp_async_16(&buf[threadIdx.x], &src[threadIdx.x]);
  ptx::cp_async_commit();
  out[threadIdx.x] = buf[threadIdx.x];  // before cp_async_wait: must not see the data
  ptx::cp_async_wait<0>();
  out[32 + threadIdx.x] = buf[threadIdx.x];
}
// A loop that forgets the barrier between reading a shared buffer and overwriting it in the next round.
__global__ void missing_barrier_kernel(int rounds, int* out) {
  __shared__ int part[64];
  int total = 0;
  for (int r = 0; r < rounds; ++r) {
    part[threadIdx.x] = static_cast<int>(threadIdx.x) + r;
    __syncthreads();
    total += part[(threadIdx.x + 1) % 64];
    // missing: __syncthreads() before the next round overwrites part[]
  }
  out[threadIdx.x] = total;
}

void expect_failure(const char* name, cudaError_t got, const char* must_contain) {
  const std::string msg = lp_emu::last_error_message();
  report(name, got == cudaErrorLaunchFailure && msg.find(must_contain) != std::string::npos,
         std::string(cudaGetErrorName(got)) + ": " + msg);
}

void test_emulator_diagnostics() {
  DeviceBuffer<float> f(64);
  DeviceBuffer<int> i(64);
  DeviceBuffer<uint32_t> u(32);
  LP_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)();
  expect_failure("emulator: divergent __syncthreads", cudaGetLastError(), "barrier divergence");
  LP_LAUNCH(1, 64, 0, nullptr, shfl_vs_barrier_kernel)(f.ptr);
  expect_failure("emulator: half a warp in a shuffle, half at a barrier", cudaGetLastError(), "deadlock");
  LP_LAUNCH(1, 32, 0, nullptr, mask_without_self_kernel)(i.ptr);
  expect_failure("emulator: shuffle mask without the caller's lane", cudaGetLastError(), "does not contain its own lane");
  LP_LAUNCH(1, 32, 0, nullptr, exited_lane_kernel)(i.ptr);
  expect_failure("emulator: exited lane named in a shuffle mask", cudaGetLastError(), "exited");
  LP_LAUNCH(1, 32, 0, nullptr, shfl_outside_mask_kernel)(i.ptr);
  expect_failure("emulator: shuffle reading a lane outside its mask", cudaGetLastError(), "not in the mask");
  LP_LAUNCH(1, 32, 0, nullptr, misaligned_ldmatrix_kernel)(u.ptr);
  expect_failure("emulator: misaligned ldmatrix row", cudaGetLastError(), "not 16-byte aligned");
  LP_LAUNCH(1, 2048, 0, nullptr, divergent_barrier_kernel)();
  const cudaError_t cfg = cudaGetLastError();
  report("emulator: 2048-thread block refused", cfg == cudaErrorInvalidConfiguration, cudaGetErrorName(cfg));

  std::vector<uint4> src(32);
  for (int k = 0; k < 32; ++k) src[k] = make_uint4(k, k + 1, k + 2, k + 3);
  DeviceBuffer<uint4> S(src), O(64);
  LP_LAUNCH(1, 32, 0, nullptr, early_read_kernel)(S.ptr, O.ptr);
  CHECK_CUDA(cudaGetLastError());
  const std::vector<uint4> o = O.get();
  bool early_poisoned = true, late_ok = true;
  for (int k = 0; k < 32; ++k) {
    early_poisoned = early_poisoned && o[k].x == 0xffffffffu;
    late_ok = late_ok && o[32 + k].x == static_cast<unsigned>(k) && o[32 + k].w == static_cast<unsigned>(k + 3);
  }
  report("emulator: cp.async destination unreadable before the wait", early_poisoned && late_ok);

  // The missing barrier gives a wrong result under at least one of the three thread orders.
  lp_emu::Settings saved = lp_emu::settings();
  bool wrong_somewhere = false;
  for (int sched : {0, 1, 2}) {
    lp_emu::settings().schedule = sched;
    DeviceBuffer<int> out(64);
    LP_LAUNCH(1, 64, 0, nullptr, missing_barrier_kernel)(4, out.ptr);
    const std::vector<int> r = out.get();
    for (int t = 0; t < 64; ++t) {
      int want = 0;
      for (int rr = 0; rr < 4; ++rr) want += (t + 1) % 64 + rr;
      wrong_somewhere = wrong_somewhere || r[t] != want;
    }
  }
  lp_emu::settings() = saved;
  report("emulator: a missing barrier shows under some thread order", wrong_somewhere);
}
#endif

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no GPU: cudaGetDeviceCount found none\n");
    return 2;
  }
  test_mma(false, true);
  test_mma(true, true);
  test_mma(false, false);
  test_mma(true, false);
  for (int num : {1, 2, 4}) {
    test_ldmatrix(num, false);
    test_ldmatrix(num, true);
  }
  test_ldmatrix_mma(false);
  test_ldmatrix_mma(true);
  test_cp_async();
  test_shfl();
  test_votes();
  test_barriers();
  test_atomics();
  test_bits();
  test_dynamic_smem();
#if defined(LP_CUDA_EMU)
  test_emulator_diagnostics();
#endif
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
