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

// CUDA_KERNEL_ASSERT, with the failing path marked as the end. A failed assertion stops the
// kernel (cudaErrorAssert, "device-side assert triggered"), but CUDA declares __assert_fail (PTX:
// call __assertfail) as returning, so ptxas kept every value live across an assertion in a loop in
// a stack slot and counted it as a spill (retrieve_backward_kernel on sm_90, issue 14).
// __builtin_unreachable() says what is true: nothing runs after the call; the calls stay out of
// line and the loops keep their registers. (__trap() there instead also removes that spill, but
// ptxas then spilled score_select_kernel<float, 1>'s loop bound on sm_90.)
#define RECLORA_KERNEL_ASSERT(cond)                                                  \
  do {                                                                               \
    if (C10_UNLIKELY(!(cond))) {                                                     \
      __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
      __builtin_unreachable();                                                       \
    }                                                                                \
  } while (0)
#endif
