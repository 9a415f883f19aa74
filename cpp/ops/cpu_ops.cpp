// CPU launchers: check arguments, turn tensors into pointers/QuantParams, call the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "launch_utils.h"

namespace layerpress {
namespace {

using at::Tensor;
using c10::optional;

int64_t k_from_canonical(const Tensor& qweight, int64_t bits, const char* name) {
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kInt, name, " must be int32 (packed codes), got ",
                   qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, name, " must be 2-D [N, K*bits/32] (canonical layout), got ",
                    qweight.dim(), "-D");
  check_contiguous(qweight, name);
  check_bits(bits);
  TORCH_CHECK_VALUE(qweight.size(1) % bits == 0, name, " has ", qweight.size(1),
                    " words per row, not a multiple of bits=", bits,
                    " (each 32 codes take exactly `bits` words)");
  return qweight.size(1) * 32 / bits;
}

std::tuple<Tensor, Tensor, Tensor> quantize_cpu(const Tensor& weight, int64_t bits, int64_t group_size,
                                                int64_t axis, bool symmetric, at::ScalarType scale_dtype,
                                                const optional<Tensor>& scales_in,
                                                const optional<Tensor>& zeros_in) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
                    weight.dim(), "-D");
  const FloatType wt = float_type_of(weight, "weight");
  check_contiguous(weight, "weight");
  const Tensor probe = at::empty({0}, weight.options().dtype(scale_dtype));
  const FloatType st = float_type_of(probe, "scale_dtype");
  QuantParams p = make_params(weight.size(0), weight.size(1), bits, group_size, axis, symmetric, st);
  const auto sshape = canonical_scale_shape(p);
  const bool given = scales_in.has_value();
  Tensor scales, zeros;
  if (given) {
    TORCH_CHECK_VALUE(symmetric != zeros_in.has_value(),
                      symmetric ? "zeros must be None for symmetric quantisation"
                                : "asymmetric quantisation with given scales needs zeros too");
    TORCH_CHECK_TYPE(scales_in->scalar_type() == scale_dtype, "scales have dtype ",
                     scales_in->scalar_type(), " but scale_dtype is ", scale_dtype);
    check_scales_zeros(*scales_in, zeros_in, sshape, weight, "weight");
    TORCH_CHECK_VALUE(at::isfinite(*scales_in).all().item<bool>() && (*scales_in != 0).all().item<bool>(),
                      "scales must be finite and non-zero");
    if (zeros_in.has_value())
      TORCH_CHECK_VALUE(zeros_in->max().item<int64_t>() <= (1 << bits) - 1, "zeros must be <= 2^bits - 1 = ",
                        (1 << bits) - 1, " for bits=", bits);
    scales = scales_in->clone();
    zeros = zeros_in.has_value() ? zeros_in->clone() : at::empty({0}, weight.options().dtype(at::kByte));
  } else {
    TORCH_CHECK_VALUE(!zeros_in.has_value(), "zeros given without scales");
    scales = at::empty(sshape, weight.options().dtype(scale_dtype));
    zeros = at::empty(symmetric ? std::vector<int64_t>{0} : sshape, weight.options().dtype(at::kByte));
  }
  Tensor codes = at::empty({p.N, p.K}, weight.options().dtype(at::kByte));
  const QuantStatus status = quantize_rtn(weight.data_ptr(), wt, p, codes.data_ptr<uint8_t>(), scales.data_ptr(),
                               symmetric ? nullptr : zeros.data_ptr<uint8_t>(), given, torch_parallel_for());
  TORCH_CHECK_VALUE(status != QuantStatus::kNonFiniteWeight, "weight contains NaN or Inf; cannot quantise it");
  TORCH_CHECK_VALUE(status != QuantStatus::kScaleOverflow, "a group's scale overflows scale_dtype=",
                    scale_dtype, " (the weight range is too large for it); use float32 or bfloat16 scales");
  return {codes, scales, zeros};
}

