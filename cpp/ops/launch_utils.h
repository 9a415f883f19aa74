// Launcher helpers: the only layer that sees torch tensors. Turns tensors into pointers and
// QuantParams, checks every argument with a message that names it.
#pragma once
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "layerpress/cpu_kernels.h"

namespace layerpress {

inline ParallelFor torch_parallel_for() {
  return [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, n, grain, body);
  };
}

inline FloatType float_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kBFloat16: return FloatType::kBF16;
    case at::kHalf: return FloatType::kF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline at::ScalarType scalar_type_of(FloatType t) {
  return t == FloatType::kF32 ? at::kFloat : (t == FloatType::kBF16 ? at::kBFloat16 : at::kHalf);
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(valid_bits(static_cast<int>(bits)), "bits must be one of 2, 3, 4, 8, got ", bits);
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// Validates the quantisation parameters of an [N, K] weight and resolves group_size = -1.
inline QuantParams make_params(int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t axis,
                               bool symmetric, FloatType scale_type) {
  check_bits(bits);
  TORCH_CHECK_VALUE(axis == 0 || axis == 1, "axis must be 0 (per-OC groups along K) or 1 (per-IC groups along N), got ", axis);
  TORCH_CHECK_VALUE(valid_group_size(static_cast<int>(group_size)),
                    "group_size must be one of 32, 64, 128, 256 or -1 (whole row/column), got ", group_size);
  TORCH_CHECK_VALUE(N >= 1, "out_features (N) must be >= 1, got ", N);
  TORCH_CHECK_VALUE(K >= 32 && K % kPackBlockK == 0,
                    "in_features (K) must be a positive multiple of 32, got K=", K);
  QuantParams p;
  p.N = N;
  p.K = K;
  p.bits = static_cast<int>(bits);
  p.axis = static_cast<GroupAxis>(axis);
  p.symmetric = symmetric;
  p.scale_type = scale_type;
  if (p.axis == GroupAxis::kPerOC) {
    p.group = group_size == -1 ? static_cast<int>(K) : static_cast<int>(group_size);
    TORCH_CHECK_VALUE(K % p.group == 0, "in_features K=", K, " is not divisible by group_size=",
                      group_size, " (per-OC groups run along K)");
  } else {
    p.group = group_size == -1 ? static_cast<int>(N) : static_cast<int>(group_size);
    TORCH_CHECK_VALUE(N % p.group == 0, "out_features N=", N, " is not divisible by group_size=",
                      group_size, " (per-IC groups run along N)");
  }
  return p;
}

// Checks scales/zeros against an expected shape; returns the scale type.
inline FloatType check_scales_zeros(const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                    at::IntArrayRef expected, const at::Tensor& ref, const char* ref_name) {
  const FloatType st = float_type_of(scales, "scales");
  check_same_device(scales, ref, "scales", ref_name);
  TORCH_CHECK_VALUE(scales.sizes() == expected, "scales must have shape ", expected, ", got ",
                    scales.sizes());
  check_contiguous(scales, "scales");
  if (zeros.has_value()) {
    const at::Tensor& z = *zeros;
    TORCH_CHECK_TYPE(z.scalar_type() == at::kByte, "zeros must be uint8 (integer zero points), got ",
                     z.scalar_type());
    check_same_device(z, ref, "zeros", ref_name);
    TORCH_CHECK_VALUE(z.sizes() == expected, "zeros must have shape ", expected,
                      " (the shape of scales), got ", z.sizes());
    check_contiguous(z, "zeros");
  }
  return st;
}

inline std::vector<int64_t> canonical_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.N, p.K / p.group};
  return {p.K, p.N / p.group};
}
inline std::vector<int64_t> bitplane_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.row_tiles(), p.K / p.group, kTileRows};
  return {p.N / p.group, p.K};
}

// Canonical packed weight: checks dtype/rank/contiguity and returns K.
inline int64_t k_from_canonical(const at::Tensor& qweight, int64_t bits, const char* name) {
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

// Validates a canonical (qweight, scales, zeros) triple and returns its parameters.
inline QuantParams canonical_params(const at::Tensor& qweight, const at::Tensor& scales,
                                    const c10::optional<at::Tensor>& zeros, int64_t bits,
                                    int64_t group_size, int64_t axis) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const QuantParams p = make_params(qweight.size(0), K, bits, group_size, axis, !zeros.has_value(),
                                    float_type_of(scales, "scales"));
  check_scales_zeros(scales, zeros, canonical_scale_shape(p), qweight, "qweight");
  return p;
}

