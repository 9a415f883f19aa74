// One schema per op. Low-bit types travel as plain ints/bools: bits, group_size (-1 = whole
// row/column), axis (0 = per-OC, 1 = per-IC), layout (0 = canonical, 1 = CPU bit-plane tiles);
// symmetric quantisation is "zeros is None"; rot_signs/rot_block is the optional input rotation R
// (the hadamard op, hadamard_registration.cpp) of a weight stored as W·R, rot_block 0 = none.
// Kernels are registered per dispatch key in cpu_ops.cpp and (when built with CUDA) cuda/ops; fakes and autograd in python/layerpress/ops/quant.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(layerpress, m) {
  m.def("quantize(Tensor weight, int bits, int group_size, int axis, bool symmetric, "
        "ScalarType scale_dtype, Tensor? scales=None, Tensor? zeros=None) -> (Tensor, Tensor, Tensor)");
  m.def("pack(Tensor codes, int bits) -> Tensor");
  m.def("unpack(Tensor qweight, int bits) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "int axis, ScalarType? out_dtype=None) -> Tensor");
  m.def("repack(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, int axis, "
        "int layout) -> (Tensor, Tensor, Tensor)");
  m.def("unrepack(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, int axis, "
        "int layout, int out_features) -> (Tensor, Tensor, Tensor)");
  m.def("gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
        "int group_size, int axis, int layout, int out_features, Tensor? rot_signs=None, int rot_block=0) "
        "-> Tensor");
  m.def("gemm_t(Tensor grad, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
        "int group_size, int axis, int layout, int out_features, Tensor? rot_signs=None, int rot_block=0) "
        "-> Tensor");
  // Build facts and test hooks (module.cpp): ops too, so that C++ callers reach them as well.
  m.def("build_info() -> str");
  m.def("set_cpu_gemm_variant(str name) -> ()");
  m.def("cpu_output_cache_held_bytes() -> int");
}
