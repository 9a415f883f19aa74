// Launcher helpers: the only layer that sees torch tensors. Turns tensors into pointers and
// QuantParams, checks every argument with a message that names it.
//
// Everything here uses the LibTorch stable ABI only (torch/csrc/stable, torch/headeronly, built
// with TORCH_TARGET_VERSION = 2.10): the built library calls libtorch through its versioned C
// shim, never through C++ symbols, so one build loads on every torch from 2.10 on.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "layerpress/cpu_kernels.h"
#include "layerpress/cuda_mma_layout.h"

namespace layerpress {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using Shape = std::vector<int64_t>;

// ---- errors ---------------------------------------------------------------------------------------
// The stable ABI has no stable c10::ValueError/TypeError. Argument errors are thrown as
// std::invalid_argument whose message starts with a tag naming the Python type it stands for,
// "[ValueError] " or "[TypeError] ". Through torch.ops that arrives as ValueError (torch 2.13
// hands it to pybind11's translation) or RuntimeError; layerpress's Python wrappers
// (layerpress/_errors.py) re-raise it as the tagged type without the tag.
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] inline void throw_value_error(const std::string& msg) {
  throw std::invalid_argument("[ValueError] " + msg);
}
[[noreturn]] inline void throw_type_error(const std::string& msg) {
  throw std::invalid_argument("[TypeError] " + msg);
}

#define LP_CHECK_VALUE(cond, ...) \
  do {                            \
    if (!(cond)) ::layerpress::throw_value_error(::layerpress::str_cat(__VA_ARGS__)); \
  } while (0)
#define LP_CHECK_TYPE(cond, ...) \
  do {                           \
    if (!(cond)) ::layerpress::throw_type_error(::layerpress::str_cat(__VA_ARGS__)); \
  } while (0)

// ---- printing (for messages) -----------------------------------------------------------------------
struct ShapeStr {
  Shape s;
};
inline std::ostream& operator<<(std::ostream& os, const ShapeStr& v) {
  os << '[';
  for (size_t i = 0; i < v.s.size(); ++i) os << (i ? ", " : "") << v.s[i];
  return os << ']';
}
inline Shape shape_of(const Tensor& t) {
  const auto s = t.sizes();
  return Shape(s.begin(), s.end());
}
inline ShapeStr shape_str(const Tensor& t) { return {shape_of(t)}; }
inline ShapeStr shape_str(const Shape& s) { return {s}; }

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return str_cat("cuda:", static_cast<int>(t.get_device_index()));
  return str_cat("device type ", static_cast<int>(t.device().type()));
}

// ---- tensors ---------------------------------------------------------------------------------------
inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda() &&
         (a.is_cpu() || a.get_device_index() == b.get_device_index());
}

// Calls an ATen op by name through the dispatcher shim: `stack` holds the arguments and receives
// the returns. For the few ops the stable headers do not wrap (sort, cumsum, cat, ...).
template <size_t N>
void aten_call(const char* name, const char* overload, std::array<StableIValue, N>& stack) {
  const AOTITorchError err = torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION);
  if (err != AOTI_TORCH_SUCCESS) throw std::runtime_error(str_cat("layerpress: ", name, " failed"));
}
template <typename T>
StableIValue to_ivalue(const T& v) {
  return torch::stable::detail::from(v);
}
template <typename T>
T from_ivalue(StableIValue v) {
  return torch::stable::detail::to<T>(v);
}

inline int32_t shim_dtype(ScalarType t) { return from_ivalue<int32_t>(to_ivalue(t)); }

