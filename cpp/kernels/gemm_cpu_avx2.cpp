// AVX2 + FMA CPU GEMM variant: the portable body compiled with -mavx2 -mfma (see CMakeLists.txt).
#define LP_VARIANT_GEMM gemm_avx2
#define LP_VARIANT_GEMM_T gemm_t_avx2
#include "gemm_cpu_portable.inc"
