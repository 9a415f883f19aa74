// CPU kernels for the quantised-weight format. Torch-free: raw pointers, sizes and a
// parallel-for callback supplied by the caller (the torch launcher uses at::parallel_for,
// the benchmark binary uses std::thread).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "layerpress/quant_format.h"

namespace layerpress {

// body(begin, end) is called over disjoint sub-ranges of [0, n) that together cover it.
using ParallelFor =
    std::function<void(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body)>;
ParallelFor serial_for();  // runs the body once over the whole range

// ---- format ops (canonical layout) -------------------------------------------------------------
// Round-to-nearest quantisation of a row-major [N, K] weight of type w_type.
// given_scales: scales (and zeros, if asymmetric) are inputs; otherwise min-max scales are
// computed and written there. On a status other than kOk the codes are undefined.
enum class QuantStatus : int { kOk = 0, kNonFiniteWeight = 1, kScaleOverflow = 2 };
QuantStatus quantize_rtn(const void* w, FloatType w_type, const QuantParams& p, uint8_t* codes,
                  void* scales, uint8_t* zeros, bool given_scales, const ParallelFor& pf);
void pack_codes(const uint8_t* codes, int64_t rows, int64_t K, int bits, int32_t* packed,
                const ParallelFor& pf);
void unpack_codes(const int32_t* packed, int64_t rows, int64_t K, int bits, uint8_t* codes,
                  const ParallelFor& pf);
// Canonical packed weight -> dense [N, K] weight of type out_type.
void dequantize(const int32_t* qweight, const void* scales, const uint8_t* zeros,
                const QuantParams& p, void* out, FloatType out_type, const ParallelFor& pf);

// ---- kCpuBitplane16 -----------------------------------------------------------------------------
// qweight [T=ceil(N/16), K/32, bits, 16] int32: word [t][kb][p][l] bit i is bit p of the code
//   at row 16t+l, column 32kb+i; rows past N are zero.
// per-OC scales/zeros [T, K/g, 16] (padded rows 0); per-IC scales/zeros [N/g, K] (transposed).
int64_t bitplane_qweight_numel(const QuantParams& p);
int64_t bitplane_scales_numel(const QuantParams& p);
void repack_canonical_to_bitplane(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* q_out, void* s_out,
                                  uint8_t* z_out, const ParallelFor& pf);
void repack_bitplane_to_canonical(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* q_out, void* s_out,
                                  uint8_t* z_out, const ParallelFor& pf);

// ---- kCudaMma (the CUDA tensor-core layout, cuda_mma_layout.h) -------------------------------------
// Produced on the CPU too, so CPU tests and the CUDA emulator check it bit for bit.
// qweight [ceil(N/64), K/16, 32*bits] int32; scales/zeros per-OC [ceil(N/64), K/g, 64],
// per-IC [ceil(N/64), K, g == 32 ? 2 : 1] (padding 0).
void repack_canonical_to_cuda_mma(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* q_out, void* s_out,
                                  uint8_t* z_out, const ParallelFor& pf);
void repack_cuda_mma_to_canonical(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* q_out, void* s_out,
                                  uint8_t* z_out, const ParallelFor& pf);

// ---- low-bit GEMM on kCpuBitplane16 -------------------------------------------------------------
// The CPU kernels read GemmArgs (quant_format.h) with the weight in kCpuBitplane16.

// One kernel variant: the forward product Y = X·dequant(W)ᵀ (+ bias) and the transposed
// product Y = G·dequant(W) (the input gradient).
struct CpuGemmVariant {
  const char* name;
  bool (*supported)();  // can this machine run it
  void (*gemm)(const GemmArgs&, const ParallelFor&);
  void (*gemm_t)(const GemmArgs&, const ParallelFor&);
  bool opt_in = false;  // rounds beyond fp32 accumulation: only chosen by name, never automatically
};

const std::vector<CpuGemmVariant>& cpu_gemm_variants();  // generic first, best last, opt-in ones after
const CpuGemmVariant& cpu_gemm_active();   // best supported non-opt-in, or LAYERPRESS_CPU_KERNEL / override
bool cpu_gemm_select(const std::string& name);  // "" resets to automatic; false if unknown/unsupported
std::vector<std::string> cpu_features();
// The CPU-feature checks of the avx2 / avx512 variants (AVX2+FMA; AVX-512 F/BW/VL/DQ+FMA), for
// other kernel families' variant lists.
bool cpu_has_avx2();
bool cpu_has_avx512();
// LAYERPRESS_LUT_MAX_M, read once: forces the largest M of the table-lookup path (tests run both
// GEMM paths at every M with it); -1 when unset.
int64_t lut_max_m_override();
// avx512_bf16: the largest M that stays on the exact table-lookup path (override included).
int64_t bf16_variant_lut_max_m(int bits);
// The smallest M whose forward product (fp32/bf16 activations) the active variant computes from
// bf16-rounded operands, or -1 when it never does for this bit width.
int64_t cpu_gemm_bf16_min_m(int bits);
// The largest M whose forward product the active variant computes from int8 activation tables
// (avx2_lut8; per-OC groups only), or -1 when it never does for this bit width.
int64_t cpu_gemm_int8_table_max_m(int bits);

// Variants (defined in their own translation units, each compiled for its ISA).
void gemm_generic(const GemmArgs&, const ParallelFor&);
void gemm_t_generic(const GemmArgs&, const ParallelFor&);
void gemm_avx2(const GemmArgs&, const ParallelFor&);
void gemm_t_avx2(const GemmArgs&, const ParallelFor&);
void gemm_avx512(const GemmArgs&, const ParallelFor&);
void gemm_t_avx512(const GemmArgs&, const ParallelFor&);
void gemm_avx2_lut8(const GemmArgs&, const ParallelFor&);  // gemm_t: gemm_t_avx2
int64_t avx2_lut8_max_m(int bits);
void gemm_avx512bf16(const GemmArgs&, const ParallelFor&);
void gemm_t_avx512bf16(const GemmArgs&, const ParallelFor&);

}  // namespace layerpress
