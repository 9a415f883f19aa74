// Layout::kCudaMma (layout id 2): the weight layout the CUDA tensor-core GEMM reads
// (cuda/kernels/gemm_cuda_mma.cu). Specified in docs/format.md §4a; this header is its executable
// form, shared by the CPU repack (cpp/kernels/cuda_mma_layout.cpp), the CUDA repack kernels and
// the GEMM itself, so the three agree by construction. Torch-free; callable from host and device.
//
// The weight is cut into tiles of 16 input channels (k) x 64 output channels (n); N is padded to
// a multiple of 64 with zero codes. In one tile, lane l of a warp (g = l / 4, t = l % 4) holds the
// 32 codes that are its mma.sync.m16n8k16 B fragments for the tile's eight n8 blocks:
// code e (0..31) is B[k][n] with n = 8 (e / 4) + g and k = 2t + (e & 1) + 8 ((e >> 1) & 1), so
// consecutive code pairs (2p, 2p + 1) are one 32-bit B register (the pair's two k).
// A lane's codes take `bits` 32-bit words: pair p sits at bits [b i, b i + b) (first code) and
// [16 + b i, 16 + b i + b) (second code) of word p / P, i = p % P, P = 16 / b pairs per word
// (b = 2, 4, 8), so one shift and one lop3 with a magic exponent turn a pair into a half2 / bf162.
// 3-bit: P = 5 (15 pairs in bits 0-14 / 16-30 of the three words); pair 15 is spread over the
// spare bits: bit j of its first code is bit 15 of word j, of its second code bit 31 of word j.
// The lanes' words are stored in chunks of up to four (one 16-byte load): chunk c of lane l at
// word offset (c * 32 + l) * chunk, chunk = min(bits, 4); a tile is 32 * bits words and the tiles
// of one 64-column strip are consecutive along k: qweight int32 [ceil(N/64), K/16, 32 * bits].
//
// Scales and zeros, per tile strip (padding entries 0):
//   per-OC [ceil(N/64), K/g, 64]: entry (nt, j, 8 (n % 8) + (n % 64) / 8) is the canonical [n, j],
//          so the 8 scales one lane needs (its column g of each n8 block) are contiguous;
//   per-IC [ceil(N/64), K, G] with G = 2 for g = 32 (a strip spans two groups), else 1:
//          entry (nt, k, i) is the canonical [k, (64 nt + 32 i) / g].
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(LP_CUDA_EMU)
#define LP_MMA_HOST_DEVICE __host__ __device__
#else
#define LP_MMA_HOST_DEVICE
#endif

