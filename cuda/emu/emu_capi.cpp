// C entry points of the emulated CUDA kernel library (liblayerpress_cuda_emu.so), for the
// emulated tests (tests/test_cuda_emulated.py loads it with ctypes). Each one builds the kernel
// API's structs from plain arguments and calls the same torch-free launch function the CUDA op
// library calls (cuda/include/layerpress/*.h), with host pointers standing in for device ones.
// Every function returns the cudaError_t of the launch; lp_emu_last_error() gives the detail.
#include "layerpress/cuda_kernels.h"
#include "layerpress/hadamard_cuda.h"
#include "layerpress/norm_cuda.h"
#include "layerpress/wtacrs_cuda.h"

#include <vector>

using namespace layerpress;

namespace {
QuantParams params(int64_t N, int64_t K, int bits, int group, int axis, int symmetric, int scale_type) {
  QuantParams p;
  p.N = N;
  p.K = K;
  p.bits = bits;
  p.axis = static_cast<GroupAxis>(axis);
  p.group = group == -1 ? (p.axis == GroupAxis::kPerOC ? K : N) : group;  // whole row/column
  p.symmetric = symmetric != 0;
  p.scale_type = static_cast<FloatType>(scale_type);
  return p;
}
GemmArgs gemm_args(const int32_t* qweight, const void* scales, const uint8_t* zeros, const QuantParams& p, int64_t M,
                   int act_type, const void* x, int64_t ldx, const void* bias, void* y) {
  GemmArgs a;
  a.p = p;
  a.qweight = qweight;
  a.scales = scales;
  a.zeros = zeros;
  a.M = M;
  a.act_type = static_cast<FloatType>(act_type);
  a.x = x;
  a.ldx = ldx;
  a.bias = bias;
  a.y = y;
  return a;
}
}  // namespace

