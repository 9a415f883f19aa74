// WTA-CRS launcher helpers shared by the CPU (cpp/ops/wtacrs_cpu_ops.cpp) and CUDA
// (cuda/ops/wtacrs_cuda_ops.cpp) launchers: argument checks with messages that name the argument,
// and the device-independent part of the selection (sorting and prefix sums with torch ops).
#pragma once
#include <ATen/ATen.h>

#include "launch_utils.h"

namespace layerpress {
namespace wtacrs {

// [.., D] activation or gradient -> [M, D] view with unit column stride (rows may keep a stride).
inline at::Tensor flat_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 2, name, " must have at least 2 dimensions [..., features] (tokens ",
                    "in the leading dimensions), got a ", x.dim(), "-D tensor");
  float_type_of(x, name);
  const int64_t D = x.size(-1);
  at::Tensor x2 = x.reshape({-1, D});
  if (x2.numel() > 0 && x2.stride(1) != 1) x2 = x2.contiguous();
  return x2;
}

inline int64_t row_stride(const at::Tensor& x2) { return x2.size(0) > 1 ? x2.stride(0) : x2.size(1); }

inline void check_idx(const at::Tensor& idx, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1, "idx must be 1-D [k], got ", idx.dim(), "-D");
  check_same_device(idx, ref, "idx", ref_name);
  check_contiguous(idx, "idx");
}

// idx values in [0, M): checked where that costs no device synchronisation (CPU).
inline void check_idx_range(const at::Tensor& idx, int64_t M, const char* ref_name) {
  if (idx.numel() == 0 || !idx.device().is_cpu()) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < M, "idx values must lie in [0, ", M, ") (rows of ", ref_name,
                    "), got values in [", lo, ", ", hi, "]");
}

inline void check_scales(const c10::optional<at::Tensor>& scales, const at::Tensor& idx) {
  if (!scales.has_value()) return;
  TORCH_CHECK_TYPE(scales->scalar_type() == at::kFloat, "scales must be float32, got ",
                   scales->scalar_type());
  TORCH_CHECK_VALUE(scales->dim() == 1 && scales->size(0) == idx.size(0),
                    "scales must have shape [k] = [", idx.size(0), "] (one per idx), got ",
                    scales->sizes());
  check_same_device(*scales, idx, "scales", "idx");
  check_contiguous(*scales, "scales");
}

inline void check_norms(const at::Tensor& norms, int64_t k) {
  TORCH_CHECK_TYPE(norms.scalar_type() == at::kFloat || norms.scalar_type() == at::kDouble,
                   "norms must be float32 or float64, got ", norms.scalar_type());
  TORCH_CHECK_VALUE(norms.dim() == 1, "norms must be 1-D [tokens], got ", norms.dim(), "-D");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  if (norms.device().is_cpu() && norms.numel() > 0) {
    TORCH_CHECK_VALUE(at::isfinite(norms).all().item<bool>(), "norms must be finite");
    TORCH_CHECK_VALUE(norms.min().item<double>() >= 0.0, "norms must be non-negative");
  }
}

// The sorted weights, their prefix sums, the sorted order and the number of winners c (a 0-d
// int64 tensor on the device: no synchronisation). The variance rule: c minimises
// (1 − cum_c)/(k − c) over c = 0..k−1, where cum_c is the mass of the c largest probabilities;
// argmin takes the first minimum, so c = 0 unless some c > 0 beats 1/k strictly. Needs k < M.
struct Sorted {
  at::Tensor sorted, cum, order, c;
};
inline Sorted sort_for_selection(const at::Tensor& norms, int64_t k) {
  const at::Tensor w = norms.to(at::kDouble);
  auto [sorted, order] = w.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
  at::Tensor cum = sorted.cumsum(0);
  const at::Tensor total = cum.select(0, cum.size(0) - 1);
  // cum_before[c] = mass of the first c sorted weights, c = 0..k-1.
  const at::Tensor before = at::cat({at::zeros({1}, cum.options()), cum.slice(0, 0, k - 1)});
  const at::Tensor denom = at::arange(k, 0, -1, cum.options());  // k - c
  const at::Tensor objective = (total - before).clamp_min(0.0) / denom;
  return {sorted.contiguous(), cum.contiguous(), order.contiguous(), objective.argmin()};
}

}  // namespace wtacrs
}  // namespace layerpress
