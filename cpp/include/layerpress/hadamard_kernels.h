// Randomised block-diagonal Walsh–Hadamard transform of the rows of a matrix. Torch-free: raw
// pointers, sizes, row strides and a parallel-for callback (CPU) or a stream (CUDA,
// cuda/include/layerpress/hadamard_cuda.h). Shared by the CPU and CUDA launchers and by the GEMM
// launchers' input rotation.
//
// For a row x of length cols, blocks of `block` consecutive columns (block a power of two,
// 16 <= block <= cols, cols % block == 0) and an optional per-column vector s (the random signs):
//   forward:    y = x · diag(s) · blockdiag(H_block) / sqrt(block)
//   transpose:  y = x · blockdiag(H_block) / sqrt(block) · diag(s)
// H_block is the Sylvester (natural-order) Hadamard matrix, H[i][j] = (-1)^popcount(i & j). With
// s = ±1 the transform is orthogonal and `transpose` is its inverse (and its adjoint, which the
// autograd backward uses). Computed in fp32 (fp64 for fp64 elements), rounded once at the end.
#pragma once
#include <cstdint>
#include <vector>

#include "layerpress/norm_kernels.h"  // NormType: the same four element types as the norms

namespace layerpress {

struct HadamardArgs {
  int64_t rows = 0, cols = 0;
  int64_t block = 0;
  NormType type = NormType::kF32;  // element type of x and y
  bool transpose = false;
  const void* x = nullptr;
  int64_t x_stride = 0;            // elements between rows (unit column stride)
  const float* signs = nullptr;    // optional [cols]
  void* y = nullptr;               // [rows, cols], row stride y_stride
  int64_t y_stride = 0;
};

constexpr int64_t kHadamardMinBlock = 16;
static inline bool valid_hadamard_block(int64_t block, int64_t cols) {
  return block >= kHadamardMinBlock && (block & (block - 1)) == 0 && block <= cols && cols % block == 0;
}

// One CPU variant of the transform.
struct CpuHadamardVariant {
  const char* name;
  bool (*supported)();
  void (*run)(const HadamardArgs&, const ParallelFor&);
};

const std::vector<CpuHadamardVariant>& cpu_hadamard_variants();  // generic first, best last
// Best supported variant, or the one LAYERPRESS_CPU_HADAMARD_KERNEL names (read at every call, so
// tests can switch variants through the environment).
const CpuHadamardVariant& cpu_hadamard_active();

void hadamard_generic(const HadamardArgs&, const ParallelFor&);
void hadamard_avx2(const HadamardArgs&, const ParallelFor&);
void hadamard_avx512(const HadamardArgs&, const ParallelFor&);

// Rows per parallel task: at least ~16k elements of work each.
static inline int64_t hadamard_row_grain(int64_t cols) {
  const int64_t g = 16384 / (cols > 0 ? cols : 1);
  return g < 1 ? 1 : g;
}

}  // namespace layerpress
