// CUDA launchers: check arguments (same rules and messages as cpp/ops/cpu_ops.cpp), turn tensors
// into pointers/QuantParams, and enqueue the kernels of cuda/include/layerpress/cuda_kernels.h on
// the current stream of the tensors' device. The GEMMs read Layout::kCudaMma (the tensor-core
// kernel, gemm_cuda_mma.cu; QuantLinear's layout on CUDA) or Layout::kCanonical (the simple
// kernels); repack/unrepack to layout 0 are plain copies on CUDA.
#include "cuda_launch.h"
#include "hadamard_cuda_launch.h"
#include "layerpress/cuda_kernels.h"

namespace layerpress {
namespace {

// CUDA kernels read the canonical layout (simple kernels) and kCudaMma (the tensor-core GEMM).
void check_cuda_layout(int64_t layout) {
  LP_CHECK_VALUE(layout == static_cast<int64_t>(Layout::kCanonical) || layout == static_cast<int64_t>(Layout::kCudaMma),
                 "layout ", layout, " is not a CUDA kernel layout; CUDA kernels use layout ",
                 static_cast<int>(Layout::kCudaMma), " (cuda_mma, tensor cores) or ",
                 static_cast<int>(Layout::kCanonical), " (canonical); layout 1 (cpu_bitplane16) is for CPU tensors");
}
bool is_cuda_mma(int64_t layout) { return layout == static_cast<int64_t>(Layout::kCudaMma); }

// ---- format ops -----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> quantize_cuda(Tensor weight, int64_t bits, int64_t group_size, int64_t axis,
                                                 bool symmetric, ScalarType scale_dtype, OptTensor scales_in,
                                                 OptTensor zeros_in) {
  const CudaDeviceGuard guard(weight);
  QuantizeSetup q = prepare_quantize(weight, bits, group_size, axis, symmetric, scale_dtype, scales_in, zeros_in);
  Tensor nonfinite = torch::stable::new_zeros(weight, {1}, ScalarType::Int);
  check_launch(quantize_rtn_cuda(weight.const_data_ptr(), q.weight_type, q.p, q.codes.mutable_data_ptr<uint8_t>(),
                                 q.scales.mutable_data_ptr(),
                                 symmetric ? nullptr : q.zeros.mutable_data_ptr<uint8_t>(), q.given,
                                 nonfinite.mutable_data_ptr<int>(), current_stream(weight)),
               "quantize");
  // Device-to-host reads (synchronise the stream), like the CPU op's eager errors.
  LP_CHECK_VALUE(on_host(nonfinite).const_data_ptr<int>()[0] == 0, "weight contains NaN or Inf; cannot quantise it");
  if (!q.given) {
    const Tensor s = torch::stable::to(on_host(q.scales), ScalarType::Float);
    const float* sp = s.const_data_ptr<float>();
    bool overflow = false;
    for (int64_t i = 0; i < s.numel() && !overflow; ++i) overflow = std::isinf(sp[i]);
    check_scale_overflow(overflow, scale_dtype);
  }
  return {q.codes, q.scales, q.zeros};
}

Tensor pack_cuda(Tensor codes, int64_t bits) {
  const CudaDeviceGuard guard(codes);
  check_pack_codes(codes, bits);
  Tensor out = empty_like_device(codes, {codes.size(0), codes.size(1) * bits / 32}, ScalarType::Int);
  check_launch(pack_codes_cuda(codes.const_data_ptr<uint8_t>(), codes.size(0), codes.size(1),
                               static_cast<int>(bits), out.mutable_data_ptr<int32_t>(), current_stream(codes)),
               "pack");
  return out;
}

Tensor unpack_cuda(Tensor qweight, int64_t bits) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const CudaDeviceGuard guard(qweight);
  Tensor out = empty_like_device(qweight, {qweight.size(0), K}, ScalarType::Byte);
  check_launch(unpack_codes_cuda(qweight.const_data_ptr<int32_t>(), qweight.size(0), K, static_cast<int>(bits),
                                 out.mutable_data_ptr<uint8_t>(), current_stream(qweight)),
               "unpack");
  return out;
}

