// Generic CPU GEMM variant: portable C++, runs on any CPU.
#define LP_VARIANT_GEMM gemm_generic
#define LP_VARIANT_GEMM_T gemm_t_generic
#include "gemm_cpu_portable.inc"
