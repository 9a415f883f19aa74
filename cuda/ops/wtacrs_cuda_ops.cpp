// CUDA launchers of the WTA-CRS ops: same checks and messages as cpp/ops/wtacrs_cpu_ops.cpp
// (except the idx range check, which would need a device synchronisation), then the kernels of
// cuda/include/layerpress/wtacrs_cuda.h on the current stream. The selection sorts and prefix-sums
// with torch ops and keeps the winner count on the device: no host synchronisation anywhere.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "layerpress/wtacrs_cuda.h"
#include "wtacrs_launch.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

cudaStream_t stream_now() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor row_norms_cuda_op(const Tensor& x) {
  const Tensor x2 = wtacrs::flat_rows(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(wtacrs_row_norms_cuda(x2.data_ptr(), float_type_of(x2, "x"), x2.size(0), x2.size(1),
                                       wtacrs::row_stride(x2), out.data_ptr<float>(), stream_now()));
  return out;
}

std::tuple<Tensor, Tensor> select_cuda_op(const Tensor& norms, int64_t k, int64_t seed) {
  wtacrs::check_norms(norms, k);
  const c10::cuda::CUDAGuard guard(norms.device());
  const int64_t M = norms.size(0);
  const auto opts = norms.options();
  if (k >= M) return {at::arange(M, opts.dtype(at::kLong)), at::ones({M}, opts.dtype(at::kFloat))};
  const wtacrs::Sorted s = wtacrs::sort_for_selection(norms.contiguous(), k);
  Tensor idx = at::empty({k}, opts.dtype(at::kLong));
  Tensor scales = at::empty({k}, opts.dtype(at::kFloat));
  C10_CUDA_CHECK(wtacrs_select_cuda(s.sorted.data_ptr<double>(), s.cum.data_ptr<double>(),
                                    s.order.data_ptr<int64_t>(), M, k, s.c.data_ptr<int64_t>(),
                                    static_cast<uint64_t>(seed), idx.data_ptr<int64_t>(),
                                    scales.data_ptr<float>(), stream_now()));
  return {idx, scales};
}

Tensor gather_scale_cuda_op(const Tensor& x, const Tensor& idx, const optional<Tensor>& scales) {
  const Tensor x2 = wtacrs::flat_rows(x, "x");
  wtacrs::check_idx(idx, x, "x");
  wtacrs::check_scales(scales, idx);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({idx.size(0), x2.size(1)}, x.options());
  C10_CUDA_CHECK(wtacrs_gather_scale_cuda(x2.data_ptr(), float_type_of(x2, "x"), x2.size(1),
                                          wtacrs::row_stride(x2), idx.data_ptr<int64_t>(),
                                          scales ? scales->data_ptr<float>() : nullptr, idx.size(0),
                                          out.data_ptr(), stream_now()));
  return out;
}

Tensor wgrad_cuda_op(const Tensor& grad, const Tensor& rows, const Tensor& idx,
                     const optional<Tensor>& scales) {
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
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t N = g2.size(1), D = rows.size(1);
  Tensor dw = at::empty({N, D}, grad.options());
  C10_CUDA_CHECK(wtacrs_wgrad_cuda(g2.data_ptr(), wtacrs::row_stride(g2), N, rows.data_ptr(), D,
                                   idx.data_ptr<int64_t>(), scales ? scales->data_ptr<float>() : nullptr,
                                   idx.size(0), float_type_of(g2, "grad"), dw.data_ptr(), stream_now()));
  return dw;
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("wtacrs_row_norms", &layerpress::row_norms_cuda_op);
  m.impl("wtacrs_select", &layerpress::select_cuda_op);
  m.impl("wtacrs_gather_scale", &layerpress::gather_scale_cuda_op);
  m.impl("wtacrs_wgrad", &layerpress::wgrad_cuda_op);
}
