// Low-bit GEMM on tensor cores: Y[M, N] = X[M, K] · dequant(W)ᵀ (+ bias) with fp16 or bf16
// activations, mma.sync.m16n8k16 with fp32 accumulation, the weight in Layout::kCudaMma
// (layerpress/cuda_mma_layout.h: every lane's B fragments of a 16 x 64 tile are its own few
// consecutive words, 16 bytes at 4 bits).
//
// Block: 4 warps, one 64-column strip (blockIdx.x) times 16 * kMB rows (blockIdx.y), over a range
// of K (blockIdx.z: split-K). K runs in stages of 64 (one 16-deep k tile per warp), kStages deep
// cp.async pipeline holding the activation rows, the stage's four weight tiles and its scales and
// zeros. Per stage a warp: ldmatrix.x4 its A fragments, reads its lane's weight words, turns each
// code pair into a half2/bf162 with one shift and one lop3 (codes ORed into the mantissa of the
// magic number 1024 (fp16) / 128 (bf16), minus magic + zero point: exact integers), applies the
// group scale and issues kMB x 8 mma. 8-bit codes with bf16 go through fp32 (bf16 holds the
// integers 0..255 but not 128 + 255). The four warps' partial sums (different k) are added in
// shared memory in a fixed order at the end.
//
// Group scales: per-OC groups (scale per output column and k-group) scale the B fragment (one
// hmul2 per B register; both halves of a register share a column and a group). Per-IC groups
// (scale per input row k and n-group) scale the A fragment instead: a warp's k tile meets at most
// two n-groups (g = 32) of its strip, so 4 (or 8) hmul2 per m16 tile replace the 16 a B-side
// scaling would cost, and B stays exact integers (q - z). Either way the weight (or activation) is
// rounded once to the activation type before the product; accumulation is fp32.
//
// Partitioning: at small M the strips alone do not fill the GPU, so K is split across
// blockIdx.z until about four blocks per SM run (plan_for has the limits); the split partial sums
// go to an fp32 workspace and a second kernel adds them in order (deterministic), adds the bias
// and rounds.
// Shapes: any N (the layout pads to 64 columns), K % 32 == 0 (the format's rule), any M. Rows
// of X must be 16-byte aligned (ldx % 8 == 0, aligned base) for cp.async; other calls, and fp32
// activations, take the simple kernel of gemm_cuda.cu on the same layout (gemm_cuda_mma decides).
#include "gemm_cuda_mma.cuh"

namespace layerpress {
namespace mma_gemm {
namespace {

constexpr int kBlocksPerSm = 4;  // split-K target at small M

MmaPlan plan_for(const GemmArgs& a) {
  MmaPlan p;
  p.mb = a.M <= 16 ? 1 : a.M <= 32 ? 2 : 4;
  p.m_blocks = static_cast<unsigned>((a.M + 16 * p.mb - 1) / (16 * p.mb));
  const int64_t k_stages = (a.p.K + kStageK - 1) / kStageK;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
  const int64_t blocks = ml::n_tiles(a.p.N) * p.m_blocks;
  // Aim at kBlocksPerSm resident blocks per SM (bytes in flight at M = 1), with at least 4 stages
  // per block and the fp32 partial sums (written and read once: 8 M N bytes per split) at most
  // 1/8 of the packed weight's bytes (N K bits / 8).
  int64_t split = 1;
  const int64_t target = static_cast<int64_t>(kBlocksPerSm) * sms;
  if (blocks < target) {
    split = (target + blocks - 1) / blocks;
    const int64_t by_stages = k_stages / 4 > 0 ? k_stages / 4 : 1;
    const int64_t by_traffic = a.p.K * a.p.bits / (512 * a.M) > 0 ? a.p.K * a.p.bits / (512 * a.M) : 1;
    split = split < by_stages ? split : by_stages;
    split = split < by_traffic ? split : by_traffic;
    split = split < kMaxSplit ? split : kMaxSplit;
  }
  p.stages_per_split = static_cast<int>((k_stages + split - 1) / split);
  p.split = static_cast<int>((k_stages + p.stages_per_split - 1) / p.stages_per_split);
  return p;
}

bool tensor_core_path(const GemmArgs& a) {
  if (a.act_type != FloatType::kF16 && a.act_type != FloatType::kBF16) return false;
  // cp.async copies 16-byte chunks: rows of x, and the weight, scale and zero arrays (tensors the
  // op allocates are aligned; views with an odd storage offset take the fallback)
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (a.ldx % 8 != 0 || !aligned(a.x) || !aligned(a.qweight) || !aligned(a.scales)) return false;
  if (a.zeros != nullptr && !aligned(a.zeros)) return false;
  return a.M <= 65535LL * 64;  // gridDim.y
}

}  // namespace
}  // namespace mma_gemm

using mma_gemm::MmaPlan;
using mma_gemm::plan_for;
using mma_gemm::tensor_core_path;

size_t gemm_cuda_mma_workspace_bytes(const GemmArgs& a) {
  if (a.M <= 0 || a.p.N <= 0 || !tensor_core_path(a)) return 0;
  const MmaPlan plan = plan_for(a);
  return plan.split > 1 ? static_cast<size_t>(plan.split) * a.M * a.p.N * sizeof(float) : 0;
}

bool gemm_cuda_mma_uses_tensor_cores(const GemmArgs& a) { return tensor_core_path(a); }

cudaError_t gemm_cuda_mma(const GemmArgs& a, void* workspace, cudaStream_t stream) {
  if (a.M <= 0 || a.p.N <= 0 || a.p.K <= 0) return cudaSuccess;
  if (!tensor_core_path(a)) return gemm_simple_cuda(a, Layout::kCudaMma, stream);
  const MmaPlan plan = plan_for(a);
  if (plan.split > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* partial = static_cast<float*>(workspace);
  switch (a.p.bits) {
    case 2: return mma_gemm::launch_w2(a, plan, partial, stream);
    case 3: return mma_gemm::launch_w3(a, plan, partial, stream);
    case 4: return mma_gemm::launch_w4(a, plan, partial, stream);
    case 8: return mma_gemm::launch_w8(a, plan, partial, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace layerpress
