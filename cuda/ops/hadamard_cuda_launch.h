// The GEMM launchers' input rotation on CUDA (rot_signs, rot_block; see hadamard_launch.h).
// INTERIM, NOT FUSED: the rotation runs as its own hadamard_cuda launch before gemm (into a
// temporary [M, K] activation) and after gemm_t (in place on its output), one extra pass over
// the activation. Fusing it into the GEMM kernel's activation load is future work for the new
// CUDA GEMM kernel (issue 14/22).
#pragma once
#include "cuda_launch.h"
#include "hadamard_launch.h"
#include "layerpress/hadamard_cuda.h"

namespace layerpress {

inline void check_cuda_rotation_block(int64_t block, const char* name) {
  LP_CHECK_VALUE(block <= kHadamardCudaMaxBlock, name, " must be at most ", kHadamardCudaMaxBlock,
                 " on CUDA, got ", block);
}

// x2 rotated into a new contiguous [M, K] tensor of x's dtype (kept alive in the result's copy).
inline RowMatrix rotated_rows_cuda(const RowMatrix& x2, const Tensor& x, int64_t block, const Tensor& signs) {
  check_cuda_rotation_block(block, "rot_block");
  Tensor out = empty_like_device(x, {x2.rows, x2.cols}, x.scalar_type());
  check_launch(hadamard_cuda(hadamard_args(x2, block, signs, false, norm_type_of(x, "x"), out.mutable_data_ptr(),
                                           x2.cols),
                             current_stream(x)),
               "gemm input rotation");
  return RowMatrix{out.const_data_ptr(), x2.rows, x2.cols, x2.cols, out};
}

// y [rows, cols] (contiguous) ← y · Rᵀ in place.
inline void rotate_back_cuda(const Tensor& y, int64_t rows, int64_t cols, int64_t block, const Tensor& signs) {
  check_cuda_rotation_block(block, "rot_block");
  const RowMatrix y2{y.const_data_ptr(), rows, cols, cols, Tensor()};
  check_launch(hadamard_cuda(hadamard_args(y2, block, signs, true, norm_type_of(y, "grad"),
                                           const_cast<void*>(y2.data), cols),
                             current_stream(y)),
               "gemm_t output rotation");
}

}  // namespace layerpress
