// CPU launchers: check arguments, turn tensors into pointers/QuantParams, call the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "launch_utils.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

std::tuple<Tensor, Tensor, Tensor> quantize_cpu(const Tensor& weight, int64_t bits, int64_t group_size,
                                                int64_t axis, bool symmetric, at::ScalarType scale_dtype,
                                                const optional<Tensor>& scales_in,
                                                const optional<Tensor>& zeros_in) {
  QuantizeSetup q = prepare_quantize(weight, bits, group_size, axis, symmetric, scale_dtype, scales_in, zeros_in);
  const QuantStatus status =
      quantize_rtn(weight.data_ptr(), q.weight_type, q.p, q.codes.data_ptr<uint8_t>(), q.scales.data_ptr(),
                   symmetric ? nullptr : q.zeros.data_ptr<uint8_t>(), q.given, torch_parallel_for());
  TORCH_CHECK_VALUE(status != QuantStatus::kNonFiniteWeight, "weight contains NaN or Inf; cannot quantise it");
  check_scale_overflow(status == QuantStatus::kScaleOverflow, scale_dtype);
  return {q.codes, q.scales, q.zeros};
}

Tensor pack_cpu(const Tensor& codes, int64_t bits) {
  check_pack_codes(codes, bits);
  Tensor out = at::empty({codes.size(0), codes.size(1) * bits / 32}, codes.options().dtype(at::kInt));
  pack_codes(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1), static_cast<int>(bits),
             out.data_ptr<int32_t>(), torch_parallel_for());
  return out;
}

Tensor unpack_cpu(const Tensor& qweight, int64_t bits) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  Tensor out = at::empty({qweight.size(0), K}, qweight.options().dtype(at::kByte));
  unpack_codes(qweight.data_ptr<int32_t>(), qweight.size(0), K, static_cast<int>(bits),
               out.data_ptr<uint8_t>(), torch_parallel_for());
  return out;
}

Tensor dequantize_cpu(const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                      int64_t bits, int64_t group_size, int64_t axis, optional<at::ScalarType> out_dtype) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  Tensor out = at::empty({p.N, p.K}, qweight.options().dtype(out_dtype.value_or(scales.scalar_type())));
  const FloatType ot = float_type_of(out, "out_dtype");
  dequantize(qweight.data_ptr<int32_t>(), scales.data_ptr(), zeros ? zeros->data_ptr<uint8_t>() : nullptr,
             p, out.data_ptr(), ot, torch_parallel_for());
  return out;
}

void check_layout(int64_t layout) {
  TORCH_CHECK_VALUE(layout == static_cast<int64_t>(Layout::kCpuBitplane16),
                    "layout ", layout, " is not a CPU kernel layout; CPU kernels use layout ",
                    static_cast<int>(Layout::kCpuBitplane16), " (cpu_bitplane16)");
}

bool is_canonical(int64_t layout) { return layout == static_cast<int64_t>(Layout::kCanonical); }

// repack/unrepack to or from the canonical layout itself: validated copies.
std::tuple<Tensor, Tensor, Tensor> canonical_copy(const Tensor& qweight, const Tensor& scales,
                                                  const optional<Tensor>& zeros, int64_t bits,
                                                  int64_t group_size, int64_t axis, int64_t N) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  TORCH_CHECK_VALUE(N < 0 || p.N == N, "qweight has ", p.N, " rows but out_features=", N);
  return {qweight.clone(), scales.clone(),
          zeros ? zeros->clone() : at::empty({0}, qweight.options().dtype(at::kByte))};
}

std::tuple<Tensor, Tensor, Tensor> repack_cpu(const Tensor& qweight, const Tensor& scales,
                                              const optional<Tensor>& zeros, int64_t bits,
                                              int64_t group_size, int64_t axis, int64_t layout) {
  if (is_canonical(layout)) return canonical_copy(qweight, scales, zeros, bits, group_size, axis, -1);
  check_layout(layout);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  Tensor q = at::empty({p.row_tiles(), p.K / 32, p.bits, kTileRows}, qweight.options());
  Tensor s = at::empty(bitplane_scale_shape(p), scales.options());
  Tensor z = zeros ? at::empty(bitplane_scale_shape(p), zeros->options())
                   : at::empty({0}, qweight.options().dtype(at::kByte));
  repack_canonical_to_bitplane(qweight.data_ptr<int32_t>(), scales.data_ptr(),
                               zeros ? zeros->data_ptr<uint8_t>() : nullptr, p, q.data_ptr<int32_t>(),
                               s.data_ptr(), zeros ? z.data_ptr<uint8_t>() : nullptr, torch_parallel_for());
  return {q, s, z};
}

