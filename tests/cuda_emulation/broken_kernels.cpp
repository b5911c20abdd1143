// The broken test kernels, compiled as C++ against the CPU emulation.
#define RECLORA_CUDA_EMULATION
#include "broken_kernels.cu"
