// The CUDA-only part of the kernels' environment, in one place: on nvcc the CUDA headers and
// the launch syntax; under RECLORA_CUDA_EMULATION (the test-only CPU build, csrc/cuda_emulation/)
// the emulation of the CUDA execution model that runs the same kernel code on CPU threads.
#pragma once

#ifdef RECLORA_CUDA_EMULATION
#include "cuda_emulation/emulation.h"
#else
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

// kernel<<<grid, block, shared_bytes, stream>>>(args...) is written RECLORA_LAUNCH(...)(args...)
#define RECLORA_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
// The block's dynamic shared memory, sized by the launch.
#define RECLORA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif
