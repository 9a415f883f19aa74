// The tensor-core GEMM's kernel code (the design is described in gemm_cuda_mma.cu), included by
// the per-code-width translation units gemm_cuda_mma_w{2,3,4,8}.cu.
#pragma once
#include "device_common.cuh"
#include "layerpress/cuda_kernels.h"
#include "layerpress/cuda_mma_layout.h"
#include "ptx.cuh"

#include <type_traits>
#include <utility>

namespace layerpress {
namespace mma_gemm {

struct MmaPlan {
  int mb = 1;              // m16 tiles per block
  unsigned m_blocks = 1;
  int split = 1;
  int stages_per_split = 1;
};

// One launcher per code width, each in its own translation unit (gemm_cuda_mma_w<bits>.cu), so the
// six kernels of each (2 activation types x 3 tile heights) compile in parallel.
cudaError_t launch_w2(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream);
cudaError_t launch_w3(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream);
cudaError_t launch_w4(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream);
cudaError_t launch_w8(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream);

namespace {

namespace ml = mma_layout;
using device::from_float;
using device::kWarpSize;
using device::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kStageK = kWarps * ml::kTileK;  // 64: one k tile per warp
constexpr int kStages = 4;
constexpr int kMaxScaleBytes = 2 * ml::kTileN * 4;  // two groups x 64 columns (or 64 rows x 2) x fp32
constexpr int kMaxZeroBytes = 2 * ml::kTileN;
constexpr int kMaxSplit = 32;

struct MmaArgs {
  const uint32_t* q;
  const void* scales;
  const uint8_t* zeros;  // nullptr: symmetric
  const void* x;
  int64_t ldx;
  const void* bias;
  void* y;
  float* partial;  // [split, M, N] when split > 1
  int64_t M, N, K;
  int group;
  bool per_oc;
  FloatType scale_type;
  int scale_bytes;  // element size of scale_type
  int stages_per_split;
};

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024): 1024 + c for c < 1024 exact
  static constexpr float kMagicValue = 1024.0f;
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf162(128, 128): 128 + c for c < 128 exact
  static constexpr float kMagicValue = 128.0f;
};
template <typename T> using T2 = typename Pair<T>::type;

template <typename T>
__device__ __forceinline__ T2<T> as_pair(uint32_t u) {
  T2<T> v;
  memcpy(&v, &u, 4);
  return v;
}
template <typename T>
__device__ __forceinline__ uint32_t as_bits(T2<T> v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <typename T> __device__ __forceinline__ T2<T> pair_of(float a, float b);
template <> __device__ __forceinline__ __half2 pair_of<__half>(float a, float b) { return __floats2half2_rn(a, b); }
template <> __device__ __forceinline__ __nv_bfloat162 pair_of<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

// The two codes of pair p of a lane's words, as the bits of (code0, code1) in the 16-bit halves.
template <int kBits, int kP>
__device__ __forceinline__ uint32_t pair_codes(const uint32_t (&q)[kBits], uint32_t magic) {
  constexpr uint32_t kMask = ((1u << kBits) - 1u) * 0x00010001u;
  constexpr uint32_t kLut = (0xF0 & 0xCC) | 0xAA;  // (a & b) | c
  if constexpr (kBits == 3 && kP == 15) {  // the spare bits 15 / 31 of the three words
    const uint32_t b0 = ptx::lop3<kLut>(q[0] >> 15, 0x00010001u, magic);
    const uint32_t b1 = ptx::lop3<kLut>(q[1] >> 14, 0x00020002u, b0);
    return ptx::lop3<kLut>(q[2] >> 13, 0x00040004u, b1);
  } else {
    constexpr int kPairs = kBits == 3 ? 5 : 16 / kBits;
    return ptx::lop3<kLut>(q[kP / kPairs] >> (kBits * (kP % kPairs)), kMask, magic);
  }
}

template <int kBits, int... kP>
__device__ __forceinline__ void all_pairs(const uint32_t (&q)[kBits], uint32_t magic, uint32_t (&out)[16],
                                          std::integer_sequence<int, kP...>) {
  ((out[kP] = pair_codes<kBits, kP>(q, magic)), ...);
}

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __half>::value) ptx::mma_m16n8k16_f16(d, a, b, d);
  else ptx::mma_m16n8k16_bf16(d, a, b, d);
}

