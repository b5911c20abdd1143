// The real CUDA source of the gated_lora kernels, compiled as C++ against the CPU emulation.
#define RECLORA_CUDA_EMULATION
#include "../gated_lora_cuda.cu"
