// CPU launchers: check arguments, turn tensors into pointers/QuantParams, call the kernels.
#include "cpu_output_cache.h"
#include "hadamard_launch.h"
#include "launch_utils.h"

namespace layerpress {
namespace {

std::tuple<Tensor, Tensor, Tensor> quantize_cpu(Tensor weight, int64_t bits, int64_t group_size, int64_t axis,
                                                bool symmetric, ScalarType scale_dtype, OptTensor scales_in,
                                                OptTensor zeros_in) {
  QuantizeSetup q = prepare_quantize(weight, bits, group_size, axis, symmetric, scale_dtype, scales_in, zeros_in);
  const QuantStatus status =
      quantize_rtn(weight.const_data_ptr(), q.weight_type, q.p, q.codes.mutable_data_ptr<uint8_t>(),
                   q.scales.mutable_data_ptr(), symmetric ? nullptr : q.zeros.mutable_data_ptr<uint8_t>(),
                   q.given, torch_parallel_for());
  LP_CHECK_VALUE(status != QuantStatus::kNonFiniteWeight, "weight contains NaN or Inf; cannot quantise it");
  check_scale_overflow(status == QuantStatus::kScaleOverflow, scale_dtype);
  return {q.codes, q.scales, q.zeros};
}

Tensor pack_cpu(Tensor codes, int64_t bits) {
  check_pack_codes(codes, bits);
  Tensor out = empty_like_device(codes, {codes.size(0), codes.size(1) * bits / 32}, ScalarType::Int);
  pack_codes(codes.const_data_ptr<uint8_t>(), codes.size(0), codes.size(1), static_cast<int>(bits),
             out.mutable_data_ptr<int32_t>(), torch_parallel_for());
  return out;
}

Tensor unpack_cpu(Tensor qweight, int64_t bits) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  Tensor out = empty_like_device(qweight, {qweight.size(0), K}, ScalarType::Byte);
  unpack_codes(qweight.const_data_ptr<int32_t>(), qweight.size(0), K, static_cast<int>(bits),
               out.mutable_data_ptr<uint8_t>(), torch_parallel_for());
  return out;
}

Tensor dequantize_cpu(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits, int64_t group_size,
                      int64_t axis, std::optional<ScalarType> out_dtype) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  const DequantOutput od = dequant_output(out_dtype.value_or(scales.scalar_type()));
  Tensor out = empty_like_device(qweight, {p.N, p.K}, od.kernel_dtype);
  dequantize(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
             zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p, out.mutable_data_ptr(), od.kernel_type,
             torch_parallel_for());
  return od.widen(out);
}

void check_layout(int64_t layout) {
  LP_CHECK_VALUE(layout == static_cast<int64_t>(Layout::kCpuBitplane16), "layout ", layout,
                 " is not a CPU kernel layout; CPU kernels use layout ",
                 static_cast<int>(Layout::kCpuBitplane16), " (cpu_bitplane16)");
}

bool is_canonical(int64_t layout) { return layout == static_cast<int64_t>(Layout::kCanonical); }
bool is_cuda_mma(int64_t layout) { return layout == static_cast<int64_t>(Layout::kCudaMma); }

Tensor empty_zeros_placeholder(const Tensor& like) { return empty_like_device(like, {0}, ScalarType::Byte); }

// repack/unrepack to or from the canonical layout itself: validated copies.
std::tuple<Tensor, Tensor, Tensor> canonical_copy(const Tensor& qweight, const Tensor& scales,
                                                  const OptTensor& zeros, int64_t bits, int64_t group_size,
                                                  int64_t axis, int64_t N) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  LP_CHECK_VALUE(N < 0 || p.N == N, "qweight has ", p.N, " rows but out_features=", N);
  return {torch::stable::clone(qweight), torch::stable::clone(scales),
          zeros ? torch::stable::clone(*zeros) : empty_zeros_placeholder(qweight)};
}

