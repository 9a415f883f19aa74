// Launcher helpers: the only layer that sees torch tensors. Turns tensors into pointers and
// QuantParams, checks every argument with a message that names it.
#pragma once
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "layerpress/cpu_kernels.h"

namespace layerpress {

inline ParallelFor torch_parallel_for() {
  return [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, grain, body);
  };
}

inline FloatType float_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kBFloat16: return FloatType::kBF16;
    case at::kHalf: return FloatType::kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline at::ScalarType scalar_type_of(FloatType t) {
  return t == FloatType::kF32 ? at::kFloat : (t == FloatType::kBF16 ? at::kBFloat16 : at::kHalf);
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(valid_bits(static_cast<int>(bits)), "bits must be one of 2, 3, 4, 8, got ", bits);
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// Validates the quantisation parameters of an [N, K] weight and resolves group_size = -1.
inline QuantParams make_params(int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t axis,
                               bool symmetric, FloatType scale_type) {
  check_bits(bits);
  TORCH_CHECK_VALUE(axis == 0 || axis == 1, "axis must be 0 (per-OC groups along K) or 1 (per-IC groups along N), got ", axis);
  TORCH_CHECK_VALUE(valid_group_size(static_cast<int>(group_size)),
                    "group_size must be one of 32, 64, 128, 256 or -1 (whole row/column), got ", group_size);
  TORCH_CHECK_VALUE(N >= 1, "out_features (N) must be >= 1, got ", N);
  TORCH_CHECK_VALUE(K >= 32 && K % kPackBlockK == 0,
                    "in_features (K) must be a positive multiple of 32, got K=", K);
  QuantParams p;
  p.N = N;
  p.K = K;
  p.bits = static_cast<int>(bits);
  p.axis = static_cast<GroupAxis>(axis);
  p.symmetric = symmetric;
  p.scale_type = scale_type;
  if (p.axis == GroupAxis::kPerOC) {
    p.group = group_size == -1 ? static_cast<int>(K) : static_cast<int>(group_size);
    TORCH_CHECK_VALUE(K % p.group == 0, "in_features K=", K, " is not divisible by group_size=",
                      group_size, " (per-OC groups run along K)");
  } else {
    p.group = group_size == -1 ? static_cast<int>(N) : static_cast<int>(group_size);
    TORCH_CHECK_VALUE(N % p.group == 0, "out_features N=", N, " is not divisible by group_size=",
                      group_size, " (per-IC groups run along N)");
  }
  return p;
}

// Checks scales/zeros against an expected shape; returns the scale type.
inline FloatType check_scales_zeros(const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                    at::IntArrayRef expected, const at::Tensor& ref, const char* ref_name) {
  const FloatType st = float_type_of(scales, "scales");
  check_same_device(scales, ref, "scales", ref_name);
  TORCH_CHECK_VALUE(scales.sizes() == expected, "scales must have shape ", expected, ", got ",
                    scales.sizes());
  check_contiguous(scales, "scales");
  if (zeros.has_value()) {
    const at::Tensor& z = *zeros;
    TORCH_CHECK_TYPE(z.scalar_type() == at::kByte, "zeros must be uint8 (integer zero points), got ",
                     z.scalar_type());
    check_same_device(z, ref, "zeros", ref_name);
    TORCH_CHECK_VALUE(z.sizes() == expected, "zeros must have shape ", expected,
                      " (the shape of scales), got ", z.sizes());
    check_contiguous(z, "zeros");
  }
  return st;
}

inline std::vector<int64_t> canonical_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.N, p.K / p.group};
  return {p.K, p.N / p.group};
}
inline std::vector<int64_t> bitplane_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.row_tiles(), p.K / p.group, kTileRows};
  return {p.N / p.group, p.K};
}

}  // namespace layerpress