Tensor pack_cpu(const Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D [N, K], got ", codes.dim(), "-D");
  TORCH_CHECK_VALUE(codes.size(1) % 32 == 0 && codes.size(1) > 0,
                    "codes: K must be a positive multiple of 32, got K=", codes.size(1));
  check_contiguous(codes, "codes");
  if (codes.numel() > 0)
    TORCH_CHECK_VALUE(codes.max().item<int64_t>() < (1 << bits), "codes must be < 2^bits = ", 1 << bits,
                      " for bits=", bits, ", got a code ", codes.max().item<int64_t>());
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
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const FloatType st = float_type_of(scales, "scales");
  const QuantParams p = make_params(qweight.size(0), K, bits, group_size, axis, !zeros.has_value(), st);
  check_scales_zeros(scales, zeros, canonical_scale_shape(p), qweight, "qweight");
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
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  TORCH_CHECK_VALUE(N < 0 || qweight.size(0) == N, "qweight has ", qweight.size(0),
                    " rows but out_features=", N);
  const QuantParams p = make_params(qweight.size(0), K, bits, group_size, axis, !zeros.has_value(),
                                    float_type_of(scales, "scales"));
  check_scales_zeros(scales, zeros, canonical_scale_shape(p), qweight, "qweight");
  return {qweight.clone(), scales.clone(),
          zeros ? zeros->clone() : at::empty({0}, qweight.options().dtype(at::kByte))};
}

std::tuple<Tensor, Tensor, Tensor> repack_cpu(const Tensor& qweight, const Tensor& scales,
                                              const optional<Tensor>& zeros, int64_t bits,
                                              int64_t group_size, int64_t axis, int64_t layout) {
  if (is_canonical(layout)) return canonical_copy(qweight, scales, zeros, bits, group_size, axis, -1);
  check_layout(layout);
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const FloatType st = float_type_of(scales, "scales");
  const QuantParams p = make_params(qweight.size(0), K, bits, group_size, axis, !zeros.has_value(), st);
  check_scales_zeros(scales, zeros, canonical_scale_shape(p), qweight, "qweight");
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

// Shared by gemm and gemm_t: activation checks and the flattened [M, cols] view.
Tensor flat_activation(const Tensor& x, int64_t cols, const char* name, const char* what,
                       const Tensor& qweight) {
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least 1 dimension");
  float_type_of(x, name);
  check_same_device(x, qweight, name, "qweight");
  TORCH_CHECK_VALUE(x.size(-1) == cols, name, " has last dimension ", x.size(-1), " but the layer's ",
                    what, " is ", cols);
  // Rows may keep a stride (a view when possible); a strided last dimension is copied.
  const bool unit_stride = x.numel() == 0 || x.size(-1) == 1 || x.stride(-1) == 1;
  return (unit_stride ? x : x.contiguous()).reshape({-1, cols});
}

CpuGemmArgs gemm_args(const QuantParams& p, const Tensor& x2, const Tensor& qweight, const Tensor& scales,
                      const optional<Tensor>& zeros, Tensor& y) {
  CpuGemmArgs a;
  a.p = p;
  a.qweight = qweight.data_ptr<int32_t>();
  a.scales = scales.data_ptr();
  a.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  a.M = x2.size(0);
  a.act_type = float_type_of(x2, "x");
  a.x = x2.data_ptr();
  a.ldx = x2.size(0) > 1 ? x2.stride(0) : x2.size(1);
  a.y = y.data_ptr();
  return a;
}

Tensor gemm_cpu(const Tensor& x, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                const optional<Tensor>& bias, int64_t bits, int64_t group_size, int64_t axis, int64_t layout,
                int64_t out_features) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor x2 = flat_activation(x, p.K, "x", "in_features", qweight);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (",
                     x.scalar_type(), "), got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.N, "bias must have shape [", p.N, "], got ",
                      bias->sizes());
    check_same_device(*bias, qweight, "bias", "qweight");
    check_contiguous(*bias, "bias");
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = p.N;
  Tensor y = at::empty(out_shape, x.options());
  if (x2.size(0) == 0) return y;
  CpuGemmArgs a = gemm_args(p, x2, qweight, scales, zeros, y);
  a.bias = bias ? bias->data_ptr() : nullptr;
  cpu_gemm_active().gemm(a, torch_parallel_for());
  return y;
}

Tensor gemm_t_cpu(const Tensor& grad, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                  int64_t bits, int64_t group_size, int64_t axis, int64_t layout, int64_t out_features) {
  const QuantParams p = bitplane_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor g2 = flat_activation(grad, p.N, "grad", "out_features", qweight);
  auto out_shape = grad.sizes().vec();
  out_shape.back() = p.K;
  Tensor y = at::empty(out_shape, grad.options());
  if (g2.size(0) == 0) return y;
  CpuGemmArgs a = gemm_args(p, g2, qweight, scales, zeros, y);
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
