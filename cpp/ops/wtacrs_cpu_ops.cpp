// CPU launchers of the WTA-CRS ops: check arguments, turn tensors into pointers, call the kernels
// of cpp/include/layerpress/wtacrs_kernels.h. Schemas in wtacrs_registration.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "layerpress/wtacrs_kernels.h"
#include "wtacrs_launch.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

Tensor row_norms_cpu(const Tensor& x) {
  const Tensor x2 = wtacrs::flat_rows(x, "x");
  Tensor out = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
  if (x2.size(0) == 0) return out;
  wtacrs_row_norms_cpu(x2.data_ptr(), float_type_of(x2, "x"), x2.size(0), x2.size(1),
                       wtacrs::row_stride(x2), out.data_ptr<float>(), torch_parallel_for());
  return out;
}

std::tuple<Tensor, Tensor> select_cpu(const Tensor& norms, int64_t k, int64_t seed) {
  wtacrs::check_norms(norms, k);
  const int64_t M = norms.size(0);
  const auto opts = norms.options();
  if (k >= M)  // every row, exactly
    return {at::arange(M, opts.dtype(at::kLong)), at::ones({M}, opts.dtype(at::kFloat))};
  const wtacrs::Sorted s = wtacrs::sort_for_selection(norms.contiguous(), k);
  Tensor idx = at::empty({k}, opts.dtype(at::kLong));
  Tensor scales = at::empty({k}, opts.dtype(at::kFloat));
  wtacrs_select_cpu(s.sorted.data_ptr<double>(), s.cum.data_ptr<double>(), s.order.data_ptr<int64_t>(),
                    M, k, s.c.data_ptr<int64_t>(), static_cast<uint64_t>(seed), idx.data_ptr<int64_t>(),
                    scales.data_ptr<float>(), torch_parallel_for());
  return {idx, scales};
}

Tensor gather_scale_cpu(const Tensor& x, const Tensor& idx, const optional<Tensor>& scales) {
  const Tensor x2 = wtacrs::flat_rows(x, "x");
  wtacrs::check_idx(idx, x, "x");
  wtacrs::check_scales(scales, idx);
  wtacrs::check_idx_range(idx, x2.size(0), "x");
  Tensor out = at::empty({idx.size(0), x2.size(1)}, x.options());
  if (out.numel() == 0) return out;
  wtacrs_gather_scale_cpu(x2.data_ptr(), float_type_of(x2, "x"), x2.size(1), wtacrs::row_stride(x2),
                          idx.data_ptr<int64_t>(), scales ? scales->data_ptr<float>() : nullptr,
                          idx.size(0), out.data_ptr(), torch_parallel_for());
  return out;
}

Tensor wgrad_cpu(const Tensor& grad, const Tensor& rows, const Tensor& idx, const optional<Tensor>& scales) {
  const Tensor g2 = wtacrs::flat_rows(grad, "grad");
  TORCH_CHECK_VALUE(rows.dim() == 2, "rows must be 2-D [k, in_features], got ", rows.dim(), "-D");
  TORCH_CHECK_TYPE(rows.scalar_type() == grad.scalar_type(), "rows must have the dtype of grad (",
                   grad.scalar_type(), "), got ", rows.scalar_type());
  check_same_device(rows, grad, "rows", "grad");
  check_contiguous(rows, "rows");
  wtacrs::check_idx(idx, grad, "grad");
  TORCH_CHECK_VALUE(idx.size(0) == rows.size(0), "idx has ", idx.size(0), " entries but rows has ",
                    rows.size(0), " rows (one index per compact row)");
  wtacrs::check_scales(scales, idx);
  wtacrs::check_idx_range(idx, g2.size(0), "grad");
  const int64_t N = g2.size(1), D = rows.size(1);
  Tensor dw = at::empty({N, D}, grad.options());
  if (dw.numel() == 0) return dw;
  wtacrs_wgrad_cpu(g2.data_ptr(), wtacrs::row_stride(g2), N, rows.data_ptr(), D, idx.data_ptr<int64_t>(),
                   scales ? scales->data_ptr<float>() : nullptr, idx.size(0), float_type_of(g2, "grad"),
                   dw.data_ptr(), torch_parallel_for());
  return dw;
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("wtacrs_row_norms", &layerpress::row_norms_cpu);
  m.impl("wtacrs_select", &layerpress::select_cpu);
  m.impl("wtacrs_gather_scale", &layerpress::gather_scale_cpu);
  m.impl("wtacrs_wgrad", &layerpress::wgrad_cpu);
}
