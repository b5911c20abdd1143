// What the C++ CPU and CUDA files share: the dispatch over the kernels' dtypes, integer helpers.
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>

// float32, float16 and bfloat16: the ops' contract (reclora_kernels/_checks.py). Unlike
// AT_DISPATCH_FLOATING_TYPES_AND2 no kernel is compiled for double, which the contract excludes.
#define RECLORA_DISPATCH(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(                                       \
      TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
          AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace reclora {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace reclora
