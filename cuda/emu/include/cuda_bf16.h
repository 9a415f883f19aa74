// Emulator stand-in for CUDA's <cuda_bf16.h>: everything lives in lp_cuda_emu.h.
#pragma once
#include "../lp_cuda_emu.h"