// A new uninitialised contiguous tensor on `like`'s device. One direct shim call: the stable
// wrappers (new_empty, empty) go through the boxed dispatcher, about 2 us a call, which is most
// of a small op's time.
inline Tensor empty_like_device(const Tensor& like, const Shape& shape, ScalarType dtype) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i] > 0 ? shape[i] : 1;
  }
  int32_t device_type = 0;
  if (aoti_torch_get_device_type(like.get(), &device_type) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("layerpress: could not read a tensor's device");
  AtenTensorHandle out = nullptr;
  if (aoti_torch_empty_strided(static_cast<int64_t>(shape.size()), shape.data(), strides.data(), shim_dtype(dtype),
                               device_type, like.get_device_index(), &out) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error(str_cat("layerpress: could not allocate a tensor of shape ", shape_str(shape)));
  return Tensor(out);
}

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// A CPU copy (or the tensor itself when it is already on the CPU) for host-side checks.
inline Tensor on_host(const Tensor& t) {
  if (t.is_cpu()) return as_contiguous(t);
  return as_contiguous(torch::stable::to(t, torch::stable::Device(torch::headeronly::DeviceType::CPU)));
}

inline ParallelFor torch_parallel_for() {
  return [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    torch::stable::parallel_for(0, n, grain, body);
  };
}

// ---- dtypes ----------------------------------------------------------------------------------------
inline FloatType float_type_of(ScalarType t, const char* name) {
  switch (t) {
    case ScalarType::Float: return FloatType::kF32;
    case ScalarType::BFloat16: return FloatType::kBF16;
    case ScalarType::Half: return FloatType::kF16;
    default:
      throw_type_error(str_cat(name, " must be float32, bfloat16 or float16, got ", t));
  }
}
inline FloatType float_type_of(const Tensor& t, const char* name) { return float_type_of(t.scalar_type(), name); }

// dequantize's output dtype: the kernels write float32/bfloat16/float16; float64 is their float32
// result widened (the dequantised values are computed in float32 anyway).
struct DequantOutput {
  ScalarType dtype, kernel_dtype;
  FloatType kernel_type;
  Tensor widen(const Tensor& out) const {
    return dtype == kernel_dtype ? out : torch::stable::to(out, dtype);
  }
};
inline DequantOutput dequant_output(ScalarType dtype) {
  LP_CHECK_TYPE(dtype == ScalarType::Float || dtype == ScalarType::BFloat16 || dtype == ScalarType::Half ||
                    dtype == ScalarType::Double,
                "out_dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  const ScalarType k = dtype == ScalarType::Double ? ScalarType::Float : dtype;
  return {dtype, k, float_type_of(k, "out_dtype")};
}

inline void check_bits(int64_t bits) {
  LP_CHECK_VALUE(valid_bits(static_cast<int>(bits)), "bits must be one of 2, 3, 4, 8, got ", bits);
}

inline void check_contiguous(const Tensor& t, const char* name) {
  LP_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  LP_CHECK_VALUE(same_device(t, ref), name, " is on ", device_str(t), " but ", ref_name, " is on ",
                 device_str(ref));
}

// ---- quantisation parameters -------------------------------------------------------------------------

// Validates the quantisation parameters of an [N, K] weight and resolves group_size = -1.
inline QuantParams make_params(int64_t N, int64_t K, int64_t bits, int64_t group_size, int64_t axis,
                               bool symmetric, FloatType scale_type) {
  check_bits(bits);
  LP_CHECK_VALUE(axis == 0 || axis == 1,
                 "axis must be 0 (per-OC groups along K) or 1 (per-IC groups along N), got ", axis);
  LP_CHECK_VALUE(valid_group_size(static_cast<int>(group_size)),
                 "group_size must be one of 32, 64, 128, 256 or -1 (whole row/column), got ", group_size);
  LP_CHECK_VALUE(N >= 1, "out_features (N) must be >= 1, got ", N);
  LP_CHECK_VALUE(K >= 32 && K % kPackBlockK == 0, "in_features (K) must be a positive multiple of 32, got K=", K);
  QuantParams p;
  p.N = N;
  p.K = K;
  p.bits = static_cast<int>(bits);
  p.axis = static_cast<GroupAxis>(axis);
  p.symmetric = symmetric;
  p.scale_type = scale_type;
  if (p.axis == GroupAxis::kPerOC) {
    p.group = group_size == -1 ? static_cast<int>(K) : static_cast<int>(group_size);
    LP_CHECK_VALUE(K % p.group == 0, "in_features K=", K, " is not divisible by group_size=", group_size,
                   " (per-OC groups run along K)");
  } else {
    p.group = group_size == -1 ? static_cast<int>(N) : static_cast<int>(group_size);
    LP_CHECK_VALUE(N % p.group == 0, "out_features N=", N, " is not divisible by group_size=", group_size,
                   " (per-IC groups run along N)");
  }
  return p;
}

// Checks scales/zeros against an expected shape; returns the scale type.
inline FloatType check_scales_zeros(const Tensor& scales, const OptTensor& zeros, const Shape& expected,
                                    const Tensor& ref, const char* ref_name) {
  const FloatType st = float_type_of(scales, "scales");
  check_same_device(scales, ref, "scales", ref_name);
  LP_CHECK_VALUE(shape_of(scales) == expected, "scales must have shape ", shape_str(expected), ", got ",
                 shape_str(scales));
  check_contiguous(scales, "scales");
  if (zeros.has_value()) {
    const Tensor& z = *zeros;
    LP_CHECK_TYPE(z.scalar_type() == ScalarType::Byte, "zeros must be uint8 (integer zero points), got ",
                  z.scalar_type());
    check_same_device(z, ref, "zeros", ref_name);
    LP_CHECK_VALUE(shape_of(z) == expected, "zeros must have shape ", shape_str(expected),
                   " (the shape of scales), got ", shape_str(z));
    check_contiguous(z, "zeros");
  }
  return st;
}

inline Shape canonical_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.N, p.K / p.group};
  return {p.K, p.N / p.group};
}
inline Shape bitplane_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {p.row_tiles(), p.K / p.group, kTileRows};
  return {p.N / p.group, p.K};
}

