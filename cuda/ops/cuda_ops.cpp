// CUDA launchers: check arguments (same rules and messages as cpp/ops/cpu_ops.cpp), turn tensors
// into pointers/QuantParams, and enqueue the kernels of cuda/include/layerpress/cuda_kernels.h on
// the current stream of the tensors' device. The GEMM kernels read the canonical layout
// (Layout::kCanonical), so repack/unrepack to layout 0 are plain copies on CUDA.
//
// Headers: c10/cuda/* rather than ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS/cuSPARSE
// headers; c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream names.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "layerpress/cuda_kernels.h"

namespace layerpress {

bool cuda_ops_built() { return true; }  // replaces cpp/ops/cuda_registry.cpp in CUDA builds

namespace {

using at::Tensor;
using c10::optional;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels report the launch status of the CUDA runtime they were linked with.
void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

// CUDA kernels read the canonical layout only.
void check_cuda_layout(int64_t layout) {
  TORCH_CHECK_VALUE(layout == static_cast<int64_t>(Layout::kCanonical), "layout ", layout,
                    " is not a CUDA kernel layout; CUDA kernels use layout ",
                    static_cast<int>(Layout::kCanonical),
                    " (canonical); layout 1 (cpu_bitplane16) is for CPU tensors");
}

// ---- format ops -----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> quantize_cuda(const Tensor& weight, int64_t bits, int64_t group_size,
                                                 int64_t axis, bool symmetric, at::ScalarType scale_dtype,
                                                 const optional<Tensor>& scales_in,
                                                 const optional<Tensor>& zeros_in) {
  const c10::cuda::CUDAGuard guard(weight.device());
  QuantizeSetup q = prepare_quantize(weight, bits, group_size, axis, symmetric, scale_dtype, scales_in, zeros_in);
  Tensor nonfinite = at::zeros({1}, weight.options().dtype(at::kInt));
  check_launch(quantize_rtn_cuda(weight.data_ptr(), q.weight_type, q.p, q.codes.data_ptr<uint8_t>(),
                                 q.scales.data_ptr(), symmetric ? nullptr : q.zeros.data_ptr<uint8_t>(),
                                 q.given, nonfinite.data_ptr<int>(), current_stream()));
  // Device-to-host reads (synchronise the stream), like the CPU op's eager errors.
  TORCH_CHECK_VALUE(nonfinite.item<int>() == 0, "weight contains NaN or Inf; cannot quantise it");
  if (!q.given) check_scale_overflow(at::isinf(q.scales).any().item<bool>(), scale_dtype);
  return {q.codes, q.scales, q.zeros};
}

Tensor pack_cuda(const Tensor& codes, int64_t bits) {
  const c10::cuda::CUDAGuard guard(codes.device());
  check_pack_codes(codes, bits);
  Tensor out = at::empty({codes.size(0), codes.size(1) * bits / 32}, codes.options().dtype(at::kInt));
  check_launch(pack_codes_cuda(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1),
                               static_cast<int>(bits), out.data_ptr<int32_t>(), current_stream()));
  return out;
}

Tensor unpack_cuda(const Tensor& qweight, int64_t bits) {
  const int64_t K = k_from_canonical(qweight, bits, "qweight");
  const c10::cuda::CUDAGuard guard(qweight.device());
  Tensor out = at::empty({qweight.size(0), K}, qweight.options().dtype(at::kByte));
  check_launch(unpack_codes_cuda(qweight.data_ptr<int32_t>(), qweight.size(0), K, static_cast<int>(bits),
                                 out.data_ptr<uint8_t>(), current_stream()));
  return out;
}

Tensor dequantize_cuda_op(const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                          int64_t bits, int64_t group_size, int64_t axis, optional<at::ScalarType> out_dtype) {
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  const c10::cuda::CUDAGuard guard(qweight.device());
  Tensor out = at::empty({p.N, p.K}, qweight.options().dtype(out_dtype.value_or(scales.scalar_type())));
  const FloatType ot = float_type_of(out, "out_dtype");
  check_launch(dequantize_cuda(qweight.data_ptr<int32_t>(), scales.data_ptr(),
                               zeros ? zeros->data_ptr<uint8_t>() : nullptr, p, out.data_ptr(), ot,
                               current_stream()));
  return out;
}

