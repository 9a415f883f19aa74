// Device-side helpers shared by the CUDA kernels (private to cuda/kernels/): element-type
// conversions, code extraction from the canonical bit stream, and the dequantisation of one
// weight. Each mirrors a CPU helper in quant_format.h / quant_cpu.cpp operation for operation.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "layerpress/quant_format.h"

namespace layerpress {
namespace device {

constexpr int kWarpSize = 32;

// Grid size for a grid-stride loop over `n` elements with `threads` per block. The cap keeps the
// grid well inside every limit; the loops cover whatever the grid does not.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
}

// ---- element types --------------------------------------------------------------------------------
// The conversions round to nearest even (overflow to inf) like f32_to_bf16 / f32_to_f16; the
// widening ones are exact. NaN payloads are not reproduced (kernels never store a NaN scale).
__device__ __forceinline__ float load_as_float(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kF32: return static_cast<const float*>(p)[i];
    case FloatType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return __half2float(static_cast<const __half*>(p)[i]);
  }
}
__device__ __forceinline__ void store_from_float(void* p, int64_t i, FloatType t, float v) {
  switch (t) {
    case FloatType::kF32: static_cast<float*>(p)[i] = v; break;
    case FloatType::kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
  }
}
// v rounded to type t and read back: what store_float + load_float give on the CPU.
__device__ __forceinline__ float round_to(float v, FloatType t) {
  switch (t) {
    case FloatType::kF32: return v;
    case FloatType::kBF16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return __half2float(__float2half_rn(v));
  }
}

// Typed activations for the GEMMs (x, bias, y share one type).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// ---- canonical layout -----------------------------------------------------------------------------
// Code k of one canonical row: bits [k*bits, k*bits + bits) of the LSB-first stream of 32-bit
// words; a 3-bit code may straddle two words. Same as extract_code in quant_cpu.cpp.
__device__ __forceinline__ uint32_t extract_code(const uint32_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t word = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  uint64_t v = row[word] >> sh;
  if (sh + bits > 32) v |= static_cast<uint64_t>(row[word + 1]) << (32 - sh);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1u);
}

// QuantParams resolved for device code (QuantParams' own methods are host-only).
struct DeviceQuant {
  int64_t N = 0, K = 0;
  int64_t words_per_row = 0;  // K * bits / 32
  int64_t groups = 0;         // groups per line: K/g (per-OC) or N/g (per-IC)
  int bits = 4;
  int group = 128;
  bool per_oc = true;
  bool symmetric = false;
  FloatType scale_type = FloatType::kF32;

  static DeviceQuant from(const QuantParams& p) {
    DeviceQuant d;
    d.N = p.N;
    d.K = p.K;
    d.words_per_row = p.words_per_row();
    d.groups = p.groups_per_line();
    d.bits = p.bits;
    d.group = p.group;
    d.per_oc = p.axis == GroupAxis::kPerOC;
    d.symmetric = p.symmetric;
    d.scale_type = p.scale_type;
    return d;
  }

  __device__ __forceinline__ int32_t qmax() const { return (1 << bits) - 1; }
  __device__ __forceinline__ int32_t sym_zero() const { return 1 << (bits - 1); }
  // Index into the canonical scales/zeros of the weight at (n, k).
  __device__ __forceinline__ int64_t scale_index(int64_t n, int64_t k) const {
    return per_oc ? n * groups + k / group : k * groups + n / group;
  }
  // Dequantised weight (q - z) * s at (n, k), in fp32 exactly as the CPU dequantize computes it
  // (__fmul_rn: one correctly rounded product, never contracted into a later FMA).
  __device__ __forceinline__ float weight(const uint32_t* qweight, const void* scales,
                                          const uint8_t* zeros, int64_t n, int64_t k) const {
    const int64_t sz = scale_index(n, k);
    const int32_t zero = symmetric ? sym_zero() : static_cast<int32_t>(zeros[sz]);
    const int32_t code = static_cast<int32_t>(extract_code(qweight + n * words_per_row, k, bits));
    return __fmul_rn(static_cast<float>(code - zero), load_as_float(scales, sz, scale_type));
  }
};

}  // namespace device
}  // namespace layerpress