Tensor dequantize_cuda_op(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits, int64_t group_size,
                          int64_t axis, std::optional<ScalarType> out_dtype) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  const DequantOutput od = dequant_output(out_dtype.value_or(scales.scalar_type()));
  const CudaDeviceGuard guard(qweight);
  Tensor out = empty_like_device(qweight, {p.N, p.K}, od.kernel_dtype);
  check_launch(dequantize_cuda(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                               zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p, out.mutable_data_ptr(), od.kernel_type,
                               current_stream(qweight)),
               "dequantize");
  return od.widen(out);
}

// Layout 0 is what the CUDA kernels read, so "repacking" to it is a copy (new tensors, like every
// other repack). Symmetric weights get an empty zeros tensor, as on the CPU.
std::tuple<Tensor, Tensor, Tensor> canonical_copy(const Tensor& qweight, const Tensor& scales,
                                                  const OptTensor& zeros) {
  const CudaDeviceGuard guard(qweight);
  return {torch::stable::clone(qweight), torch::stable::clone(scales),
          zeros ? torch::stable::clone(*zeros) : empty_like_device(qweight, {0}, ScalarType::Byte)};
}

std::tuple<Tensor, Tensor, Tensor> repack_cuda(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits,
                                               int64_t group_size, int64_t axis, int64_t layout) {
  check_cuda_layout(layout);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  if (!is_cuda_mma(layout)) return canonical_copy(qweight, scales, zeros);
  const CudaDeviceGuard guard(qweight);
  Tensor q = empty_like_device(qweight, cuda_mma_qweight_shape(p), ScalarType::Int);
  Tensor s = empty_like_device(scales, cuda_mma_scale_shape(p), scales.scalar_type());
  Tensor z = empty_like_device(qweight, zeros ? cuda_mma_scale_shape(p) : Shape{0}, ScalarType::Byte);
  check_launch(repack_cuda_mma_cuda(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                                    zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p,
                                    q.mutable_data_ptr<int32_t>(), s.mutable_data_ptr(),
                                    zeros ? z.mutable_data_ptr<uint8_t>() : nullptr, current_stream(qweight)),
               "repack");
  return {q, s, z};
}

std::tuple<Tensor, Tensor, Tensor> unrepack_cuda(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits,
                                                 int64_t group_size, int64_t axis, int64_t layout,
                                                 int64_t out_features) {
  check_cuda_layout(layout);
  if (is_cuda_mma(layout)) {
    const QuantParams p = cuda_mma_params(qweight, scales, zeros, bits, group_size, axis, out_features);
    const CudaDeviceGuard guard(qweight);
    Tensor q = empty_like_device(qweight, {p.N, p.words_per_row()}, ScalarType::Int);
    Tensor s = empty_like_device(scales, canonical_scale_shape(p), scales.scalar_type());
    Tensor z = empty_like_device(qweight, zeros ? canonical_scale_shape(p) : Shape{0}, ScalarType::Byte);
    check_launch(unrepack_cuda_mma_cuda(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                                        zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p,
                                        q.mutable_data_ptr<int32_t>(), s.mutable_data_ptr(),
                                        zeros ? z.mutable_data_ptr<uint8_t>() : nullptr, current_stream(qweight)),
                 "unrepack");
    return {q, s, z};
  }
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  LP_CHECK_VALUE(p.N == out_features, "qweight has ", p.N, " rows but out_features=", out_features);
  return canonical_copy(qweight, scales, zeros);
}

// ---- GEMM -----------------------------------------------------------------------------------------

// Validates a canonical weight for the GEMMs and returns its parameters.
QuantParams gemm_params(const Tensor& qweight, const Tensor& scales, const OptTensor& zeros, int64_t bits,
                        int64_t group_size, int64_t axis, int64_t layout, int64_t N) {
  check_cuda_layout(layout);
  if (is_cuda_mma(layout)) return cuda_mma_params(qweight, scales, zeros, bits, group_size, axis, N);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  LP_CHECK_VALUE(p.N == N, "qweight has ", p.N, " rows but out_features=", N);
  return p;
}