// Canonical packed weight: checks dtype/rank/contiguity and returns K.
inline int64_t k_from_canonical(const Tensor& qweight, int64_t bits, const char* name) {
  LP_CHECK_TYPE(qweight.scalar_type() == ScalarType::Int, name, " must be int32 (packed codes), got ",
                qweight.scalar_type());
  LP_CHECK_VALUE(qweight.dim() == 2, name, " must be 2-D [N, K*bits/32] (canonical layout), got ",
                 qweight.dim(), "-D");
  check_contiguous(qweight, name);
  check_bits(bits);
  LP_CHECK_VALUE(qweight.size(1) % bits == 0, name, " has ", qweight.size(1),
                 " words per row, not a multiple of bits=", bits, " (each 32 codes take exactly `bits` words)");
  return qweight.size(1) * 32 / bits;
}

// Validates a canonical (qweight, scales, zeros) triple and returns its parameters.
inline QuantParams canonical_params(const Tensor& qweight, const Tensor& scales, const OptTensor& zeros,
                                    int64_t bits, int64_t group_size, int64_t axis) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const QuantParams p = make_params(qweight.size(0), K, bits, group_size, axis, !zeros.has_value(),
                                    float_type_of(scales, "scales"));
  check_scales_zeros(scales, zeros, canonical_scale_shape(p), qweight, "qweight");
  return p;
}

// ---- Layout::kCudaMma (cuda_mma_layout.h) ---------------------------------------------------------
inline Shape cuda_mma_qweight_shape(const QuantParams& p) {
  return {mma_layout::n_tiles(p.N), p.K / mma_layout::kTileK, mma_layout::words_per_tile(p.bits)};
}
inline Shape cuda_mma_scale_shape(const QuantParams& p) {
  if (p.axis == GroupAxis::kPerOC) return {mma_layout::n_tiles(p.N), p.K / p.group, mma_layout::kTileN};
  return {mma_layout::n_tiles(p.N), p.K, mma_layout::ic_groups_per_strip(p.group)};
}
// Validates a kCudaMma weight triple for out_features N and returns its parameters.
inline QuantParams cuda_mma_params(const Tensor& qweight, const Tensor& scales, const OptTensor& zeros,
                                   int64_t bits, int64_t group_size, int64_t axis, int64_t N) {
  check_bits(bits);
  LP_CHECK_TYPE(qweight.scalar_type() == ScalarType::Int, "qweight must be int32, got ", qweight.scalar_type());
  LP_CHECK_VALUE(qweight.dim() == 3 && qweight.size(2) == 32 * bits,
                 "qweight must have the cuda_mma shape [ceil(N/64), K/16, 32*bits], got ", shape_str(qweight),
                 " for bits=", bits, " (repack the canonical weight with layout=2 first)");
  check_contiguous(qweight, "qweight");
  const QuantParams p = make_params(N, qweight.size(1) * mma_layout::kTileK, bits, group_size, axis,
                                    !zeros.has_value(), float_type_of(scales, "scales"));
  LP_CHECK_VALUE(qweight.size(0) == mma_layout::n_tiles(N), "qweight has ", qweight.size(0),
                 " 64-column strips but out_features=", N, " needs ", mma_layout::n_tiles(N));
  check_scales_zeros(scales, zeros, cuda_mma_scale_shape(p), qweight, "qweight");
  return p;
}