std::tuple<Tensor, Tensor, Tensor> repack_cpu(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits,
                                              int64_t group_size, int64_t axis, int64_t layout) {
  if (is_canonical(layout)) return canonical_copy(qweight, scales, zeros, bits, group_size, axis, -1);
  if (is_cuda_mma(layout)) {  // the CUDA kernels' layout, built here too (tests, offline repacking)
    const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
    Tensor q = empty_like_device(qweight, cuda_mma_qweight_shape(p), ScalarType::Int);
    Tensor s = empty_like_device(scales, cuda_mma_scale_shape(p), scales.scalar_type());
    Tensor z = zeros ? empty_like_device(*zeros, cuda_mma_scale_shape(p), ScalarType::Byte)
                     : empty_zeros_placeholder(qweight);
    repack_canonical_to_cuda_mma(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                                 zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p, q.mutable_data_ptr<int32_t>(),
                                 s.mutable_data_ptr(), zeros ? z.mutable_data_ptr<uint8_t>() : nullptr,
                                 torch_parallel_for());
    return {q, s, z};
  }
  check_layout(layout);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  Tensor q = empty_like_device(qweight, {p.row_tiles(), p.K / 32, p.bits, kTileRows}, ScalarType::Int);
  Tensor s = empty_like_device(scales, bitplane_scale_shape(p), scales.scalar_type());
  Tensor z = zeros ? empty_like_device(*zeros, bitplane_scale_shape(p), ScalarType::Byte)
                   : empty_zeros_placeholder(qweight);
  repack_canonical_to_bitplane(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                               zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p,
                               q.mutable_data_ptr<int32_t>(), s.mutable_data_ptr(),
                               zeros ? z.mutable_data_ptr<uint8_t>() : nullptr, torch_parallel_for());
  return {q, s, z};
}

// Validates a kCpuBitplane16 weight triple and returns its parameters.
QuantParams bitplane_params(const Tensor& qweight, const Tensor& scales, const OptTensor& zeros, int64_t bits,
                            int64_t group_size, int64_t axis, int64_t layout, int64_t N) {
  check_layout(layout);
  check_bits(bits);
  LP_CHECK_TYPE(qweight.scalar_type() == ScalarType::Int, "qweight must be int32, got ", qweight.scalar_type());
  LP_CHECK_VALUE(qweight.dim() == 4 && qweight.size(2) == bits && qweight.size(3) == kTileRows,
                 "qweight must have the cpu_bitplane16 shape [ceil(N/16), K/32, bits, 16], got ",
                 shape_str(qweight), " for bits=", bits, " (repack the canonical weight first)");
  check_contiguous(qweight, "qweight");
  const QuantParams p = make_params(N, qweight.size(1) * 32, bits, group_size, axis, !zeros.has_value(),
                                    float_type_of(scales, "scales"));
  LP_CHECK_VALUE(qweight.size(0) == p.row_tiles(), "qweight has ", qweight.size(0),
                 " row tiles but out_features=", N, " needs ", p.row_tiles());
  check_scales_zeros(scales, zeros, bitplane_scale_shape(p), qweight, "qweight");
  return p;
}

std::tuple<Tensor, Tensor, Tensor> unrepack_cpu(Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits,
                                                int64_t group_size, int64_t axis, int64_t layout,
                                                int64_t out_features) {
  if (is_canonical(layout)) return canonical_copy(qweight, scales, zeros, bits, group_size, axis, out_features);
  if (is_cuda_mma(layout)) {
    const QuantParams p = cuda_mma_params(qweight, scales, zeros, bits, group_size, axis, out_features);
    Tensor q = empty_like_device(qweight, {p.N, p.words_per_row()}, ScalarType::Int);
    Tensor s = empty_like_device(scales, canonical_scale_shape(p), scales.scalar_type());
    Tensor z = zeros ? empty_like_device(*zeros, canonical_scale_shape(p), ScalarType::Byte)
                     : empty_zeros_placeholder(qweight);
    repack_cuda_mma_to_canonical(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                                 zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p, q.mutable_data_ptr<int32_t>(),
                                 s.mutable_data_ptr(), zeros ? z.mutable_data_ptr<uint8_t>() : nullptr,
                                 torch_parallel_for());
    return {q, s, z};
  }
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  Tensor q = empty_like_device(qweight, {p.N, p.words_per_row()}, ScalarType::Int);
  Tensor s = empty_like_device(scales, canonical_scale_shape(p), scales.scalar_type());
  Tensor z = zeros ? empty_like_device(*zeros, canonical_scale_shape(p), ScalarType::Byte)
                   : empty_zeros_placeholder(qweight);
  repack_bitplane_to_canonical(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                               zeros ? zeros->const_data_ptr<uint8_t>() : nullptr, p,
                               q.mutable_data_ptr<int32_t>(), s.mutable_data_ptr(),
                               zeros ? z.mutable_data_ptr<uint8_t>() : nullptr, torch_parallel_for());
  return {q, s, z};
}