// Validates a kCpuBitplane16 weight triple and returns its parameters.
QuantParams bitplane_params(const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                            int64_t bits, int64_t group_size, int64_t axis, int64_t layout, int64_t N) {
  check_layout(layout);
  check_bits(bits);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kInt, "qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 4 && qweight.size(2) == bits && qweight.size(3) == kTileRows,
                    "qweight must have the cpu_bitplane16 shape [ceil(N/16), K/32, bits, 16], got ",
                    qweight.sizes(), " for bits=", bits, " (repack the canonical weight first)");
  check_contiguous(qweight, "qweight");
  const QuantParams p = make_params(N, qweight.size(1) * 32, bits, group_size, axis, !zeros.has_value(),
                                    float_type_of(scales, "scales"));
  TORCH_CHECK_VALUE(qweight.size(0) == p.row_tiles(), "qweight has ", qweight.size(0),
                    " row tiles but out_features=", N, " needs ", p.row_tiles());
  check_scales_zeros(scales, zeros, bitplane_scale_shape(p), qweight, "qweight");
  return p;
}

std::tuple<Tensor, Tensor, Tensor> unrepack_cpu(const Tensor& qweight, const Tensor& scales,
                                                const optional<Tensor>& zeros, int64_t bits,
                                                int64_t group_size, int64_t axis, int64_t layout,
                                                int64_t out_features) {
  if (is_canonical(layout))
    return canonical_copy(qweight, scales, zeros, bits, group_size, axis, out_features);
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  Tensor q = at::empty({p.N, p.words_per_row()}, qweight.options());
  Tensor s = at::empty(canonical_scale_shape(p), scales.options());
  Tensor z = zeros ? at::empty(canonical_scale_shape(p), zeros->options())
                   : at::empty({0}, qweight.options().dtype(at::kByte));
  repack_bitplane_to_canonical(qweight.data_ptr<int32_t>(), scales.data_ptr(),
                               zeros ? zeros->data_ptr<uint8_t>() : nullptr, p, q.data_ptr<int32_t>(),
                               s.data_ptr(), zeros ? z.data_ptr<uint8_t>() : nullptr, torch_parallel_for());
  return {q, s, z};
}


Tensor gemm_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                const optional<Tensor>& bias, int64_t bits, int64_t group_size, int64_t axis, int64_t layout,
                int64_t out_features) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor x2 = flat_activation(x, p.K, "x", "in_features", qweight);
  check_bias(bias, x, p.N, qweight);
  Tensor y = at::empty(with_last_dim(x, p.N), x.options());
  if (x2.size(0) == 0) return y;
  GemmArgs a = gemm_args(p, x2, qweight, scales, zeros, y);
  a.bias = bias ? bias->data_ptr() : nullptr;
  cpu_gemm_active().gemm(a, torch_parallel_for());
  return y;
}

Tensor gemm_t_cpu(const Tensor& grad, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                  int64_t bits, int64_t group_size, int64_t axis, int64_t layout, int64_t out_features) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor g2 = flat_activation(grad, p.N, "grad", "out_features", qweight);
  Tensor y = at::empty(with_last_dim(grad, p.K), grad.options());
  if (g2.size(0) == 0) return y;
  GemmArgs a = gemm_args(p, g2, qweight, scales, zeros, y);
  cpu_gemm_active().gemm_t(a, torch_parallel_for());
  return y;
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CPU, m) {
  m.impl("quantize", &layerpress::quantize_cpu);
  m.impl("pack", &layerpress::pack_cpu);
  m.impl("unpack", &layerpress::unpack_cpu);
  m.impl("dequantize", &layerpress::dequantize_cpu);
  m.impl("repack", &layerpress::repack_cpu);
  m.impl("unrepack", &layerpress::unrepack_cpu);
  m.impl("gemm", &layerpress::gemm_cpu);
  m.impl("gemm_t", &layerpress::gemm_t_cpu);
}