// A tensor [..., cols] read as a row-major [rows, cols] matrix: pointer, rows and row stride. x
// itself when its leading dimensions collapse to one stride and its last dimension is
// unit-stride (no tensor op at all), else a contiguous copy, kept alive in `copy`.
struct RowMatrix {
  const void* data = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  Tensor copy;
};
inline RowMatrix row_matrix(const Tensor& x, int64_t cols) {
  RowMatrix m;
  m.cols = cols;
  m.rows = cols > 0 ? x.numel() / cols : 0;
  const int64_t d = x.dim();
  const auto sizes = x.sizes();
  const auto strides = x.strides();
  bool viewable = x.numel() == 0 || sizes[d - 1] == 1 || strides[d - 1] == 1;
  int64_t ld = cols, expect = -1;  // expect: the stride the next outer non-trivial dim must have
  for (int64_t i = d - 2; i >= 0 && viewable; --i) {
    if (sizes[i] == 1) continue;
    if (expect < 0) ld = strides[i];
    else viewable = strides[i] == expect;
    expect = strides[i] * sizes[i];
  }
  if (viewable) {
    m.data = x.const_data_ptr();
    m.ld = m.rows > 1 ? ld : cols;
  } else {
    m.copy = torch::stable::contiguous(x);
    m.data = m.copy.const_data_ptr();
    m.ld = cols;
  }
  return m;
}

// Activation of a GEMM ([..., cols]) as an [M, cols] matrix (see row_matrix), after its checks.
inline RowMatrix flat_activation(const Tensor& x, int64_t cols, const char* name, const char* what,
                                 const Tensor& qweight) {
  LP_CHECK_VALUE(x.dim() >= 1, name, " must have at least 1 dimension");
  float_type_of(x, name);
  check_same_device(x, qweight, name, "qweight");
  LP_CHECK_VALUE(x.size(-1) == cols, name, " has last dimension ", x.size(-1), " but the layer's ", what,
                 " is ", cols);
  return row_matrix(x, cols);
}

inline void check_bias(const OptTensor& bias, const Tensor& x, int64_t N, const Tensor& qweight) {
  if (!bias.has_value()) return;
  LP_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(),
                "), got ", bias->scalar_type());
  LP_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape [", N, "], got ",
                 shape_str(*bias));
  check_same_device(*bias, qweight, "bias", "qweight");
  check_contiguous(*bias, "bias");
}

// Given scales must be finite and non-zero, given zeros at most 2^bits - 1: checked on a host
// copy (small tensors; quantize is not on a hot path).
inline void check_given_scales(const Tensor& scales, const OptTensor& zeros, int64_t bits) {
  const Tensor s = torch::stable::to(on_host(scales), ScalarType::Float);
  const float* sp = s.const_data_ptr<float>();
  for (int64_t i = 0; i < s.numel(); ++i)
    LP_CHECK_VALUE(std::isfinite(sp[i]) && sp[i] != 0.0f, "scales must be finite and non-zero");
  if (!zeros.has_value()) return;
  const Tensor z = on_host(*zeros);
  const uint8_t* zp = z.const_data_ptr<uint8_t>();
  const int64_t zmax = (int64_t{1} << bits) - 1;
  for (int64_t i = 0; i < z.numel(); ++i)
    LP_CHECK_VALUE(zp[i] <= zmax, "zeros must be <= 2^bits - 1 = ", zmax, " for bits=", bits);
}

// Everything quantize needs before its kernel runs: validated parameters and the output tensors
// (given scales/zeros are checked and copied; otherwise empty outputs of the right shapes).
struct QuantizeSetup {
  QuantParams p;
  FloatType weight_type;
  bool given;
  Tensor codes, scales, zeros;  // zeros: empty [0] when symmetric
};

