// Format ops on the GPU: quantise, pack, unpack, dequantise (canonical layout). Each kernel is
// a direct port of its CPU counterpart in cpp/kernels/quant_cpu.cpp and must give bit-identical
// results: the same fp32 operations in the same order, IEEE division (__fdiv_rn, whatever the
// compiler flags), round-half-even (rintf == std::nearbyint in the default rounding mode), and
// round-to-nearest-even conversions to bf16/fp16. These run once per weight, so they are written
// for clarity: one thread per group / 32-code block / element, grid-stride loops.
#include "device_common.cuh"
#include "layerpress/cuda_kernels.h"

namespace layerpress {
namespace {

using device::DeviceQuant;
using device::grid_for;
using device::load_as_float;
using device::round_to;
using device::store_from_float;

constexpr int kThreads = 256;

// std::min / std::max exactly (they differ from fminf/fmaxf on signed zeros).
__device__ __forceinline__ float std_min(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float std_max(float a, float b) { return a < b ? b : a; }

// Stores the scale rounded to its storage type and returns the value the codes must use.
// A zero (or underflowed) scale is stored as 1 so that dequantisation stays finite.
__device__ float store_rounded_scale(void* scales, int64_t i, FloatType t, float s) {
  float stored = round_to(s, t);
  if (stored == 0.0f) stored = 1.0f;
  store_from_float(scales, i, t, stored);
  return stored;
}

// Quantises one group: `count` weights at w[base + j*stride]; the scale/zero index is sz.
// Returns false (writing nothing) if the group holds a NaN/Inf. Port of quantize_group.
__device__ bool quantize_group(const void* w, FloatType wt, int64_t base, int64_t stride,
                               int64_t count, const DeviceQuant& p, uint8_t* codes, void* scales,
                               uint8_t* zeros, int64_t sz, bool given) {
  float lo = 0.0f, hi = 0.0f, amax = 0.0f;
  bool finite = true;
  for (int64_t j = 0; j < count; ++j) {
    const float v = load_as_float(w, base + j * stride, wt);
    if (!isfinite(v)) finite = false;
    lo = std_min(lo, v);
    hi = std_max(hi, v);
    amax = std_max(amax, fabsf(v));
  }
  if (!finite) return false;
  const int32_t qmax = p.qmax();
  float s;
  int32_t z;
  if (given) {
    s = load_as_float(scales, sz, p.scale_type);
    z = p.symmetric ? p.sym_zero() : static_cast<int32_t>(zeros[sz]);
  } else if (p.symmetric) {
    const int32_t levels = p.sym_zero() - 1 > 0 ? p.sym_zero() - 1 : 1;  // 2^(bits-1) - 1, >= 1
    s = store_rounded_scale(scales, sz, p.scale_type, __fdiv_rn(amax, static_cast<float>(levels)));
    z = p.sym_zero();
  } else {
    s = store_rounded_scale(scales, sz, p.scale_type, __fdiv_rn(hi - lo, static_cast<float>(qmax)));
    z = static_cast<int32_t>(
        std_min(std_max(rintf(__fdiv_rn(-lo, s)), 0.0f), static_cast<float>(qmax)));
    zeros[sz] = static_cast<uint8_t>(z);
  }
  for (int64_t j = 0; j < count; ++j) {
    const float v = load_as_float(w, base + j * stride, wt);
    float q = rintf(__fdiv_rn(v, s)) + static_cast<float>(z);
    q = std_min(std_max(q, 0.0f), static_cast<float>(qmax));
    codes[base + j * stride] = static_cast<uint8_t>(q);  // codes share the weight's [N, K] indexing
  }
  return true;
}

// One thread per group. Per-OC: group (n, g) = w[n, g*group .. +group), scale [n, g].
// Per-IC: group (k, g) = w[g*group .. +group, k], scale [k, g]; consecutive threads take
// consecutive columns k so that their loads coalesce.
__global__ void quantize_kernel(const void* w, FloatType wt, DeviceQuant p, uint8_t* codes,
                                void* scales, uint8_t* zeros, bool given, int* nonfinite) {
  const int64_t G = p.groups;
  const int64_t total = (p.per_oc ? p.N : p.K) * G;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bool ok;
    if (p.per_oc) {
      const int64_t n = t / G, g = t % G;
      ok = quantize_group(w, wt, n * p.K + g * p.group, 1, p.group, p, codes, scales, zeros,
                          n * G + g, given);
    } else {
      const int64_t g = t / p.K, k = t % p.K;
      ok = quantize_group(w, wt, g * p.group * p.K + k, p.K, p.group, p, codes, scales, zeros,
                          k * G + g, given);
    }
    if (!ok) *nonfinite = 1;  // every writer stores the same value: no atomic needed
  }
}

// One thread per 32-code block of a row. 32 codes fill exactly `bits` words, so block b of a row
// owns words [b*bits, (b+1)*bits) and no code straddles out of its block. Port of pack_codes.
__global__ void pack_kernel(const uint8_t* codes, int64_t rows, int64_t K, int bits,
                            int32_t* packed) {
  const int64_t blocks_per_row = K / kPackBlockK, words_per_row = K * bits / 32;
  const int64_t total = rows * blocks_per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / blocks_per_row, b = t % blocks_per_row;
    const uint8_t* c = codes + r * K + b * kPackBlockK;
    uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // bits <= 8 words per block
#pragma unroll 1
    for (int i = 0; i < kPackBlockK; ++i) {
      const int bit = i * bits;  // offset inside the block's first word
      const int sh = bit & 31;
      words[bit >> 5] |= static_cast<uint32_t>(c[i]) << sh;
      if (sh + bits > 32) words[(bit >> 5) + 1] |= static_cast<uint32_t>(c[i]) >> (32 - sh);
    }
    uint32_t* out = reinterpret_cast<uint32_t*>(packed + r * words_per_row + b * bits);
    for (int i = 0; i < bits; ++i) out[i] = words[i];
  }
}

// One thread per code. Port of unpack_codes.
__global__ void unpack_kernel(const int32_t* packed, int64_t rows, int64_t K, int bits,
                              uint8_t* codes) {
  const int64_t words_per_row = K * bits / 32, total = rows * K;
  const uint32_t* u = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / K, k = t % K;
    codes[t] = static_cast<uint8_t>(device::extract_code(u + r * words_per_row, k, bits));
  }
}

