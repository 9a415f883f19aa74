// Schemas of the fused norm ops (one per op). Kernels per dispatch key in cpp/ops/norm_cpu_ops.cpp
// and cuda/ops/norm_cuda_ops.cpp; fakes and autograd in python/layerpress/ops/norm.py.
// mean/rstd are float32 (float64 for float64 inputs) of shape x.shape[:-1]; the backward ops
// return empty [0] tensors for gradients that were not asked for.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(layerpress, m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps) "
        "-> (Tensor y, Tensor h, Tensor rstd)");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd, Tensor? grad_h, "
        "bool weight_grad) -> (Tensor grad_x, Tensor grad_weight)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "Tensor? grad_h, bool weight_grad, bool bias_grad) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}
