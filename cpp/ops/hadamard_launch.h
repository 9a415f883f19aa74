// Argument checks and tensor -> HadamardArgs plumbing shared by the CPU and CUDA launchers of
// the hadamard op and by the GEMM launchers' input rotation (rot_signs, rot_block), so every
// path gives the same messages.
#pragma once
#include "launch_utils.h"
#include "layerpress/hadamard_kernels.h"
#include "norm_launch.h"

namespace layerpress {

// Checks a rotation (block, signs) for rows of `cols` elements on `ref`'s device; returns the
// signs as a contiguous tensor (undefined when None). `what` names the block argument.
inline Tensor check_rotation(int64_t block, const OptTensor& signs, int64_t cols, const Tensor& ref,
                             const char* block_name, const char* signs_name, const char* ref_name) {
  LP_CHECK_VALUE(valid_hadamard_block(block, cols), block_name,
                 " must be a power of two >= 16 that divides the row length ", cols, ", got ", block);
  if (!signs.has_value()) return Tensor();
  const Tensor& s = *signs;
  LP_CHECK_TYPE(s.scalar_type() == ScalarType::Float, signs_name, " must be float32, got ", s.scalar_type());
  check_same_device(s, ref, signs_name, ref_name);
  LP_CHECK_VALUE(s.dim() == 1 && s.size(0) == cols, signs_name, " must have shape [", cols,
                 "] (one sign per column), got ", shape_str(s));
  return as_contiguous(s);
}

// HadamardArgs for rows of a row matrix into y (row stride y_stride); s from check_rotation.
inline HadamardArgs hadamard_args(const RowMatrix& x2, int64_t block, const Tensor& s, bool transpose,
                                  NormType type, void* y, int64_t y_stride) {
  HadamardArgs a;
  a.rows = x2.rows;
  a.cols = x2.cols;
  a.block = block;
  a.type = type;
  a.transpose = transpose;
  a.x = x2.data;
  a.x_stride = x2.ld;
  a.signs = s.defined() ? s.const_data_ptr<float>() : nullptr;
  a.y = y;
  a.y_stride = y_stride;
  return a;
}

struct HadamardPlan {
  HadamardArgs a;
  RowMatrix x2;
  Tensor s, y;
};

inline HadamardPlan plan_hadamard(const Tensor& x, int64_t block, const OptTensor& signs, bool transpose,
                                  FullOutputAlloc alloc) {
  const NormType type = norm_type_of(x, "x");
  LP_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension (..., n), got a 0-D tensor");
  HadamardPlan p;
  const int64_t C = x.size(-1);
  p.s = check_rotation(block, signs, C, x, "block", "signs", "x");
  p.x2 = row_matrix(x, C);
  p.y = alloc(x);
  p.a = hadamard_args(p.x2, block, p.s, transpose, type, p.y.mutable_data_ptr(), C);
  return p;
}

// The GEMM launchers' optional rotation of the activation (gemm: y = rot(x) · Wᵀ) or of the
// input gradient (gemm_t: y = (G · W) · rotᵀ). rot_block = 0 means none (signs must be None).
inline bool gemm_rotation(int64_t rot_block, const OptTensor& rot_signs, int64_t cols, const Tensor& x,
                          const char* x_name, Tensor* signs_out) {
  if (rot_block == 0) {
    LP_CHECK_VALUE(!rot_signs.has_value(), "rot_signs given but rot_block=0 (no rotation); pass rot_block too");
    return false;
  }
  *signs_out = check_rotation(rot_block, rot_signs, cols, x, "rot_block", "rot_signs", x_name);
  return true;
}

}  // namespace layerpress