// One thread per weight. Port of dequantize.
__global__ void dequantize_kernel(const int32_t* qweight, const void* scales, const uint8_t* zeros,
                                  DeviceQuant p, void* out, FloatType ot) {
  const uint32_t* q = reinterpret_cast<const uint32_t*>(qweight);
  const int64_t total = p.N * p.K;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = t / p.K, k = t % p.K;
    store_from_float(out, t, ot, p.weight(q, scales, zeros, n, k));
  }
}

}  // namespace

cudaError_t quantize_rtn_cuda(const void* w, FloatType w_type, const QuantParams& p, uint8_t* codes,
                              void* scales, uint8_t* zeros, bool given_scales, int* nonfinite,
                              cudaStream_t stream) {
  const int64_t groups = (p.axis == GroupAxis::kPerOC ? p.N : p.K) * p.groups_per_line();
  if (groups <= 0) return cudaSuccess;
  LP_LAUNCH(grid_for(groups, kThreads), kThreads, 0, stream, quantize_kernel)(
      w, w_type, DeviceQuant::from(p), codes, scales, zeros, given_scales, nonfinite);
  return cudaGetLastError();
}

cudaError_t pack_codes_cuda(const uint8_t* codes, int64_t rows, int64_t K, int bits,
                            int32_t* packed, cudaStream_t stream) {
  const int64_t blocks = rows * (K / kPackBlockK);
  if (blocks <= 0) return cudaSuccess;
  LP_LAUNCH(grid_for(blocks, kThreads), kThreads, 0, stream, pack_kernel)(codes, rows, K, bits, packed);
  return cudaGetLastError();
}

cudaError_t unpack_codes_cuda(const int32_t* packed, int64_t rows, int64_t K, int bits,
                              uint8_t* codes, cudaStream_t stream) {
  const int64_t n = rows * K;
  if (n <= 0) return cudaSuccess;
  LP_LAUNCH(grid_for(n, kThreads), kThreads, 0, stream, unpack_kernel)(packed, rows, K, bits, codes);
  return cudaGetLastError();
}

cudaError_t dequantize_cuda(const int32_t* qweight, const void* scales, const uint8_t* zeros,
                            const QuantParams& p, void* out, FloatType out_type,
                            cudaStream_t stream) {
  const int64_t n = p.N * p.K;
  if (n <= 0) return cudaSuccess;
  LP_LAUNCH(grid_for(n, kThreads), kThreads, 0, stream, dequantize_kernel)(
      qweight, scales, zeros, DeviceQuant::from(p), out, out_type);
  return cudaGetLastError();
}

}  // namespace layerpress