// Activation of a GEMM ([..., cols]) as an [M, cols] matrix. Rows may keep a stride (a view
// when possible); a strided last dimension is copied.
inline at::Tensor flat_activation(const at::Tensor& x, int64_t cols, const char* name, const char* what,
                                  const at::Tensor& qweight) {
  TORCH_CHECK_VALUE(x.dim() >= 1, name, " must have at least 1 dimension");
  float_type_of(x, name);
  check_same_device(x, qweight, name, "qweight");
  TORCH_CHECK_VALUE(x.size(-1) == cols, name, " has last dimension ", x.size(-1), " but the layer's ",
                    what, " is ", cols);
  const bool unit_stride = x.numel() == 0 || x.size(-1) == 1 || x.stride(-1) == 1;
  return (unit_stride ? x : x.contiguous()).reshape({-1, cols});
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N,
                       const at::Tensor& qweight) {
  if (!bias.has_value()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (",
                   x.scalar_type(), "), got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
                    bias->sizes());
  check_same_device(*bias, qweight, "bias", "qweight");
  check_contiguous(*bias, "bias");
}

// Everything quantize needs before its kernel runs: validated parameters and the output tensors
// (given scales/zeros are checked and copied; otherwise empty outputs of the right shapes).
struct QuantizeSetup {
  QuantParams p;
  FloatType weight_type;
  bool given;
  at::Tensor codes, scales, zeros;  // zeros: empty [0] when symmetric
};

inline QuantizeSetup prepare_quantize(const at::Tensor& weight, int64_t bits, int64_t group_size,
                                      int64_t axis, bool symmetric, at::ScalarType scale_dtype,
                                      const c10::optional<at::Tensor>& scales_in,
                                      const c10::optional<at::Tensor>& zeros_in) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ",
                    weight.dim(), "-D");
  QuantizeSetup q;
  q.weight_type = float_type_of(weight, "weight");
  check_contiguous(weight, "weight");
  const at::Tensor probe = at::empty({0}, weight.options().dtype(scale_dtype));
  q.p = make_params(weight.size(0), weight.size(1), bits, group_size, axis, symmetric,
                    float_type_of(probe, "scale_dtype"));
  const auto sshape = canonical_scale_shape(q.p);
  q.given = scales_in.has_value();
  if (q.given) {
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
    q.scales = scales_in->clone();
    q.zeros = zeros_in.has_value() ? zeros_in->clone() : at::empty({0}, weight.options().dtype(at::kByte));
  } else {
    TORCH_CHECK_VALUE(!zeros_in.has_value(), "zeros given without scales");
    q.scales = at::empty(sshape, weight.options().dtype(scale_dtype));
    q.zeros = at::empty(symmetric ? std::vector<int64_t>{0} : sshape, weight.options().dtype(at::kByte));
  }
  q.codes = at::empty({q.p.N, q.p.K}, weight.options().dtype(at::kByte));
  return q;
}

inline void check_scale_overflow(bool overflow, at::ScalarType scale_dtype) {
  TORCH_CHECK_VALUE(!overflow, "a group's scale overflows scale_dtype=", scale_dtype,
                    " (the weight range is too large for it); use float32 or bfloat16 scales");
}

// pack's input: uint8 codes [N, K], K a positive multiple of 32, every code < 2^bits.
inline void check_pack_codes(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D [N, K], got ", codes.dim(), "-D");
  TORCH_CHECK_VALUE(codes.size(1) % 32 == 0 && codes.size(1) > 0,
                    "codes: K must be a positive multiple of 32, got K=", codes.size(1));
  check_contiguous(codes, "codes");
  if (codes.numel() > 0)
    TORCH_CHECK_VALUE(codes.max().item<int64_t>() < (1 << bits), "codes must be < 2^bits = ", 1 << bits,
                      " for bits=", bits, ", got a code ", codes.max().item<int64_t>());
}

// GemmArgs for a validated weight triple, a flattened activation x2 [M, cols] and the output y.
inline GemmArgs gemm_args(const QuantParams& p, const at::Tensor& x2, const at::Tensor& qweight,
                          const at::Tensor& scales, const c10::optional<at::Tensor>& zeros, at::Tensor& y) {
  GemmArgs a;
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

// Output shape of a GEMM: the activation's shape with the last dimension replaced.
inline std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  auto shape = x.sizes().vec();
  shape.back() = last;
  return shape;
}

}  // namespace layerpress