// Layout 0 is what the CUDA kernels read, so "repacking" to it is a copy (new tensors, like every
// other repack). Symmetric weights get an empty zeros tensor, as on the CPU.
std::tuple<Tensor, Tensor, Tensor> canonical_copy(const Tensor& qweight, const Tensor& scales,
                                                  const optional<Tensor>& zeros) {
  const c10::cuda::CUDAGuard guard(qweight.device());
  return {qweight.clone(), scales.clone(),
          zeros ? zeros->clone() : at::empty({0}, qweight.options().dtype(at::kByte))};
}

std::tuple<Tensor, Tensor, Tensor> repack_cuda(const Tensor& qweight, const Tensor& scales,
                                               const optional<Tensor>& zeros, int64_t bits,
                                               int64_t group_size, int64_t axis, int64_t layout) {
  check_cuda_layout(layout);
  canonical_params(qweight, scales, zeros, bits, group_size, axis);
  return canonical_copy(qweight, scales, zeros);
}

std::tuple<Tensor, Tensor, Tensor> unrepack_cuda(const Tensor& qweight, const Tensor& scales,
                                                 const optional<Tensor>& zeros, int64_t bits,
                                                 int64_t group_size, int64_t axis, int64_t layout,
                                                 int64_t out_features) {
  check_cuda_layout(layout);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  TORCH_CHECK_VALUE(p.N == out_features, "qweight has ", p.N, " rows but out_features=", out_features);
  return canonical_copy(qweight, scales, zeros);
}

// ---- GEMM -----------------------------------------------------------------------------------------

// Validates a canonical weight for the GEMMs and returns its parameters.
QuantParams gemm_params(const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                        int64_t bits, int64_t group_size, int64_t axis, int64_t layout, int64_t N) {
  check_cuda_layout(layout);
  const QuantParams p = canonical_params(qweight, scales, zeros, bits, group_size, axis);
  TORCH_CHECK_VALUE(p.N == N, "qweight has ", p.N, " rows but out_features=", N);
  return p;
}


Tensor gemm_cuda(const Tensor& x, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                 const optional<Tensor>& bias, int64_t bits, int64_t group_size, int64_t axis, int64_t layout,
                 int64_t out_features) {
  const QuantParams p = gemm_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor x2 = flat_activation(x, p.K, "x", "in_features", qweight);
  check_bias(bias, x, p.N, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  Tensor y = at::empty(with_last_dim(x, p.N), x.options());
  if (x2.size(0) == 0) return y;
  GemmArgs a = gemm_args(p, x2, qweight, scales, zeros, y);
  a.bias = bias ? bias->data_ptr() : nullptr;
  check_launch(gemm_canonical_cuda(a, current_stream()));
  return y;
}

Tensor gemm_t_cuda(const Tensor& grad, const Tensor& qweight, const Tensor& scales, const optional<Tensor>& zeros,
                   int64_t bits, int64_t group_size, int64_t axis, int64_t layout, int64_t out_features) {
  const QuantParams p = gemm_params(qweight, scales, zeros, bits, group_size, axis, layout, out_features);
  const Tensor g2 = flat_activation(grad, p.N, "grad", "out_features", qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  Tensor y = at::empty(with_last_dim(grad, p.K), grad.options());
  if (g2.size(0) == 0) return y;
  GemmArgs a = gemm_args(p, g2, qweight, scales, zeros, y);
  check_launch(gemm_t_canonical_cuda(a, current_stream()));
  return y;
}

}  // namespace
}  // namespace layerpress

TORCH_LIBRARY_IMPL(layerpress, CUDA, m) {
  m.impl("quantize", &layerpress::quantize_cuda);
  m.impl("pack", &layerpress::pack_cuda);
  m.impl("unpack", &layerpress::unpack_cuda);
  m.impl("dequantize", &layerpress::dequantize_cuda_op);
  m.impl("repack", &layerpress::repack_cuda);
  m.impl("unrepack", &layerpress::unrepack_cuda);
  m.impl("gemm", &layerpress::gemm_cuda);
  m.impl("gemm_t", &layerpress::gemm_t_cuda);
}
