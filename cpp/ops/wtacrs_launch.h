// WTA-CRS launcher helpers shared by the CPU (cpp/ops/wtacrs_cpu_ops.cpp) and CUDA
// (cuda/ops/wtacrs_cuda_ops.cpp) launchers: argument checks with messages that name the argument,
// and the device-independent part of the selection (sorting and prefix sums with torch ops).
#pragma once
#include <cmath>

#include "launch_utils.h"

namespace layerpress {
namespace wtacrs {

// [.., D] activation or gradient as an [M, D] row matrix (see row_matrix in launch_utils.h).
inline RowMatrix flat_rows(const Tensor& x, const char* name) {
  LP_CHECK_VALUE(x.dim() >= 2, name, " must have at least 2 dimensions [..., features] (tokens ",
                 "in the leading dimensions), got a ", x.dim(), "-D tensor");
  float_type_of(x, name);
  return row_matrix(x, x.size(-1));
}

// Tokens (rows) of x [..., D]: the product of the leading dimensions, also when D == 0 (where
// flat_rows' row count, numel / D, is 0).
inline int64_t token_count(const Tensor& x) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) n *= x.size(i);
  return n;
}

// row_norms of rows with no features: every norm is 0 ([tokens], as the fake gives), computed
// without calling a kernel on an empty row (found by the fuzz suite: it returned [0]).
inline Tensor zero_feature_row_norms(const Tensor& x) {
  Tensor out = empty_like_device(x, {token_count(x)}, ScalarType::Float);
  torch::stable::zero_(out);
  return out;
}

inline void check_idx(const Tensor& idx, const Tensor& ref, const char* ref_name) {
  LP_CHECK_TYPE(idx.scalar_type() == ScalarType::Long, "idx must be int64, got ", idx.scalar_type());
  LP_CHECK_VALUE(idx.dim() == 1, "idx must be 1-D [k], got ", idx.dim(), "-D");
  check_same_device(idx, ref, "idx", ref_name);
  check_contiguous(idx, "idx");
}

// idx values in [0, M): checked where that costs no device synchronisation (CPU).
inline void check_idx_range(const Tensor& idx, int64_t M, const char* ref_name) {
  if (idx.numel() == 0 || !idx.is_cpu()) return;
  const int64_t* v = idx.const_data_ptr<int64_t>();
  int64_t lo = v[0], hi = v[0];
  for (int64_t i = 1; i < idx.numel(); ++i) {
    lo = v[i] < lo ? v[i] : lo;
    hi = v[i] > hi ? v[i] : hi;
  }
  LP_CHECK_VALUE(lo >= 0 && hi < M, "idx values must lie in [0, ", M, ") (rows of ", ref_name,
                 "), got values in [", lo, ", ", hi, "]");
}

inline void check_scales(const OptTensor& scales, const Tensor& idx) {
  if (!scales.has_value()) return;
  LP_CHECK_TYPE(scales->scalar_type() == ScalarType::Float, "scales must be float32, got ",
                scales->scalar_type());
  LP_CHECK_VALUE(scales->dim() == 1 && scales->size(0) == idx.size(0),
                 "scales must have shape [k] = [", idx.size(0), "] (one per idx), got ", shape_str(*scales));
  check_same_device(*scales, idx, "scales", "idx");
  check_contiguous(*scales, "scales");
}

// Values of a CPU norms vector (read in place: this runs every training step).
template <typename T>
void check_norm_values(const T* v, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) LP_CHECK_VALUE(std::isfinite(v[i * stride]), "norms must be finite");
  for (int64_t i = 0; i < n; ++i) LP_CHECK_VALUE(v[i * stride] >= 0, "norms must be non-negative");
}

inline void check_norms(const Tensor& norms, int64_t k) {
  LP_CHECK_TYPE(norms.scalar_type() == ScalarType::Float || norms.scalar_type() == ScalarType::Double,
                "norms must be float32 or float64, got ", norms.scalar_type());
  LP_CHECK_VALUE(norms.dim() == 1, "norms must be 1-D [tokens], got ", norms.dim(), "-D");
  LP_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  if (!norms.is_cpu() || norms.numel() == 0) return;
  if (norms.scalar_type() == ScalarType::Float)
    check_norm_values(norms.const_data_ptr<float>(), norms.size(0), norms.stride(0));
  else
    check_norm_values(norms.const_data_ptr<double>(), norms.size(0), norms.stride(0));
}

