// Repacking between the canonical layout and Layout::kCudaMma on the GPU: one thread per lane of
// a 16 x 64 tile (repack) or per 32-code block of a row (unrepack), and one per scale entry, with
// the functions of layerpress/cuda_mma_layout.h that the CPU repack uses too.
#include "device_common.cuh"
#include "layerpress/cuda_kernels.h"
#include "layerpress/cuda_mma_layout.h"

namespace layerpress {
namespace {
namespace ml = mma_layout;
constexpr int kThreads = 256;

__global__ void repack_codes_kernel(const uint32_t* canonical, int64_t N, int64_t K, int bits, uint32_t* out) {
  const int64_t kt_count = K / ml::kTileK, lanes = ml::n_tiles(N) * kt_count * 32;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < lanes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tile = i / 32;
    ml::pack_lane(canonical, N, K, bits, tile / kt_count, tile % kt_count, static_cast<int>(i % 32),
                  out + tile * ml::words_per_tile(bits));
  }
}

__global__ void unrepack_codes_kernel(const uint32_t* q, int64_t N, int64_t K, int bits, uint32_t* canonical) {
  const int64_t blocks = N * (K / 32);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < blocks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ml::unpack_block(q, K, bits, i / (K / 32), i % (K / 32), canonical);
}

// to_layout: layout entry i <- canonical scale_source(i) (0 for padding); else canonical c <- layout.
__global__ void repack_scales_kernel(const unsigned char* s, const uint8_t* z, int64_t count, bool to_layout,
                                     bool per_oc, int64_t N, int64_t K, int group, int es, unsigned char* so,
                                     uint8_t* zo) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t from = to_layout ? ml::scale_source(per_oc, N, K, group, i) : ml::scale_target(per_oc, N, K, group, i);
    for (int b = 0; b < es; ++b) so[i * es + b] = from < 0 ? 0 : s[from * es + b];
    if (zo != nullptr) zo[i] = from < 0 ? 0 : z[from];
  }
}

cudaError_t repack_scales(const void* s, const uint8_t* z, const QuantParams& p, void* so, uint8_t* zo, bool to_layout,
                          cudaStream_t stream) {
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const int64_t count = to_layout ? ml::scale_entries(per_oc, p.N, p.K, p.group)
                                  : (per_oc ? p.N * (p.K / p.group) : p.K * (p.N / p.group));
  LP_LAUNCH(device::grid_for(count, kThreads), kThreads, 0, stream, repack_scales_kernel)(
      static_cast<const unsigned char*>(s), z, count, to_layout, per_oc, p.N, p.K, p.group,
      static_cast<int>(float_type_size(p.scale_type)), static_cast<unsigned char*>(so), z == nullptr ? nullptr : zo);
  return cudaGetLastError();
}
}  // namespace

cudaError_t repack_cuda_mma_cuda(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p, int32_t* qo,
                                 void* so, uint8_t* zo, cudaStream_t stream) {
  const int64_t lanes = ml::n_tiles(p.N) * (p.K / ml::kTileK) * 32;
  LP_LAUNCH(device::grid_for(lanes, kThreads), kThreads, 0, stream, repack_codes_kernel)(
      reinterpret_cast<const uint32_t*>(q), p.N, p.K, p.bits, reinterpret_cast<uint32_t*>(qo));
  const cudaError_t e = cudaGetLastError();
  return e != cudaSuccess ? e : repack_scales(s, z, p, so, zo, true, stream);
}

cudaError_t unrepack_cuda_mma_cuda(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p,
                                   int32_t* qo, void* so, uint8_t* zo, cudaStream_t stream) {
  LP_LAUNCH(device::grid_for(p.N * (p.K / 32), kThreads), kThreads, 0, stream, unrepack_codes_kernel)(
      reinterpret_cast<const uint32_t*>(q), p.N, p.K, p.bits, reinterpret_cast<uint32_t*>(qo));
  const cudaError_t e = cudaGetLastError();
  return e != cudaSuccess ? e : repack_scales(s, z, p, so, zo, false, stream);
}

}  // namespace layerpress
