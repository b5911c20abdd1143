// Kernels broken on purpose, to prove that the CUDA emulation's checks fail when they should:
// each one is written as ordinary CUDA (it compiles with nvcc through cuda_platform.cuh) and is
// built only into the test-only emulation library. reverse_kernel is the correct version.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../../csrc/cuda_platform.cuh"

namespace {

constexpr int kThreads = 64;

// y[i] = x[n - 1 - i] within one block, through dynamic shared memory.
__global__ void reverse_kernel(const float* x, float* y, int n) {
  RECLORA_DYNAMIC_SHARED(smem);
  float* tile = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (t < n) tile[t] = x[t];
  __syncthreads();
  if (t < n) y[t] = tile[n - 1 - t];
}

// The same without the barrier: threads read tile entries other threads may not have written.
__global__ void missing_barrier_kernel(const float* x, float* y, int n) {
  __shared__ float tile[kThreads];
  const int t = threadIdx.x;
  if (t < n) tile[t] = x[t];
  if (t < n) y[t] = tile[n - 1 - t];
}

// Off by one: each thread reads its right neighbour, and the last one reads past x.
__global__ void off_by_one_kernel(const float* x, float* y, int n) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < n) y[t] = x[t] + x[t + 1];
}

// Off by one in shared memory: the tile holds n floats and the last thread reads one more.
__global__ void shared_off_by_one_kernel(const float* x, float* y, int n) {
  RECLORA_DYNAMIC_SHARED(smem);
  float* tile = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (t < n) tile[t] = x[t];
  __syncthreads();
  if (t < n) y[t] = tile[t] + tile[t + 1];
}

// Divergent barrier: only the first warp reaches it.
__global__ void divergent_barrier_kernel(const float* x, float* y, int n) {
  const int t = threadIdx.x;
  if (t < 32) {
    __syncthreads();
  }
  if (t < n) y[t] = x[t];
}

struct Operands {
  const float* x;
  float* y;
  int n;
  size_t tile_bytes;
};

Operands operands(const at::Tensor& x, at::Tensor& y, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.numel() <= kThreads && x.scalar_type() == at::kFloat && x.is_contiguous(),
              name, ": x must be a contiguous float32 vector of at most ", kThreads, " elements");
  y = at::empty_like(x);
  return {x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), int(x.numel()), x.numel() * sizeof(float)};
}

// One block of kThreads threads each, the tile (when used) sized for x.
at::Tensor reverse(const at::Tensor& x) {
  at::Tensor y;
  const Operands o = operands(x, y, "reverse");
  RECLORA_LAUNCH(reverse_kernel, 1, kThreads, o.tile_bytes, nullptr)(o.x, o.y, o.n);
  return y;
}

at::Tensor missing_barrier(const at::Tensor& x) {
  at::Tensor y;
  const Operands o = operands(x, y, "missing_barrier");
  RECLORA_LAUNCH(missing_barrier_kernel, 1, kThreads, 0, nullptr)(o.x, o.y, o.n);
  return y;
}

at::Tensor off_by_one(const at::Tensor& x) {
  at::Tensor y;
  const Operands o = operands(x, y, "off_by_one");
  RECLORA_LAUNCH(off_by_one_kernel, 1, kThreads, 0, nullptr)(o.x, o.y, o.n);
  return y;
}

at::Tensor shared_off_by_one(const at::Tensor& x) {
  at::Tensor y;
  const Operands o = operands(x, y, "shared_off_by_one");
  RECLORA_LAUNCH(shared_off_by_one_kernel, 1, kThreads, o.tile_bytes, nullptr)(o.x, o.y, o.n);
  return y;
}

at::Tensor divergent_barrier(const at::Tensor& x) {
  at::Tensor y;
  const Operands o = operands(x, y, "divergent_barrier");
  RECLORA_LAUNCH(divergent_barrier_kernel, 1, kThreads, 0, nullptr)(o.x, o.y, o.n);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reclora_emulated, m) {
  m.def("test_reverse(Tensor x) -> Tensor");
  m.def("test_missing_barrier(Tensor x) -> Tensor");
  m.def("test_off_by_one(Tensor x) -> Tensor");
  m.def("test_shared_off_by_one(Tensor x) -> Tensor");
  m.def("test_divergent_barrier(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(reclora_emulated, CPU, m) {
  m.impl("test_reverse", &reverse);
  m.impl("test_missing_barrier", &missing_barrier);
  m.impl("test_off_by_one", &off_by_one);
  m.impl("test_shared_off_by_one", &shared_off_by_one);
  m.impl("test_divergent_barrier", &divergent_barrier);
}