__device__ __forceinline__ float scale_at(const void* s, int i, FloatType t) { return device::load_as_float(s, i, t); }

// Shared memory of one pipeline stage.
template <int kMB, int kBits>
struct StageLayout {
  static constexpr int kABytes = 16 * kMB * kStageK * 2;
  static constexpr int kBBytes = kWarps * ml::kTileK * ml::kTileN * kBits / 8;
  static constexpr int kBytes = kABytes + kBBytes + kMaxScaleBytes + kMaxZeroBytes;
  static constexpr int kReduceBytes = (kWarps - 1) * kMB * 8 * 4 * kWarpSize * 4;
  static constexpr int kSmem = kStages * kBytes > kReduceBytes ? kStages * kBytes : kReduceBytes;
};

// cp.async of `bytes` (a multiple of 16) from global to shared, spread over the block.
__device__ __forceinline__ void copy_async(unsigned char* dst, const void* src, int bytes) {
  for (int i = threadIdx.x * 16; i < bytes; i += kThreads * 16)
    ptx::cp_async_16(dst + i, static_cast<const unsigned char*>(src) + i);
}

// First group index, and group count, of a stage's per-OC scales.
__device__ __forceinline__ int64_t oc_first_group(const MmaArgs& a, int64_t k0) { return k0 / a.group; }
__device__ __forceinline__ int oc_group_count(const MmaArgs& a, int64_t k0, int klen) {
  return static_cast<int>((k0 + klen - 1) / a.group - k0 / a.group + 1);
}

template <typename T, int kMB, int kBits>
__device__ __forceinline__ void load_stage(const MmaArgs& a, unsigned char* st, int64_t nt, int64_t m0,
                                           int64_t stage) {
  using L = StageLayout<kMB, kBits>;
  const int64_t k0 = stage * kStageK;
  const int klen = static_cast<int>(a.K - k0 < kStageK ? a.K - k0 : kStageK);
  const int kt_count = static_cast<int>(a.K / ml::kTileK);
  // A rows, 16-byte chunks XOR-swizzled by row (conflict-free ldmatrix): chunk c of row r at c ^ (r & 7).
  const T* x = static_cast<const T*>(a.x);
  for (int i = threadIdx.x; i < 16 * kMB * 8; i += kThreads) {
    const int r = i / 8, c = i % 8;
    if (c * 8 >= klen) continue;
    const bool valid = m0 + r < a.M;
    const T* src = valid ? x + (m0 + r) * a.ldx + k0 + c * 8 : x;
    ptx::cp_async_16_zfill(st + (r * 8 + (c ^ (r & 7))) * 16, src, valid);
  }
  // the stage's weight tiles: consecutive in the strip
  copy_async(st + L::kABytes, a.q + (nt * kt_count + k0 / ml::kTileK) * ml::words_per_tile(kBits),
             (klen / ml::kTileK) * ml::words_per_tile(kBits) * 4);
  const int es = a.scale_bytes;
  unsigned char* s_dst = st + L::kABytes + L::kBBytes;
  unsigned char* z_dst = s_dst + kMaxScaleBytes;
  int64_t first;
  int count;
  if (a.per_oc) {
    first = (nt * (a.K / a.group) + oc_first_group(a, k0)) * ml::kTileN;
    count = oc_group_count(a, k0, klen) * ml::kTileN;
  } else {
    const int gs = ml::ic_groups_per_strip(a.group);
    first = (nt * a.K + k0) * gs;
    count = klen * gs;
  }
  copy_async(s_dst, static_cast<const unsigned char*>(a.scales) + first * es, count * es);
  if (a.zeros != nullptr) copy_async(z_dst, a.zeros + first, count);
}