// The optional input rotation (rot_block > 0): the GEMM kernels read the activation rows as
// given, so the launcher writes the rotated rows (same dtype) into an output-cache buffer and
// points the kernel at it; gemm_t rotates its output rows back in place (the transform's
// transpose). One extra pass over the M x K activation, none over the weight.
Tensor gemm_cpu(Tensor x, Tensor qweight, Tensor scales, OptTensor zeros, OptTensor bias, int64_t bits,
                int64_t group_size, int64_t axis, int64_t layout, int64_t out_features, OptTensor rot_signs,
                int64_t rot_block) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  RowMatrix x2 = flat_activation(x, p.K, "x", "in_features", qweight);
  check_bias(bias, x, p.N, qweight);
  Tensor signs;
  const bool rotate = gemm_rotation(rot_block, rot_signs, p.K, x, "x", &signs);
  Tensor y = empty_like_device(x, with_last_dim(x, p.N), x.scalar_type());
  if (x2.rows == 0) return y;
  Tensor rotated;
  if (rotate) {
    rotated = empty_cpu_output({x2.rows, p.K}, x.scalar_type());
    cpu_hadamard_active().run(hadamard_args(x2, rot_block, signs, false, norm_type_of(x, "x"),
                                            rotated.mutable_data_ptr(), p.K),
                              torch_parallel_for());
    x2 = RowMatrix{rotated.const_data_ptr(), x2.rows, p.K, p.K, rotated};
  }
  GemmArgs a = gemm_args(p, x2, float_type_of(x, "x"), qweight, scales, zeros, y);
  a.bias = bias ? bias->const_data_ptr() : nullptr;
  cpu_gemm_active().gemm(a, torch_parallel_for());
  return y;
}

Tensor gemm_t_cpu(Tensor grad, Tensor qweight, Tensor scales, OptTensor zeros, int64_t bits, int64_t group_size,
                  int64_t axis, int64_t layout, int64_t out_features, OptTensor rot_signs, int64_t rot_block) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const RowMatrix g2 = flat_activation(grad, p.N, "grad", "out_features", qweight);
  Tensor signs;
  const bool rotate = gemm_rotation(rot_block, rot_signs, p.K, grad, "grad", &signs);
  Tensor y = empty_like_device(grad, with_last_dim(grad, p.K), grad.scalar_type());
  if (g2.rows == 0) return y;
  GemmArgs a = gemm_args(p, g2, float_type_of(grad, "grad"), qweight, scales, zeros, y);
  cpu_gemm_active().gemm_t(a, torch_parallel_for());
  if (rotate) {
    const RowMatrix y2{y.const_data_ptr(), g2.rows, p.K, p.K, Tensor()};
    cpu_hadamard_active().run(hadamard_args(y2, rot_block, signs, true, norm_type_of(grad, "grad"),
                                            y.mutable_data_ptr(), p.K),
                              torch_parallel_for());
  }
  return y;
}

}  // namespace
}  // namespace layerpress

STABLE_TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("quantize", TORCH_BOX(&layerpress::quantize_cpu));
  m.impl("pack", TORCH_BOX(&layerpress::pack_cpu));
  m.impl("unpack", TORCH_BOX(&layerpress::unpack_cpu));
  m.impl("dequantize", TORCH_BOX(&layerpress::dequantize_cpu));
  m.impl("repack", TORCH_BOX(&layerpress::repack_cpu));
  m.impl("unrepack", TORCH_BOX(&layerpress::unrepack_cpu));
  m.impl("gemm", TORCH_BOX(&layerpress::gemm_cpu));
  m.impl("gemm_t", TORCH_BOX(&layerpress::gemm_t_cpu));
}