extern "C" {

// threads: OS threads running blocks (0: all cores); schedule: 0 forward, 1 reverse, 2 random(seed).
void lp_emu_configure(int threads, int schedule, unsigned long long seed, int sm_count) {
  lp_emu::Settings& s = lp_emu::settings();
  s.threads = threads;
  s.schedule = schedule;
  s.seed = seed;
  if (sm_count > 0) s.sm_count = sm_count;
}
const char* lp_emu_last_error() { return lp_emu::last_error_message(); }

int lp_emu_quantize(const void* w, int w_type, int64_t N, int64_t K, int bits, int group, int axis, int symmetric,
                    int scale_type, uint8_t* codes, void* scales, uint8_t* zeros, int given, int* nonfinite) {
  return quantize_rtn_cuda(w, static_cast<FloatType>(w_type), params(N, K, bits, group, axis, symmetric, scale_type),
                           codes, scales, zeros, given != 0, nonfinite, nullptr);
}
int lp_emu_pack(const uint8_t* codes, int64_t rows, int64_t K, int bits, int32_t* packed) {
  return pack_codes_cuda(codes, rows, K, bits, packed, nullptr);
}
int lp_emu_unpack(const int32_t* packed, int64_t rows, int64_t K, int bits, uint8_t* codes) {
  return unpack_codes_cuda(packed, rows, K, bits, codes, nullptr);
}
int lp_emu_dequantize(const int32_t* qweight, const void* scales, const uint8_t* zeros, int64_t N, int64_t K,
                      int bits, int group, int axis, int symmetric, int scale_type, void* out, int out_type) {
  return dequantize_cuda(qweight, scales, zeros, params(N, K, bits, group, axis, symmetric, scale_type), out,
                         static_cast<FloatType>(out_type), nullptr);
}
// transposed = 0: y[M, N] = x[M, K] · Wᵀ + bias; 1: y[M, K] = x[M, N] · W (bias ignored).
int lp_emu_gemm(int transposed, const int32_t* qweight, const void* scales, const uint8_t* zeros, int64_t N,
                int64_t K, int bits, int group, int axis, int symmetric, int scale_type, int64_t M, int act_type,
                const void* x, int64_t ldx, const void* bias, void* y) {
  const GemmArgs a = gemm_args(qweight, scales, zeros, params(N, K, bits, group, axis, symmetric, scale_type), M,
                               act_type, x, ldx, bias, y);
  return transposed ? gemm_t_canonical_cuda(a, nullptr) : gemm_canonical_cuda(a, nullptr);
}

// Layout::kCudaMma: to_layout = 1 repacks canonical -> layout, 0 the inverse.
int lp_emu_repack_cuda_mma(int to_layout, const int32_t* q, const void* s, const uint8_t* z, int64_t N, int64_t K,
                           int bits, int group, int axis, int symmetric, int scale_type, int32_t* q_out, void* s_out,
                           uint8_t* z_out) {
  const QuantParams p = params(N, K, bits, group, axis, symmetric, scale_type);
  return to_layout ? repack_cuda_mma_cuda(q, s, z, p, q_out, s_out, z_out, nullptr)
                   : unrepack_cuda_mma_cuda(q, s, z, p, q_out, s_out, z_out, nullptr);
}
// transposed = 0: the tensor-core GEMM (gemm_cuda_mma, with its own workspace); 1: gemm_t on the layout.
// *tensor_cores (if given) reports whether the tensor-core kernel ran.
int lp_emu_gemm_cuda_mma(int transposed, const int32_t* qweight, const void* scales, const uint8_t* zeros, int64_t N,
                         int64_t K, int bits, int group, int axis, int symmetric, int scale_type, int64_t M,
                         int act_type, const void* x, int64_t ldx, const void* bias, void* y, int* tensor_cores) {
  const GemmArgs a = gemm_args(qweight, scales, zeros, params(N, K, bits, group, axis, symmetric, scale_type), M,
                               act_type, x, ldx, bias, y);
  if (transposed) return gemm_t_simple_cuda(a, Layout::kCudaMma, nullptr);
  if (tensor_cores) *tensor_cores = gemm_cuda_mma_uses_tensor_cores(a) ? 1 : 0;
  std::vector<unsigned char> workspace(gemm_cuda_mma_workspace_bytes(a));
  return gemm_cuda_mma(a, workspace.empty() ? nullptr : workspace.data(), nullptr);
}

int lp_emu_norm_forward(int64_t rows, int64_t cols, int type, int center, double eps, const void* x,
                        int64_t x_stride, const void* residual, int64_t res_stride, const void* weight,
                        const void* bias, void* y, void* h, void* mean, void* rstd) {
  NormFwdArgs a;
  a.rows = rows;
  a.cols = cols;
  a.type = static_cast<NormType>(type);
  a.center = center != 0;
  a.eps = eps;
  a.x = x;
  a.x_stride = x_stride;
  a.residual = residual;
  a.res_stride = res_stride;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.h = h;
  a.mean = mean;
  a.rstd = rstd;
  return norm_forward_cuda(a, nullptr);
}

namespace {
NormBwdArgs bwd_args(int64_t rows, int64_t cols, int type, int center, const void* grad_y, int64_t gy_stride,
                     const void* x, int64_t x_stride, const void* weight, const void* mean, const void* rstd,
                     const void* grad_h, int64_t gh_stride, void* grad_x, void* grad_weight, void* grad_bias) {
  NormBwdArgs a;
  a.rows = rows;
  a.cols = cols;
  a.type = static_cast<NormType>(type);
  a.center = center != 0;
  a.grad_y = grad_y;
  a.gy_stride = gy_stride;
  a.x = x;
  a.x_stride = x_stride;
  a.weight = weight;
  a.mean = mean;
  a.rstd = rstd;
  a.grad_h = grad_h;
  a.gh_stride = gh_stride;
  a.grad_x = grad_x;
  a.grad_weight = grad_weight;
  a.grad_bias = grad_bias;
  return a;
}
}  // namespace

// The workspace the backward needs (bytes); the caller passes a buffer of that size.
size_t lp_emu_norm_backward_workspace(int64_t rows, int64_t cols, int type, int center, int want_grad_weight,
                                      int want_grad_bias) {
  char dummy;
  return norm_backward_cuda_workspace(bwd_args(rows, cols, type, center, nullptr, 0, nullptr, 0, nullptr, nullptr,
                                               nullptr, nullptr, 0, nullptr, want_grad_weight ? &dummy : nullptr,
                                               want_grad_bias ? &dummy : nullptr));
}
int lp_emu_norm_backward(int64_t rows, int64_t cols, int type, int center, const void* grad_y, int64_t gy_stride,
                         const void* x, int64_t x_stride, const void* weight, const void* mean, const void* rstd,
                         const void* grad_h, int64_t gh_stride, void* grad_x, void* grad_weight, void* grad_bias,
                         void* workspace) {
  return norm_backward_cuda(bwd_args(rows, cols, type, center, grad_y, gy_stride, x, x_stride, weight, mean, rstd,
                                     grad_h, gh_stride, grad_x, grad_weight, grad_bias),
                            workspace, nullptr);
}

int lp_emu_wtacrs_row_norms(const void* x, int type, int64_t M, int64_t D, int64_t ld, float* out) {
  return wtacrs_row_norms_cuda(x, static_cast<FloatType>(type), M, D, ld, out, nullptr);
}
int lp_emu_wtacrs_select(const double* sorted, const double* cum, const int64_t* order, int64_t M, int64_t k,
                         const int64_t* c_ptr, unsigned long long seed, int64_t* idx, float* scale) {
  return wtacrs_select_cuda(sorted, cum, order, M, k, c_ptr, seed, idx, scale, nullptr);
}
int lp_emu_wtacrs_gather_scale(const void* x, int type, int64_t D, int64_t ld, const int64_t* idx,
                               const float* scale, int64_t k, void* out) {
  return wtacrs_gather_scale_cuda(x, static_cast<FloatType>(type), D, ld, idx, scale, k, out, nullptr);
}
int lp_emu_wtacrs_wgrad(const void* g, int64_t ldg, int64_t N, const void* rows, int64_t D, const int64_t* idx,
                        const float* scale, int64_t k, int type, void* dw) {
  return wtacrs_wgrad_cuda(g, ldg, N, rows, D, idx, scale, k, static_cast<FloatType>(type), dw, nullptr);
}

int lp_emu_hadamard(int64_t rows, int64_t cols, int64_t block, int type, int transpose, const void* x,
                    int64_t x_stride, const float* signs, void* y, int64_t y_stride) {
  HadamardArgs a;
  a.rows = rows;
  a.cols = cols;
  a.block = block;
  a.type = static_cast<NormType>(type);
  a.transpose = transpose != 0;
  a.x = x;
  a.x_stride = x_stride;
  a.signs = signs;
  a.y = y;
  a.y_stride = y_stride;
  return hadamard_cuda(a, nullptr);
}
}  // extern "C"
