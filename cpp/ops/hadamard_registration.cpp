// Schema of the randomised Walsh–Hadamard transform (cpp/include/layerpress/hadamard_kernels.h).
// Kernels per dispatch key in cpp/ops/hadamard_cpu_ops.cpp and cuda/ops/hadamard_cuda_ops.cpp;
// fake and autograd (the transform with `transpose` flipped) in python/layerpress/ops/rotation.py.
// signs: float32 [x.shape[-1]] or None (no sign flips).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(layerpress, m) {
  m.def("hadamard(Tensor x, int block, Tensor? signs=None, bool transpose=False) -> Tensor");
}