inline QuantizeSetup prepare_quantize(const Tensor& weight, int64_t bits, int64_t group_size, int64_t axis,
                                      bool symmetric, ScalarType scale_dtype, const OptTensor& scales_in,
                                      const OptTensor& zeros_in) {
  LP_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got ", weight.dim(), "-D");
  QuantizeSetup q;
  q.weight_type = float_type_of(weight, "weight");
  check_contiguous(weight, "weight");
  q.p = make_params(weight.size(0), weight.size(1), bits, group_size, axis, symmetric,
                    float_type_of(scale_dtype, "scale_dtype"));
  const Shape sshape = canonical_scale_shape(q.p);
  q.given = scales_in.has_value();
  if (q.given) {
    LP_CHECK_VALUE(symmetric != zeros_in.has_value(),
                   symmetric ? "zeros must be None for symmetric quantisation"
                             : "asymmetric quantisation with given scales needs zeros too");
    LP_CHECK_TYPE(scales_in->scalar_type() == scale_dtype, "scales have dtype ", scales_in->scalar_type(),
                  " but scale_dtype is ", scale_dtype);
    check_scales_zeros(*scales_in, zeros_in, sshape, weight, "weight");
    check_given_scales(*scales_in, zeros_in, bits);
    q.scales = torch::stable::clone(*scales_in);
    q.zeros = zeros_in.has_value() ? torch::stable::clone(*zeros_in)
                                   : empty_like_device(weight, {0}, ScalarType::Byte);
  } else {
    LP_CHECK_VALUE(!zeros_in.has_value(), "zeros given without scales");
    q.scales = empty_like_device(weight, sshape, scale_dtype);
    q.zeros = empty_like_device(weight, symmetric ? Shape{0} : sshape, ScalarType::Byte);
  }
  q.codes = empty_like_device(weight, {q.p.N, q.p.K}, ScalarType::Byte);
  return q;
}

inline void check_scale_overflow(bool overflow, ScalarType scale_dtype) {
  LP_CHECK_VALUE(!overflow, "a group's scale overflows scale_dtype=", scale_dtype,
                 " (the weight range is too large for it); use float32 or bfloat16 scales");
}

// pack's input: uint8 codes [N, K], K a positive multiple of 32, every code < 2^bits (checked
// on a host copy for device tensors).
inline void check_pack_codes(const Tensor& codes, int64_t bits) {
  check_bits(bits);
  LP_CHECK_TYPE(codes.scalar_type() == ScalarType::Byte, "codes must be uint8, got ", codes.scalar_type());
  LP_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D [N, K], got ", codes.dim(), "-D");
  LP_CHECK_VALUE(codes.size(1) % 32 == 0 && codes.size(1) > 0,
                 "codes: K must be a positive multiple of 32, got K=", codes.size(1));
  check_contiguous(codes, "codes");
  if (codes.numel() == 0) return;
  uint8_t mx = 0;
  if (codes.is_cpu()) {
    const uint8_t* c = codes.const_data_ptr<uint8_t>();
    for (int64_t i = 0; i < codes.numel(); ++i) mx = c[i] > mx ? c[i] : mx;
  } else {  // reduce on the device, copy one byte back
    std::array<StableIValue, 1> max{to_ivalue(codes)};
    aten_call("aten::max", "", max);
    mx = on_host(from_ivalue<Tensor>(max[0])).const_data_ptr<uint8_t>()[0];
  }
  LP_CHECK_VALUE(mx < (1 << bits), "codes must be < 2^bits = ", 1 << bits, " for bits=", bits,
                 ", got a code ", static_cast<int>(mx));
}

// GemmArgs for a validated weight triple, a flattened activation x2 [M, cols] of type `act` and the
// output y.
inline GemmArgs gemm_args(const QuantParams& p, const RowMatrix& x2, FloatType act, const Tensor& qweight,
                          const Tensor& scales, const OptTensor& zeros, const Tensor& y) {
  GemmArgs a;
  a.p = p;
  a.qweight = qweight.const_data_ptr<int32_t>();
  a.scales = scales.const_data_ptr();
  a.zeros = zeros ? zeros->const_data_ptr<uint8_t>() : nullptr;
  a.M = x2.rows;
  a.act_type = act;
  a.x = x2.data;
  a.ldx = x2.ld;
  a.y = y.mutable_data_ptr();
  return a;
}

// Output shape of a GEMM: the activation's shape with the last dimension replaced.
inline Shape with_last_dim(const Tensor& x, int64_t last) {
  Shape shape = shape_of(x);
  shape.back() = last;
  return shape;
}

}  // namespace layerpress
