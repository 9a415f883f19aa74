// The two CUDA constructs that plain C++ cannot spell, as macros: nvcc gets the real syntax, the
// CUDA emulator (cuda/emu, LP_CUDA_EMU) its launcher and its per-block buffer. Every kernel
// launch and every dynamic shared-memory declaration in cuda/kernels goes through these, so the
// same source compiles for the GPU and for the emulated CI tests.
//
//   LP_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...)   ==  kernel<<<grid, block, smem_bytes, stream>>>(args...)
//   LP_DYNAMIC_SMEM(T, name);                                      ==  extern __shared__ T name[]  (16-byte aligned)
#pragma once
#include <cuda_runtime.h>

#if defined(LP_CUDA_EMU)
#define LP_LAUNCH(grid, block, smem, stream, ...) LP_EMU_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
#define LP_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::lp_emu::dynamic_smem())
#else
// The kernel comes last so that template arguments with commas need no extra parentheses.
#define LP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define LP_DYNAMIC_SMEM(T, name)                          \
  extern __shared__ __align__(16) unsigned char lp_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(lp_dynamic_smem_)
#endif
