// CPU launchers of the WTA-CRS ops: check arguments, turn tensors into pointers, call the kernels
// of cpp/include/layerpress/wtacrs_kernels.h. Schemas in wtacrs_registration.cpp.
#include "layerpress/wtacrs_kernels.h"
#include "wtacrs_launch.h"

namespace layerpress {
namespace {

Tensor row_norms_cpu(const Tensor& x) {
  const RowMatrix x2 = wtacrs::flat_rows(x, "x");
  if (x.size(-1) == 0) return wtacrs::zero_feature_row_norms(x);
  Tensor out = empty_like_device(x, {x2.rows}, ScalarType::Float);
  if (x2.rows == 0) return out;
  wtacrs_row_norms_cpu(x2.data, float_type_of(x, "x"), x2.rows, x2.cols,
                       x2.ld, out.mutable_data_ptr<float>(), torch_parallel_for());
  return out;
}

std::tuple<Tensor, Tensor> select_cpu(const Tensor& norms, int64_t k, int64_t seed) {
  wtacrs::check_norms(norms, k);
  const int64_t M = norms.size(0);
  if (k >= M) return wtacrs::select_all(norms);  // every row, exactly
  const wtacrs::Sorted s = wtacrs::sort_for_selection(as_contiguous(norms), k);
  Tensor idx = empty_like_device(norms, {k}, ScalarType::Long);
  Tensor scales = empty_like_device(norms, {k}, ScalarType::Float);
  wtacrs_select_cpu(s.sorted.const_data_ptr<double>(), s.cum.const_data_ptr<double>(),
                    s.order.const_data_ptr<int64_t>(), M, k, s.c.const_data_ptr<int64_t>(),
                    static_cast<uint64_t>(seed), idx.mutable_data_ptr<int64_t>(),
                    scales.mutable_data_ptr<float>(), torch_parallel_for());
  return {idx, scales};
}

Tensor gather_scale_cpu(const Tensor& x, const Tensor& idx, const OptTensor& scales) {
  const RowMatrix x2 = wtacrs::flat_rows(x, "x");
  wtacrs::check_idx(idx, x, "x");
  wtacrs::check_scales(scales, idx);
  wtacrs::check_idx_range(idx, x2.rows, "x");
  Tensor out = empty_like_device(x, {idx.size(0), x2.cols}, x.scalar_type());
  if (out.numel() == 0) return out;
  wtacrs_gather_scale_cpu(x2.data, float_type_of(x, "x"), x2.cols, x2.ld,
                          idx.const_data_ptr<int64_t>(), scales ? scales->const_data_ptr<float>() : nullptr,
                          idx.size(0), out.mutable_data_ptr(), torch_parallel_for());
  return out;
}

Tensor wgrad_cpu(const Tensor& grad, const Tensor& rows, const Tensor& idx, const OptTensor& scales) {
  const RowMatrix g2 = wtacrs::flat_rows(grad, "grad");
  LP_CHECK_VALUE(rows.dim() == 2, "rows must be 2-D [k, in_features], got ", rows.dim(), "-D");
  LP_CHECK_TYPE(rows.scalar_type() == grad.scalar_type(), "rows must have the dtype of grad (",
                   grad.scalar_type(), "), got ", rows.scalar_type());
  check_same_device(rows, grad, "rows", "grad");
  check_contiguous(rows, "rows");
  wtacrs::check_idx(idx, grad, "grad");
  LP_CHECK_VALUE(idx.size(0) == rows.size(0), "idx has ", idx.size(0), " entries but rows has ",
                    rows.size(0), " rows (one index per compact row)");
  wtacrs::check_scales(scales, idx);
  wtacrs::check_idx_range(idx, g2.rows, "grad");
  const int64_t N = g2.cols, D = rows.size(1);
  Tensor dw = empty_like_device(grad, {N, D}, grad.scalar_type());
  if (dw.numel() == 0) return dw;
  wtacrs_wgrad_cpu(g2.data, g2.ld, N, rows.const_data_ptr(), D, idx.const_data_ptr<int64_t>(),
                   scales ? scales->const_data_ptr<float>() : nullptr, idx.size(0), float_type_of(grad, "grad"),
                   dw.mutable_data_ptr(), torch_parallel_for());
  return dw;
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("wtacrs_row_norms", TORCH_BOX(&layerpress::row_norms_cpu));
  m.impl("wtacrs_select", TORCH_BOX(&layerpress::select_cpu));
  m.impl("wtacrs_gather_scale", TORCH_BOX(&layerpress::gather_scale_cpu));
  m.impl("wtacrs_wgrad", TORCH_BOX(&layerpress::wgrad_cpu));
}