// rot_signs/rot_block: the input rotation, applied by a separate hadamard launch for now
// (hadamard_cuda_launch.h: interim, not fused into the GEMM kernel).
Tensor gemm_cuda(Tensor x, Tensor qweight, Tensor scales, OptTensor zeros, OptTensor bias, int64_t bits,
                 int64_t group_size, int64_t axis, int64_t layout, int64_t out_features, OptTensor rot_signs,
                 int64_t rot_block) {
  const QuantParams p = gemm_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const CudaDeviceGuard guard(qweight);
  RowMatrix x2 = flat_activation(x, p.K, "x", "in_features", qweight);
  check_bias(bias, x, p.N, qweight);
  Tensor signs;
  const bool rotate = gemm_rotation(rot_block, rot_signs, p.K, x, "x", &signs);
  Tensor y = empty_like_device(x, with_last_dim(x, p.N), x.scalar_type());
  if (x2.rows == 0) return y;
  if (rotate) x2 = rotated_rows_cuda(x2, x, rot_block, signs);
  GemmArgs a = gemm_args(p, x2, float_type_of(x, "x"), qweight, scales, zeros, y);
  a.bias = bias ? bias->const_data_ptr() : nullptr;
  if (is_cuda_mma(layout)) {
    const size_t ws_bytes = gemm_cuda_mma_workspace_bytes(a);
    Tensor ws = empty_like_device(qweight, {static_cast<int64_t>(ws_bytes)}, ScalarType::Byte);
    check_launch(gemm_cuda_mma(a, ws_bytes ? ws.mutable_data_ptr() : nullptr, current_stream(qweight)), "gemm");
    return y;
  }
  check_launch(gemm_canonical_cuda(a, current_stream(qweight)), "gemm");
  return y;
}

Tensor gemm_t_cuda(Tensor grad, Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits, int64_t group_size,
                   int64_t axis, int64_t layout, int64_t out_features, OptTensor rot_signs, int64_t rot_block) {
  const QuantParams p = gemm_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const CudaDeviceGuard guard(qweight);
  const RowMatrix g2 = flat_activation(grad, p.N, "grad", "out_features", qweight);
  Tensor signs;
  const bool rotate = gemm_rotation(rot_block, rot_signs, p.K, grad, "grad", &signs);
  Tensor y = empty_like_device(grad, with_last_dim(grad, p.K), grad.scalar_type());
  if (g2.rows == 0) return y;
  GemmArgs a = gemm_args(p, g2, float_type_of(grad, "grad"), qweight, scales, zeros, y);
  check_launch(is_cuda_mma(layout) ? gemm_t_simple_cuda(a, Layout::kCudaMma, current_stream(qweight))
                                    : gemm_t_canonical_cuda(a, current_stream(qweight)),
               "gemm_t");
  if (rotate) rotate_back_cuda(y, g2.rows, p.K, rot_block, signs);
  return y;
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("quantize", TORCH_BOX(&layerpress::quantize_cuda));
  m.impl("pack", TORCH_BOX(&layerpress::pack_cuda));
  m.impl("unpack", TORCH_BOX(&layerpress::unpack_cuda));
  m.impl("dequantize", TORCH_BOX(&layerpress::dequantize_cuda_op));
  m.impl("repack", TORCH_BOX(&layerpress::repack_cuda));
  m.impl("unrepack", TORCH_BOX(&layerpress::unrepack_cuda));
  m.impl("gemm", TORCH_BOX(&layerpress::gemm_cuda));
  m.impl("gemm_t", TORCH_BOX(&layerpress::gemm_t_cuda));
}

// Build facts of this library (layerpress.build_info() merges them).
namespace layerpress {
namespace {
#ifndef LAYERPRESS_CUDA_ARCHS
#define LAYERPRESS_CUDA_ARCHS ""
#endif
std::string cuda_build_info() {
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  return str_cat("{\"cuda_archs\": \"", LAYERPRESS_CUDA_ARCHS, "\", \"cuda_runtime\": \"", runtime / 1000, ".",
                 (runtime % 1000) / 10, "\"}");
}
}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_FRAGMENT(layerpress, m) { m.def("cuda_build_info() -> str"); }

STABLE_TORCH_LIBRARY_IMPL(layerpress, CompositeExplicitAutograd, m) {
  m.impl("cuda_build_info", TORCH_BOX(&layerpress::cuda_build_info));
}
