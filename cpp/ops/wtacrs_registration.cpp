// Schemas of the WTA-CRS ops (issue 6). Kernels per dispatch key in cpp/ops/wtacrs_cpu_ops.cpp and
// cuda/ops/wtacrs_cuda_ops.cpp; fakes and the Python wrappers in python/layerpress/ops/wtacrs.py.
//
//   wtacrs_row_norms(x [..., D])            -> float32 [M]      (M = tokens = numel / D)
//   wtacrs_select(norms [M], k, seed)       -> (idx int64 [min(k, M)], scales float32 [min(k, M)])
//   wtacrs_gather_scale(x, idx, scales?)    -> [k, D] rows scale_i · x[idx_i] (dtype of x)
//   wtacrs_wgrad(grad [..., N], rows [k, D], idx, scales?) -> [N, D] = Σ_i scale_i grad[idx_i]ᵀ rows[i]
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(layerpress, m) {
  m.def("wtacrs_row_norms(Tensor x) -> Tensor");
  m.def("wtacrs_select(Tensor norms, int k, int seed) -> (Tensor, Tensor)");
  m.def("wtacrs_gather_scale(Tensor x, Tensor idx, Tensor? scales=None) -> Tensor");
  m.def("wtacrs_wgrad(Tensor grad, Tensor rows, Tensor idx, Tensor? scales=None) -> Tensor");
}