namespace layerpress {
namespace mma_layout {

constexpr int kTileK = 16;
constexpr int kTileN = 64;

LP_MMA_HOST_DEVICE inline int64_t n_tiles(int64_t N) { return (N + kTileN - 1) / kTileN; }
LP_MMA_HOST_DEVICE inline int words_per_tile(int bits) { return 32 * bits; }
// Per-IC scale entries per strip and k.
LP_MMA_HOST_DEVICE inline int ic_groups_per_strip(int group) { return group == 32 ? 2 : 1; }

// Tile-local (k, n) of code e of lane `lane`.
LP_MMA_HOST_DEVICE inline int code_k(int lane, int e) { return 2 * (lane & 3) + (e & 1) + 8 * ((e >> 1) & 1); }
LP_MMA_HOST_DEVICE inline int code_n(int lane, int e) { return 8 * (e >> 2) + (lane >> 2); }

// Where bit j of lane-local code e lives: lane-local word *w, bit *bit.
LP_MMA_HOST_DEVICE inline void code_bit(int bits, int e, int j, int* w, int* bit) {
  const int p = e >> 1, h = e & 1;
  if (bits == 3 && p == 15) {
    *w = j;
    *bit = 15 + 16 * h;
    return;
  }
  const int pairs = bits == 3 ? 5 : 16 / bits;
  *w = p / pairs;
  *bit = 16 * h + bits * (p % pairs) + j;
}

// Offset inside a tile (in words) of lane-local word w of lane `lane`.
LP_MMA_HOST_DEVICE inline int word_offset(int bits, int lane, int w) {
  const int chunk = bits < 4 ? bits : 4;
  return ((w / chunk) * 32 + lane) * chunk + w % chunk;
}

// Position of canonical column n within its strip's 64 per-OC scale entries.
LP_MMA_HOST_DEVICE inline int oc_scale_slot(int64_t n) { return static_cast<int>(8 * (n % 8) + (n % 64) / 8); }

// Inverse of code_k/code_n: the lane and lane-local code of tile-local (k, n).
LP_MMA_HOST_DEVICE inline int lane_of(int k, int n) { return 4 * (n & 7) + ((k & 7) >> 1); }
LP_MMA_HOST_DEVICE inline int code_of(int k, int n) { return 4 * (n >> 3) + (k & 1) + 2 * (k >> 3); }

// Code k of a canonical row (LSB-first bit stream, docs/format.md §3).
LP_MMA_HOST_DEVICE inline uint32_t canonical_code(const uint32_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int sh = static_cast<int>(bit & 31);
  uint64_t v = row[bit >> 5] >> sh;
  if (sh + bits > 32) v |= static_cast<uint64_t>(row[(bit >> 5) + 1]) << (32 - sh);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1u);
}

// Code e of lane `lane` in a tile (tile: its 32 * bits words).
LP_MMA_HOST_DEVICE inline uint32_t tile_code(const uint32_t* tile, int bits, int lane, int e) {
  uint32_t c = 0;
  for (int j = 0; j < bits; ++j) {
    int w, bit;
    code_bit(bits, e, j, &w, &bit);
    c |= ((tile[word_offset(bits, lane, w)] >> bit) & 1u) << j;
  }
  return c;
}

// Writes lane `lane`'s words of tile (nt, kt) from a canonical [N, K] weight (rows >= N: code 0).
LP_MMA_HOST_DEVICE inline void pack_lane(const uint32_t* canonical, int64_t N, int64_t K, int bits, int64_t nt,
                                     int64_t kt, int lane, uint32_t* tile) {
  uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t words_per_row = K * bits / 32;
  for (int e = 0; e < 32; ++e) {
    const int64_t n = nt * kTileN + code_n(lane, e), k = kt * kTileK + code_k(lane, e);
    if (n >= N) continue;
    const uint32_t c = canonical_code(canonical + n * words_per_row, k, bits);
    for (int j = 0; j < bits; ++j) {
      int w, bit;
      code_bit(bits, e, j, &w, &bit);
      words[w] |= ((c >> j) & 1u) << bit;
    }
  }
  for (int w = 0; w < bits; ++w) tile[word_offset(bits, lane, w)] = words[w];
}

// Writes the `bits` canonical words of row n holding codes 32 kb .. 32 kb + 31, from the layout.
LP_MMA_HOST_DEVICE inline void unpack_block(const uint32_t* q, int64_t K, int bits, int64_t n, int64_t kb,
                                        uint32_t* canonical) {
  uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t kt_count = K / kTileK, nt = n / kTileN;
  const int nn = static_cast<int>(n % kTileN);
  for (int i = 0; i < 32; ++i) {
    const int64_t k = kb * 32 + i;
    const int kk = static_cast<int>(k % kTileK);
    const uint32_t* tile = q + (nt * kt_count + k / kTileK) * words_per_tile(bits);
    const uint32_t c = tile_code(tile, bits, lane_of(kk, nn), code_of(kk, nn));
    const int bit = i * bits;  // stream bit inside the block's `bits` words
    words[bit >> 5] |= c << (bit & 31);
    if ((bit & 31) + bits > 32) words[(bit >> 5) + 1] |= c >> (32 - (bit & 31));
  }
  for (int w = 0; w < bits; ++w) canonical[n * (K * bits / 32) + kb * bits + w] = words[w];
}

// Scales/zeros: entry count of the layout, and the canonical entry of layout entry i (-1: padding).
LP_MMA_HOST_DEVICE inline int64_t scale_entries(bool per_oc, int64_t N, int64_t K, int group) {
  return per_oc ? n_tiles(N) * (K / group) * kTileN : n_tiles(N) * K * ic_groups_per_strip(group);
}
LP_MMA_HOST_DEVICE inline int64_t scale_source(bool per_oc, int64_t N, int64_t K, int group, int64_t i) {
  if (per_oc) {  // [nt][j][slot]
    const int slot = static_cast<int>(i % kTileN);
    const int64_t j = (i / kTileN) % (K / group), nt = i / kTileN / (K / group);
    const int64_t n = nt * kTileN + (slot % 8) * 8 + slot / 8;
    return n < N ? n * (K / group) + j : -1;
  }
  const int gs = ic_groups_per_strip(group);  // [nt][k][i]
  const int64_t sub = i % gs, k = (i / gs) % K, nt = i / gs / K;
  const int64_t n = nt * kTileN + 32 * sub;
  return n < N ? k * (N / group) + n / group : -1;
}
// The layout entry that holds canonical entry c (for a whole-column per-IC group, strip 0's copy).
LP_MMA_HOST_DEVICE inline int64_t scale_target(bool per_oc, int64_t N, int64_t K, int group, int64_t c) {
  if (per_oc) {
    const int64_t n = c / (K / group), j = c % (K / group);
    return ((n / kTileN) * (K / group) + j) * kTileN + oc_scale_slot(n);
  }
  const int64_t k = c / (N / group), col = c % (N / group);
  const int gs = ic_groups_per_strip(group);
  const int64_t n = col * group, nt = n / kTileN;
  return (nt * K + k) * gs + (gs == 2 ? (n % kTileN) / 32 : 0);
}

}  // namespace mma_layout
}  // namespace layerpress
