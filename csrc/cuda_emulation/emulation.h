// The CUDA execution model on the CPU, for tests: lets csrc/*_cuda.cu compile as C++ and run
// its kernels on CPU tensors (included through cuda_platform.cuh under RECLORA_CUDA_EMULATION).
//
// A launch runs the blocks of its grid one after another; the threads of a block are real OS
// threads running the kernel concurrently. __syncthreads is a barrier among them, warp
// shuffles and votes exchange values among the 32 lanes of a warp, which all have to reach the
// same call (warp-synchronous); atomics are relaxed hardware atomics; dynamic shared memory is
// a fresh heap block of exactly the launch's size per block (so AddressSanitizer sees overruns)
// and static __shared__ variables are shared by the block's threads. A barrier or warp
// operation that cannot complete (threads waiting at different ones, or finished) is reported
// as an error naming the kernel instead of hanging. Runtime: emulation.cpp.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace reclora_emu {

void run_grid(const char* kernel, const char* site, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body);
unsigned char* dynamic_shared();
void syncthreads(const char* site);
void syncwarp(const char* site, unsigned mask = 0xffffffffu);
// Every lane of mask deposits value; returns when all have, with the 32 lanes' values in out.
void warp_exchange(unsigned mask, uint64_t value, const char* site, uint64_t* out);
[[noreturn]] void kernel_assert_failed(const char* condition, const char* site);
int lane_id();

template <typename... Params>
struct Launch {
  const char* kernel;
  const char* site;
  void (*function)(Params...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Converted once, then copied into each thread's call, as CUDA passes kernel arguments.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(kernel, site, grid, block, shared_bytes, [&] { std::apply(function, params); });
  }
};

template <typename... Params>
Launch<Params...> launch(const char* kernel, const char* site, void (*function)(Params...), dim3 grid, dim3 block,
                         size_t shared_bytes, cudaStream_t) {
  return {kernel, site, function, grid, block, shared_bytes};
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "warp values up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// The value of lane src of the calling lane's segment of width lanes (own value when src is outside).
template <typename T>
T shuffle(const char* site, unsigned mask, T value, int src, int width = 32) {
  uint64_t lanes[32];
  warp_exchange(mask, to_bits(value), site, lanes);
  const int lane = lane_id();
  const int segment = lane / width * width;
  return from_bits<T>(lanes[src >= segment && src < segment + width ? src : lane]);
}

inline unsigned ballot(unsigned mask, bool predicate, const char* site) {
  uint64_t lanes[32];
  warp_exchange(mask, predicate, site, lanes);
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (mask >> l & 1u) && lanes[l] ? 1u << l : 0u;
  return bits;
}

template <typename T>
T atomic_add(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
    using Sum = std::conditional_t<sizeof(T) == 8, double, float>;
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
      T old;
      std::memcpy(&old, &expected, sizeof(T));
      const T updated = static_cast<T>(static_cast<Sum>(old) + static_cast<Sum>(value));
      Bits desired;
      std::memcpy(&desired, &updated, sizeof(T));
      if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        return old;
      }
    }
  }
}

}  // namespace reclora_emu

#define RECLORA_EMU_STR2(x) #x
#define RECLORA_EMU_STR(x) RECLORA_EMU_STR2(x)
#define RECLORA_EMU_SITE __FILE__ ":" RECLORA_EMU_STR(__LINE__)

#define RECLORA_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  reclora_emu::launch(#kernel, RECLORA_EMU_SITE, kernel, grid, block, shared_bytes, stream)
#define RECLORA_DYNAMIC_SHARED(name) unsigned char* name = reclora_emu::dynamic_shared()

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A function-local static is one object shared by the block's threads; blocks run one at a time.
#define __shared__ static

#define __syncthreads() reclora_emu::syncthreads(RECLORA_EMU_SITE)
#define __syncwarp(...) reclora_emu::syncwarp(RECLORA_EMU_SITE, ##__VA_ARGS__)
#define __shfl_sync(mask, value, src, ...) reclora_emu::shuffle(RECLORA_EMU_SITE, mask, value, int(src), ##__VA_ARGS__)
#define __shfl_xor_sync(mask, value, lanes, ...) \
  reclora_emu::shuffle(RECLORA_EMU_SITE, mask, value, reclora_emu::lane_id() ^ int(lanes), ##__VA_ARGS__)
#define __shfl_up_sync(mask, value, delta, ...) \
  reclora_emu::shuffle(RECLORA_EMU_SITE, mask, value, reclora_emu::lane_id() - int(delta), ##__VA_ARGS__)
#define __shfl_down_sync(mask, value, delta, ...) \
  reclora_emu::shuffle(RECLORA_EMU_SITE, mask, value, reclora_emu::lane_id() + int(delta), ##__VA_ARGS__)
#define __ballot_sync(mask, predicate) reclora_emu::ballot(mask, bool(predicate), RECLORA_EMU_SITE)
#define __any_sync(mask, predicate) (reclora_emu::ballot(mask, bool(predicate), RECLORA_EMU_SITE) != 0u)
#define __all_sync(mask, predicate) (reclora_emu::ballot(mask, bool(predicate), RECLORA_EMU_SITE) == (mask))

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? void(0) : reclora_emu::kernel_assert_failed(#cond, RECLORA_EMU_SITE))
#define RECLORA_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

template <typename T>
T atomicAdd(T* address, T value) {
  return reclora_emu::atomic_add(address, value);
}
template <typename T>
T gpuAtomicAdd(T* address, T value) {
  return reclora_emu::atomic_add(address, value);
}
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline unsigned int __float_as_uint(float x) { return reclora_emu::from_bits<unsigned int>(reclora_emu::to_bits(x)); }
inline float __uint_as_float(unsigned int x) { return reclora_emu::from_bits<float>(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }

// The host code's CUDA runtime, as far as the kernels' host functions use it.
struct cudaDeviceProp {
  int multiProcessorCount;
};

namespace at::cuda {
// The launch geometry follows the device: an H100 SXM's 132 SMs (RECLORA_EMULATED_SMS overrides).
cudaDeviceProp* getCurrentDeviceProperties();
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

// The host code checks that operands are CUDA tensors; here they are CPU tensors.
#define is_cuda is_cpu

// The kernels register as the test-only op set reclora_emulated (CPU key), never as reclora's.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) _TORCH_LIBRARY_IMPL(reclora_emulated, CPU, m, C10_UID)
