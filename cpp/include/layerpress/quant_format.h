// layerpress quantised-weight format: plain structs and constants shared by every kernel.
// Torch-free on purpose: kernels, launchers and the C++ benchmark binaries all include this.
// The layouts are specified in docs/format.md; this header is their executable summary.
#pragma once
#include <cstdint>
#include <cstddef>

namespace layerpress {

// Group axis of the scales/zeros. Passed to ops as a plain int.
enum class GroupAxis : int {
  kPerOC = 0,  // g consecutive input channels (along K) inside one output row; scales [N, K/g]
  kPerIC = 1,  // g consecutive output channels (along N) inside one input column; scales [K, N/g]
};

// Where the packed codes live. Passed to ops as a plain int.
enum class Layout : int {
  kCanonical = 0,       // file layout: row-major [N, K*bits/32] int32, LSB-first bit stream per row
  kCpuBitplane16 = 1,   // CPU kernels: 16-row tiles, 32-column blocks, one 32-bit word per bit plane
  kCudaMma = 2,         // CUDA tensor-core GEMM: 16x64 tiles of mma.sync B fragments (cuda_mma_layout.h)
};

// Element type of scales and activations, independent of torch's ScalarType numbering.
enum class FloatType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kPackBlockK = 32;   // K must be a multiple of this: 32 codes fill exactly `bits` words
constexpr int kTileRows = 16;     // rows per tile in kCpuBitplane16

static inline bool valid_bits(int bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 8; }
static inline bool valid_group_size(int g) {
  return g == -1 || g == 32 || g == 64 || g == 128 || g == 256;
}

// Everything a kernel needs to know about one quantised [N, K] weight.
struct QuantParams {
  int64_t N = 0;           // out features
  int64_t K = 0;           // in features
  int bits = 4;
  int group = 128;         // effective group size (a whole row/column resolved to K or N)
  GroupAxis axis = GroupAxis::kPerOC;
  bool symmetric = false;  // symmetric: implicit zero point 2^(bits-1), no zeros tensor
  FloatType scale_type = FloatType::kF32;

  int64_t groups_per_line() const {   // number of groups along the grouped axis
    return axis == GroupAxis::kPerOC ? K / group : N / group;
  }
  int32_t sym_zero() const { return 1 << (bits - 1); }
  int32_t qmax() const { return (1 << bits) - 1; }
  int64_t words_per_row() const { return K * bits / 32; }
  int64_t row_tiles() const { return (N + kTileRows - 1) / kTileRows; }
};

// Arguments of one low-bit GEMM call, for every device: the weight in the layout the kernel reads
// (see the kernel's header for which), the activation and the output.
struct GemmArgs {
  QuantParams p;
  const int32_t* qweight = nullptr;
  const void* scales = nullptr;      // p.scale_type, in the kernel's layout
  const uint8_t* zeros = nullptr;    // same layout as scales; nullptr when p.symmetric
  int64_t M = 0;
  FloatType act_type = FloatType::kF32;  // type of x, bias and y
  const void* x = nullptr;  // forward: [M, K]; transposed: [M, N]; row stride ldx, unit column stride
  int64_t ldx = 0;
  const void* bias = nullptr;  // forward only, [N] or nullptr
  void* y = nullptr;           // forward: [M, N]; transposed: [M, K]; contiguous rows
};

// Conversions for the scale element types (round-to-nearest-even, like torch). `static` on
// purpose: each translation unit, including the ones compiled for AVX2/AVX-512, keeps its own
// copy, so the linker can never hand an AVX-512 copy to baseline code.
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

static inline float load_float(const void* p, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kF32: return static_cast<const float*>(p)[i];
    case FloatType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
static inline void store_float(void* p, int64_t i, FloatType t, float v) {
  switch (t) {
    case FloatType::kF32: static_cast<float*>(p)[i] = v; break;
    case FloatType::kBF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}
static inline size_t float_type_size(FloatType t) { return t == FloatType::kF32 ? 4 : 2; }

}  // namespace layerpress
