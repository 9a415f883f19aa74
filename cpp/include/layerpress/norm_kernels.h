// Fused RMSNorm / LayerNorm kernels (forward, backward, optional residual add). Torch-free: raw
// pointers, sizes, row strides and a parallel-for callback (CPU) or a stream (CUDA,
// cuda/include/layerpress/norm_cuda.h). Shared by the CPU and CUDA launchers.
//
// Rows are the flattened leading dimensions of the input; `cols` is the hidden size. Inputs may
// have any row stride (unit column stride); outputs are contiguous [rows, cols].
//   rms:   y = x · rstd · w,            rstd = 1/sqrt(mean(x²) + eps)
//   layer: y = (x − mean) · rstd · w + b, rstd = 1/sqrt(var(x) + eps) (biased variance)
//   fused residual: h = x + residual (rounded to the element type), y = norm(h); returns h too.
// Accumulation is fp32 for fp32/bf16/fp16 elements and fp64 for fp64 elements; mean/rstd are
// stored in the accumulation type (float, or double for fp64).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "layerpress/cpu_kernels.h"

namespace layerpress {

enum class NormType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };
static inline size_t norm_type_size(NormType t) {
  return t == NormType::kF64 ? 8 : (t == NormType::kF32 ? 4 : 2);
}

struct NormFwdArgs {
  int64_t rows = 0, cols = 0;
  NormType type = NormType::kF32;  // element type of x, residual, weight, bias, y, h
  bool center = false;             // false: RMSNorm, true: LayerNorm
  double eps = 1e-6;
  const void* x = nullptr;
  int64_t x_stride = 0;             // elements between rows
  const void* residual = nullptr;   // optional (fused add)
  int64_t res_stride = 0;
  const void* weight = nullptr;     // optional [cols]
  const void* bias = nullptr;       // optional [cols] (LayerNorm only)
  void* y = nullptr;                // [rows, cols]
  void* h = nullptr;                // [rows, cols], required when residual is set
  void* mean = nullptr;             // [rows] accumulation type; LayerNorm only
  void* rstd = nullptr;             // [rows] accumulation type
};

struct NormBwdArgs {
  int64_t rows = 0, cols = 0;
  NormType type = NormType::kF32;
  bool center = false;
  const void* grad_y = nullptr;     // [rows, cols], row stride gy_stride
  int64_t gy_stride = 0;
  const void* x = nullptr;          // the normalised input (h for the fused variants)
  int64_t x_stride = 0;
  const void* weight = nullptr;     // optional [cols]
  const void* mean = nullptr;       // [rows] accumulation type; LayerNorm only
  const void* rstd = nullptr;       // [rows] accumulation type
  const void* grad_h = nullptr;     // optional: gradient flowing into h directly (fused variants)
  int64_t gh_stride = 0;
  void* grad_x = nullptr;           // [rows, cols] contiguous, element type
  void* grad_weight = nullptr;      // optional [cols], element type (needs weight)
  void* grad_bias = nullptr;        // optional [cols], element type (LayerNorm)
};

// One CPU variant of the norm kernels.
struct CpuNormVariant {
  const char* name;
  bool (*supported)();
  void (*forward)(const NormFwdArgs&, const ParallelFor&);
  void (*backward)(const NormBwdArgs&, const ParallelFor&);
};

const std::vector<CpuNormVariant>& cpu_norm_variants();  // generic first, best last
// Best supported variant, or the one LAYERPRESS_CPU_NORM_KERNEL names (read at every call, so
// tests can switch variants through the environment).
const CpuNormVariant& cpu_norm_active();

void norm_forward_generic(const NormFwdArgs&, const ParallelFor&);
void norm_backward_generic(const NormBwdArgs&, const ParallelFor&);
void norm_forward_avx512(const NormFwdArgs&, const ParallelFor&);
void norm_backward_avx512(const NormBwdArgs&, const ParallelFor&);

// Backward weight/bias reduction without atomics: rows are split into at most this many
// blocks; each block writes its own fp32 (fp64) partial row, then the partials are summed.
constexpr int64_t kNormMaxRowBlocks = 64;
static inline int64_t norm_row_blocks(int64_t rows, int64_t cols) {
  // at least ~16k elements of work per block, at most kNormMaxRowBlocks blocks
  int64_t per = (16384 + cols - 1) / cols;
  int64_t nb = (rows + per - 1) / per;
  if (nb > kNormMaxRowBlocks) nb = kNormMaxRowBlocks;
  return nb < 1 ? 1 : nb;
}

}  // namespace layerpress
