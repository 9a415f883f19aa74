// The PTX instructions the tensor-core kernels use, each behind a small named device function:
// inline PTX under nvcc, the emulator's version of the same instruction under LP_CUDA_EMU
// (cuda/emu), so one kernel source runs on the GPU and in the emulated CI tests. Fragment layouts
// are the PTX ISA's (docs/cuda_emulator.md restates them; cuda/emu/tests/ptx_selftest.cu checks
// them against plain matrix products, in the emulator and on a GPU).
//
// Shared-memory pointers are generic addresses of __shared__ (or LP_DYNAMIC_SMEM) storage.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#if defined(LP_CUDA_EMU)
// The emulator's versions take the caller's file and line, for their error messages.
#define LP_PTX_SITE_FIRST ::lp_emu::Site site = ::lp_emu::Site{__builtin_FILE(), __builtin_LINE()}
#define LP_PTX_SITE , LP_PTX_SITE_FIRST
#else
#define LP_PTX_SITE_FIRST
#define LP_PTX_SITE
#endif

namespace layerpress {
namespace ptx {

#if !defined(LP_CUDA_EMU)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ---- ldmatrix.sync.aligned.m8n8{.x1,.x2,.x4}{.trans}.shared.b16 ----------------------------------
// Lane 8i + r passes the address of row r (16 bytes, 16-byte aligned) of matrix i. Register i of
// lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (low half first); with .trans,
// column l/4, rows 2(l%4) and 2(l%4)+1. All 32 lanes must execute it.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 1, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 2, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 4, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 1, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 2, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::ldmatrix(site, 4, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
#endif
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a·b + c ------------------
// g = lane / 4, t = lane % 4; each 32-bit register holds two elements, the lower index in the low half.
//   a[0]: A[g][2t..2t+1]    a[1]: A[g+8][2t..2t+1]    a[2]: A[g][2t+8..2t+9]    a[3]: A[g+8][2t+8..2t+9]
//   b[0]: B[2t..2t+1][g]    b[1]: B[2t+8..2t+9][g]                (B is K x N = 16 x 8)
//   c/d:  [0] C[g][2t]  [1] C[g][2t+1]  [2] C[g+8][2t]  [3] C[g+8][2t+1]
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4] LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::mma_m16n8k16(site, false, d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4] LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::mma_m16n8k16(site, true, d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// ---- cp.async (global -> shared, asynchronous) ------------------------------------------------------
// The destination may be read only after cp_async_wait<N>() has retired the copy's group (and, by
// other threads, after a barrier). The 4- and 8-byte forms cache in L1 (.ca), the 16-byte forms
// only in L2 (.cg). cp_async_16_zfill copies 16 bytes when `valid`, else writes 16 zero bytes.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async(site, smem, gmem, 4, 4);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async(site, smem, gmem, 8, 8);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_u32(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async(site, smem, gmem, 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid LP_PTX_SITE) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async(site, smem, gmem, 16, valid ? 16 : 0);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
#endif
}
// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait(LP_PTX_SITE_FIRST) {
#if defined(LP_CUDA_EMU)
  ::lp_emu::cp_async_wait(site, N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- bit manipulation ---------------------------------------------------------------------------------
// lop3.b32 d, a, b, c, LUT: any 3-input bitwise function; LUT = f(0xF0, 0xCC, 0xAA).
template <uint32_t LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
#if defined(LP_CUDA_EMU)
  return ::lp_emu::lop3(a, b, c, LUT);
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#endif
}
// prmt.b32 d, a, b, sel: byte permute of {b, a} (a holds bytes 0-3); a selector nibble with bit 3
// set replicates the chosen byte's sign.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(LP_CUDA_EMU)
  return ::lp_emu::prmt(a, b, sel);
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#endif
}

}  // namespace ptx
}  // namespace layerpress