// The sorted weights, their prefix sums, the sorted order and the number of winners c (a 0-d
// int64 tensor on the device: no synchronisation). The variance rule: c minimises
// (1 − cum_c)/(k − c) over c = 0..k−1, where cum_c is the mass of the c largest probabilities;
// argmin takes the first minimum, so c = 0 unless some c > 0 beats 1/k strictly. Needs k < M.
// Device-independent: ATen ops through the dispatcher shim (the stable headers wrap none of
// sort, cumsum, cat, flip, clamp_min, div, argmin).
struct Sorted {
  Tensor sorted, cum, order, c;
};
inline Sorted sort_for_selection(const Tensor& norms, int64_t k) {
  const Tensor w = torch::stable::to(norms, ScalarType::Double);
  std::array<StableIValue, 4> sort{to_ivalue(w), to_ivalue(std::optional<bool>(true)), to_ivalue(int64_t{0}),
                                   to_ivalue(true)};
  aten_call("aten::sort", "stable", sort);  // (self, *, stable, dim, descending) -> (values, indices)
  const Tensor sorted = from_ivalue<Tensor>(sort[0]), order = from_ivalue<Tensor>(sort[1]);
  std::array<StableIValue, 3> cumsum{to_ivalue(sorted), to_ivalue(int64_t{0}),
                                     to_ivalue(std::optional<ScalarType>())};
  aten_call("aten::cumsum", "", cumsum);
  const Tensor cum = from_ivalue<Tensor>(cumsum[0]);
  const Tensor total = torch::stable::select(cum, 0, cum.size(0) - 1);
  // cum_before[c] = mass of the first c sorted weights, c = 0..k-1.
  Tensor head = cum;
  head = torch::stable::narrow(head, 0, 0, k - 1);
  std::array<StableIValue, 2> cat{to_ivalue(std::vector<Tensor>{torch::stable::new_zeros(cum, {1}), head}),
                                  to_ivalue(int64_t{0})};
  aten_call("aten::cat", "", cat);
  const Tensor before = from_ivalue<Tensor>(cat[0]);
  // k - c for c = 0..k-1: the running count of k ones, reversed.
  std::array<StableIValue, 3> count{to_ivalue(torch::stable::full({k}, 1.0, ScalarType::Double, std::nullopt,
                                                                  cum.device())),
                                    to_ivalue(int64_t{0}), to_ivalue(std::optional<ScalarType>())};
  aten_call("aten::cumsum", "", count);
  std::array<StableIValue, 2> flip{count[0], to_ivalue(std::vector<int64_t>{0})};
  aten_call("aten::flip", "", flip);
  std::array<StableIValue, 2> clamp{to_ivalue(torch::stable::subtract(total, before)),
                                    to_ivalue(torch::stable::new_zeros(cum, {}))};
  aten_call("aten::clamp_min", "Tensor", clamp);
  std::array<StableIValue, 2> div{clamp[0], flip[0]};
  aten_call("aten::div", "Tensor", div);
  std::array<StableIValue, 3> argmin{div[0], to_ivalue(std::optional<int64_t>()), to_ivalue(false)};
  aten_call("aten::argmin", "", argmin);
  return {as_contiguous(sorted), as_contiguous(cum), as_contiguous(order), from_ivalue<Tensor>(argmin[0])};
}

// wtacrs_select for k >= M: every row, exactly (idx = 0..M-1, scales 1), built on the host.
inline std::tuple<Tensor, Tensor> select_all(const Tensor& norms) {
  const int64_t M = norms.size(0);
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  Tensor idx = torch::stable::empty({M}, ScalarType::Long, std::nullopt, cpu);
  int64_t* v = idx.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) v[i] = i;
  Tensor ones = torch::stable::full({M}, 1.0, ScalarType::Float, std::nullopt, cpu);
  if (norms.is_cpu()) return {idx, ones};
  return {torch::stable::to(idx, norms.device()), torch::stable::to(ones, norms.device())};
}

}  // namespace wtacrs
}  // namespace layerpress