template <typename T, int kMB, int kBits>
__global__ void __launch_bounds__(kThreads) gemm_mma_kernel(MmaArgs a) {
  using L = StageLayout<kMB, kBits>;
  LP_DYNAMIC_SMEM(unsigned char, smem);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int64_t nt = blockIdx.x, m0 = static_cast<int64_t>(blockIdx.y) * 16 * kMB;
  const int64_t k_stages = (a.K + kStageK - 1) / kStageK;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.z) * a.stages_per_split;
  const int64_t s_end = s_begin + a.stages_per_split < k_stages ? s_begin + a.stages_per_split : k_stages;
  const int64_t n_iter = s_end - s_begin;
  const uint32_t magic = Pair<T>::kMagic;
  const int qmax_zero = 1 << (kBits - 1);  // symmetric zero point
  const int ic_gs = ml::ic_groups_per_strip(a.group);

  float acc[kMB][8][4];
#pragma unroll
  for (int i = 0; i < kMB; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  // Prologue: kStages - 1 stages in flight (empty groups past the end keep the count uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iter) load_stage<T, kMB, kBits>(a, smem + s * L::kBytes, nt, m0, s_begin + s);
    ptx::cp_async_commit();
  }

  for (int64_t it = 0; it < n_iter; ++it) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` visible to all warps; stage it-1's buffer free for reuse
    {
      const int64_t next = it + kStages - 1;
      if (next < n_iter)
        load_stage<T, kMB, kBits>(a, smem + (next % kStages) * L::kBytes, nt, m0, s_begin + next);
      ptx::cp_async_commit();
    }
    const unsigned char* st = smem + (it % kStages) * L::kBytes;
    const int64_t k0 = (s_begin + it) * kStageK;
    if (k0 + warp * ml::kTileK >= a.K) continue;  // a short last stage (K % 64 == 32)

    uint32_t af[kMB][4];
#pragma unroll
    for (int i = 0; i < kMB; ++i) {
      const int r = 16 * i + lane % 16, c = 2 * warp + lane / 16;
      ptx::ldmatrix_x4(af[i], st + (r * 8 + (c ^ (r & 7))) * 16);
    }
    uint32_t qw[kBits];
    const uint32_t* tile = reinterpret_cast<const uint32_t*>(st + L::kABytes) + warp * ml::words_per_tile(kBits);
    if constexpr (kBits == 4 || kBits == 8) {
#pragma unroll
      for (int c = 0; c < kBits / 4; ++c) {  // one 16-byte load per chunk of four words
        const uint4 v = *reinterpret_cast<const uint4*>(tile + ml::word_offset(kBits, lane, 4 * c));
        qw[4 * c] = v.x, qw[4 * c + 1] = v.y, qw[4 * c + 2] = v.z, qw[4 * c + 3] = v.w;
      }
    } else if constexpr (kBits == 2) {
      const uint2 v = *reinterpret_cast<const uint2*>(tile + ml::word_offset(kBits, lane, 0));
      qw[0] = v.x, qw[1] = v.y;
    } else {
#pragma unroll
      for (int w = 0; w < kBits; ++w) qw[w] = tile[ml::word_offset(kBits, lane, w)];
    }
    uint32_t pairs[16];  // (magic + code, magic + code) of each B register; unused on the fp32 path
    if constexpr (kBits != 8 || std::is_same<T, __half>::value)
      all_pairs<kBits>(qw, magic, pairs, std::make_integer_sequence<int, 16>());
    const unsigned char* s_st = st + L::kABytes + L::kBBytes;
    const uint8_t* z_st = s_st + kMaxScaleBytes;
    const int64_t kw = k0 + warp * ml::kTileK;  // this warp's first k

    if (a.per_oc) {
      // column n = 8j + g of each n8 block: the lane's 8 scales are contiguous (oc_scale_slot)
      const int base = static_cast<int>(kw / a.group - oc_first_group(a, k0)) * ml::kTileN + 8 * g;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float s = scale_at(s_st, base + j, a.scale_type);
        const int z = a.zeros != nullptr ? z_st[base + j] : qmax_zero;
        uint32_t b[2];
        if constexpr (kBits == 8 && !std::is_same<T, __half>::value) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t w = qw[(2 * j + h) / 2] >> (8 * ((2 * j + h) % 2));
            b[h] = as_bits<T>(pair_of<T>(__fmul_rn(static_cast<float>(static_cast<int>(w & 0xffu) - z), s),
                                         __fmul_rn(static_cast<float>(static_cast<int>((w >> 16) & 0xffu) - z), s)));
          }
        } else {
          const T2<T> zz = pair_of<T>(Pair<T>::kMagicValue + z, Pair<T>::kMagicValue + z);  // exact
          const T2<T> ss = pair_of<T>(s, s);
          b[0] = as_bits<T>(__hmul2(__hsub2(as_pair<T>(pairs[2 * j]), zz), ss));
          b[1] = as_bits<T>(__hmul2(__hsub2(as_pair<T>(pairs[2 * j + 1]), zz), ss));
        }
#pragma unroll
        for (int i = 0; i < kMB; ++i) mma<T>(acc[i][j], af[i], b);
      }
    } else {
      // per-IC: scale rows k of A by s[k, group]; B = q - z[k, group] (exact integers)
      const int kl = warp * ml::kTileK;  // row of this warp's tile in the stage's [64][gs] entries
      uint32_t as[2][kMB][4];
#pragma unroll
      for (int gi = 0; gi < 2; ++gi) {  // with one group per strip, as[1] repeats as[0]
        const int gsel = gi < ic_gs ? gi : 0;
        const int r0 = (kl + 2 * t) * ic_gs + gsel, r8 = (kl + 2 * t + 8) * ic_gs + gsel;
        const T2<T> s_lo = pair_of<T>(scale_at(s_st, r0, a.scale_type), scale_at(s_st, r0 + ic_gs, a.scale_type));
        const T2<T> s_hi = pair_of<T>(scale_at(s_st, r8, a.scale_type), scale_at(s_st, r8 + ic_gs, a.scale_type));
#pragma unroll
        for (int i = 0; i < kMB; ++i) {
          as[gi][i][0] = as_bits<T>(__hmul2(as_pair<T>(af[i][0]), s_lo));
          as[gi][i][1] = as_bits<T>(__hmul2(as_pair<T>(af[i][1]), s_lo));
          as[gi][i][2] = as_bits<T>(__hmul2(as_pair<T>(af[i][2]), s_hi));
          as[gi][i][3] = as_bits<T>(__hmul2(as_pair<T>(af[i][3]), s_hi));
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int gi = ic_gs == 2 ? j / 4 : 0;
        int z[4];  // k = 2t, 2t+1, 2t+8, 2t+9
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int k = kl + 2 * t + (r & 1) + 8 * (r >> 1);
          z[r] = a.zeros != nullptr ? z_st[k * ic_gs + gi] : qmax_zero;
        }
        uint32_t b[2];
        if constexpr (kBits == 8 && !std::is_same<T, __half>::value) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t w = qw[(2 * j + h) / 2] >> (8 * ((2 * j + h) % 2));
            b[h] = as_bits<T>(pair_of<T>(static_cast<float>(static_cast<int>(w & 0xffu) - z[2 * h]),
                                         static_cast<float>(static_cast<int>((w >> 16) & 0xffu) - z[2 * h + 1])));
          }
        } else {
          const float mv = Pair<T>::kMagicValue;
          b[0] = as_bits<T>(__hsub2(as_pair<T>(pairs[2 * j]), pair_of<T>(mv + z[0], mv + z[1])));
          b[1] = as_bits<T>(__hsub2(as_pair<T>(pairs[2 * j + 1]), pair_of<T>(mv + z[2], mv + z[3])));
        }
        // selects, not an index by the runtime gi: `as` stays in registers
#pragma unroll
        for (int i = 0; i < kMB; ++i) {
          const uint32_t ai[4] = {gi ? as[1][i][0] : as[0][i][0], gi ? as[1][i][1] : as[0][i][1],
                                  gi ? as[1][i][2] : as[0][i][2], gi ? as[1][i][3] : as[0][i][3]};
          mma<T>(acc[i][j], ai, b);
        }
      }
    }
  }

  // The warps' sums over their k tiles, added in a fixed order in shared memory.
  ptx::cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kAcc = kMB * 8 * 4;
  if (warp > 0) {
#pragma unroll
    for (int i = 0; i < kMB; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[((warp - 1) * kAcc + (i * 8 + j) * 4 + r) * kWarpSize + lane] = acc[i][j][r];
  }
  __syncthreads();
  if (warp != 0) return;
  const T* bias = static_cast<const T*>(a.bias);
  const bool split = gridDim.z > 1;
#pragma unroll
  for (int i = 0; i < kMB; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float v = acc[i][j][r];
        for (int w = 1; w < kWarps; ++w) v += red[((w - 1) * kAcc + (i * 8 + j) * 4 + r) * kWarpSize + lane];
        const int64_t m = m0 + 16 * i + g + 8 * (r >> 1), n = nt * ml::kTileN + 8 * j + 2 * t + (r & 1);
        if (m >= a.M || n >= a.N) continue;
        if (split) {
          a.partial[(static_cast<int64_t>(blockIdx.z) * a.M + m) * a.N + n] = v;
        } else {
          if (bias != nullptr) v += to_float(bias[n]);
          static_cast<T*>(a.y)[m * a.N + n] = from_float<T>(v);
        }
      }
}

// Adds the split-K partial sums in order, adds the bias and rounds.
template <typename T>
__global__ void __launch_bounds__(256) gemm_mma_finish_kernel(const float* partial, int split, int64_t M, int64_t N,
                                                              const T* bias, T* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M * N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = partial[i];
    for (int s = 1; s < split; ++s) v += partial[s * M * N + i];
    if (bias != nullptr) v += to_float(bias[i % N]);
    y[i] = from_float<T>(v);
  }
}

template <typename T, int kMB, int kBits>
cudaError_t launch_mma(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream) {
  constexpr int smem = StageLayout<kMB, kBits>::kSmem;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(gemm_mma_kernel<T, kMB, kBits>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  MmaArgs m;
  m.q = reinterpret_cast<const uint32_t*>(a.qweight);
  m.scales = a.scales;
  m.zeros = a.zeros;
  m.x = a.x;
  m.ldx = a.ldx;
  m.bias = a.bias;
  m.y = a.y;
  m.partial = partial;
  m.M = a.M;
  m.N = a.p.N;
  m.K = a.p.K;
  m.group = a.p.group;
  m.per_oc = a.p.axis == GroupAxis::kPerOC;
  m.scale_type = a.p.scale_type;
  m.scale_bytes = static_cast<int>(float_type_size(a.p.scale_type));
  m.stages_per_split = plan.stages_per_split;
  const dim3 grid(static_cast<unsigned>(ml::n_tiles(a.p.N)), plan.m_blocks, static_cast<unsigned>(plan.split));
  LP_LAUNCH(grid, kThreads, smem, stream, gemm_mma_kernel<T, kMB, kBits>)(m);
  if (plan.split > 1) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    LP_LAUNCH(device::grid_for(a.M * a.p.N, 256), 256, 0, stream, gemm_mma_finish_kernel<T>)(
        partial, plan.split, a.M, a.p.N, static_cast<const T*>(a.bias), static_cast<T*>(a.y));
  }
  return cudaGetLastError();
}

template <typename T, int kBits>
cudaError_t launch_bits(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream) {
  switch (plan.mb) {
    case 1: return launch_mma<T, 1, kBits>(a, plan, partial, stream);
    case 2: return launch_mma<T, 2, kBits>(a, plan, partial, stream);
    default: return launch_mma<T, 4, kBits>(a, plan, partial, stream);
  }
}

template <int kBits>
cudaError_t launch_width(const GemmArgs& a, const MmaPlan& plan, float* partial, cudaStream_t stream) {
  if (a.act_type == FloatType::kF16) return launch_bits<__half, kBits>(a, plan, partial, stream);
  return launch_bits<__nv_bfloat16, kBits>(a, plan, partial, stream);
}

}  // namespace
}  // namespace mma_gemm
}  // namespace layerpress
