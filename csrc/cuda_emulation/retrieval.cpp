// The real CUDA source of the retrieval kernels, compiled as C++ against the CPU emulation.
#define RECLORA_CUDA_EMULATION
#include "../retrieval_cuda.cu"
