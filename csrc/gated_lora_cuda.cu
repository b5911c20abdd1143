// CUDA kernels of the personalized LoRA (schemas: registration.cpp; the algebra and its notation,
// U, H, V, Z over the concatenated meta-LoRAs: reclora_kernels/gated_lora_reference.py).
//
// Every product there (U = x A_cat^T, H = G B_cat, y = V B_cat^T (+ bias + x W^T), dx = Z A_cat
// (+ G W), dA_cat = Z^T x, dB_cat^T = V^T G) is one cuBLAS call on the whole batch whatever the
// order of sample_index, with rows of R = K r; the kernels here do only the per-token gate work on
// (M, R) (V, Z and each token's share of dgate) and the per-sample dgate sums. In each kernel every
// output element is written by exactly one thread and threads share nothing (no shared memory, no
// atomics): race-free, and every sum runs in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_platform.cuh"  // last: the CUDA headers, or the CPU emulation (tests)

#include <algorithm>
#include <tuple>

namespace {

constexpr int kThreads = 256;
// Kernels loop grid-stride, so the grid can stay below every device's limit.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
// dgate sums each sample's tokens in parts of about this many tokens, in at most
// kMaxSampleParts (sample, part) pairs, then adds the parts up.
constexpr int64_t kTokensPerPart = 32;
constexpr int64_t kMaxSampleParts = int64_t{1} << 16;

// Row of gate owning each token.
struct TokenSamples {
  const int64_t* sample_index;  // (M,), or null: tokens grouped contiguously, tokens_per_sample each
  int64_t tokens_per_sample;
  int64_t num_samples;

  __device__ __forceinline__ int64_t operator()(int64_t m) const {
    const int64_t b = sample_index != nullptr ? sample_index[m] : m / tokens_per_sample;
    // The Python layer validated sample_index; an out-of-range row must stop here, not read past gate.
    RECLORA_KERNEL_ASSERT(b >= 0 && b < num_samples);
    return b;
  }
};

// mixed[m, j] = scale * sum_k gate[b(m), k] * per_lora[m, k, j]: one thread per (m, j).
template <typename scalar_t>
__global__ void mix_loras_kernel(
    const scalar_t* __restrict__ per_lora,  // (M, K, r)
    const float* __restrict__ gate,         // (B, K)
    TokenSamples samples,
    int64_t num_tokens,
    int64_t num_loras,
    int64_t rank,
    double scale,
    at::opmath_type<scalar_t>* __restrict__ mixed) {  // (M, r)
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = num_tokens * rank;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += gridDim.x * int64_t{blockDim.x}) {
    const int64_t m = i / rank;
    const int64_t j = i - m * rank;
    const float* g = gate + samples(m) * num_loras;
    const scalar_t* row = per_lora + m * num_loras * rank + j;
    acc_t acc = 0;
    for (int64_t k = 0; k < num_loras; ++k) {
      acc += static_cast<acc_t>(g[k]) * static_cast<acc_t>(row[k * rank]);
    }
    mixed[i] = static_cast<acc_t>(scale) * acc;
  }
}

// One thread per (token m, meta-LoRA k): V_mk, and in backward (h_all given) Z_mk and token m's
// share of dgate[b(m), k]. u_mixed / h_mixed are given for weight mix only.
template <typename scalar_t>
__global__ void gate_loras_kernel(
    const scalar_t* __restrict__ u_all,                  // (M, K, r) U
    const at::opmath_type<scalar_t>* __restrict__ u_mixed,  // (M, r) or null
    const scalar_t* __restrict__ h_all,                  // (M, K, r) H, or null (forward)
    const at::opmath_type<scalar_t>* __restrict__ h_mixed,  // (M, r) or null
    const float* __restrict__ gate,                      // (B, K)
    TokenSamples samples,
    int64_t num_tokens,
    int64_t num_loras,
    int64_t rank,
    double scaling,
    scalar_t* __restrict__ v,              // (M, K, r)
    scalar_t* __restrict__ z,              // (M, K, r), or null (forward)
    float* __restrict__ dgate_tokens) {    // (M, K), or null (forward)
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scaling);
  const int64_t n = num_tokens * num_loras;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += gridDim.x * int64_t{blockDim.x}) {
    const int64_t m = i / num_loras;
    const int64_t k = i - m * num_loras;
    const acc_t g = static_cast<acc_t>(gate[samples(m) * num_loras + k]);
    const int64_t row = i * rank;  // (m, k, 0) in (M, K, r)
    acc_t dgate = 0;
    for (int64_t j = 0; j < rank; ++j) {
      const acc_t u_k = static_cast<acc_t>(u_all[row + j]);
      const acc_t u = u_mixed != nullptr ? u_mixed[m * rank + j] : u_k;
      v[row + j] = static_cast<scalar_t>(s * g * u);
      if (h_all != nullptr) {
        const acc_t h_raw = static_cast<acc_t>(h_all[row + j]);
        const acc_t h = h_mixed != nullptr ? h_mixed[m * rank + j] : s * h_raw;
        z[row + j] = static_cast<scalar_t>(g * h);
        dgate += h * u_k + (u_mixed != nullptr ? s * u * h_raw : acc_t{0});
      }
    }
    if (h_all != nullptr) {
      dgate_tokens[i] = static_cast<float>(dgate);
    }
  }
}

// partial[b, p, k] = sum of dgate_tokens[t, k] over part p (of `parts` near-equal parts) of sample
// b's tokens, one thread each. order lists the tokens sorted by sample and offsets[b] where sample
// b starts in it; both null when tokens are grouped contiguously.
__global__ void sample_sums_kernel(
    const float* __restrict__ dgate_tokens,  // (M, K)
    const int64_t* __restrict__ order,       // (M,) or null
    const int64_t* __restrict__ offsets,     // (B + 1,) or null
    int64_t tokens_per_sample,
    int64_t num_samples,
    int64_t parts,
    int64_t num_loras,
    float* __restrict__ partial) {  // (B, parts, K)
  const int64_t n = num_samples * parts * num_loras;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += gridDim.x * int64_t{blockDim.x}) {
    const int64_t sample_part = i / num_loras;
    const int64_t k = i - sample_part * num_loras;
    const int64_t b = sample_part / parts;
    const int64_t p = sample_part - b * parts;
    const int64_t start = offsets != nullptr ? offsets[b] : b * tokens_per_sample;
    const int64_t count = (offsets != nullptr ? offsets[b + 1] : start + tokens_per_sample) - start;
    const int64_t end = start + count * (p + 1) / parts;
    float sum = 0.f;
    for (int64_t t = start + count * p / parts; t < end; ++t) {
      sum += dgate_tokens[(order != nullptr ? order[t] : t) * num_loras + k];
    }
    partial[i] = sum;
  }
}

using reclora::ceil_div;

// Blocks of a grid-stride launch over n items. Callers return early on M = 0 tokens, and K, r >= 1,
// so every launch has n > 0.
unsigned int grid_blocks(int64_t n) {
  TORCH_CHECK(n > 0, "reclora: internal error, launch over ", n, " items");
  const int64_t blocks = std::min(ceil_div(n, kThreads), kMaxBlocks);
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxBlocks, "reclora: internal error, grid of ", blocks, " blocks");
  return static_cast<unsigned int>(blocks);
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

struct Problem {
  int64_t tokens, d_in, d_out, samples, loras, rank;
  TokenSamples token_samples;
};

// Checks the kernels' contract (what the Python layer guarantees) and returns the sizes.
Problem check_problem(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& gate,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const std::optional<at::Tensor>& sample_index,
    const at::Tensor* grad_out) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be (M, d_in) tokens, got shape ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      "x must have a floating dtype, got ", dtype);
  TORCH_CHECK(gate.dim() == 2, "gate must be (B, K), got shape ", gate.sizes());
  TORCH_CHECK(lora_a.dim() == 3, "lora_a must be (K, r, d_in), got shape ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 3, "lora_b must be (K, d_out, r), got shape ", lora_b.sizes());
  const int64_t tokens = x.size(0), d_in = x.size(1), samples = gate.size(0), loras = gate.size(1);
  const int64_t rank = lora_a.size(1), d_out = lora_b.size(1);
  TORCH_CHECK(loras >= 1 && rank >= 1, "need K >= 1 meta-LoRAs of rank r >= 1, got K = ", loras, ", r = ", rank);
  check_tensor(x, "x", x, {tokens, d_in}, dtype);
  check_tensor(gate, "gate", x, {samples, loras}, at::kFloat);
  check_tensor(lora_a, "lora_a", x, {loras, rank, d_in}, dtype);
  check_tensor(lora_b, "lora_b", x, {loras, d_out, rank}, dtype);
  if (weight) {
    check_tensor(*weight, "weight", x, {d_out, d_in}, dtype);
  }
  if (bias) {
    TORCH_CHECK(weight.has_value(), "bias needs weight");
    check_tensor(*bias, "bias", x, {d_out}, dtype);
  }
  if (grad_out != nullptr) {
    check_tensor(*grad_out, "grad_out", x, {tokens, d_out}, dtype);
  }
  TokenSamples token_samples{nullptr, 0, samples};
  if (sample_index) {
    check_tensor(*sample_index, "sample_index", x, {tokens}, at::kLong);
    TORCH_CHECK(samples > 0 || tokens == 0, "sample_index needs gate rows, got gate of shape ", gate.sizes());
    token_samples.sample_index = sample_index->const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK(
        samples > 0 ? tokens % samples == 0 : tokens == 0,
        "without sample_index the M = ", tokens, " tokens are grouped evenly over the B = ", samples, " samples");
    token_samples.tokens_per_sample = samples > 0 ? tokens / samples : 0;
  }
  return {tokens, d_in, d_out, samples, loras, rank, token_samples};
}

// (R, d_in) and (d_out, R) views of the meta-LoRAs (B_cat is a copy: K r d_out elements).
std::tuple<at::Tensor, at::Tensor> concat_loras(const Problem& p, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  const int64_t cat = p.loras * p.rank;
  return {lora_a.reshape({cat, p.d_in}), lora_b.permute({1, 0, 2}).reshape({p.d_out, cat})};
}

at::Tensor mix_loras(const Problem& p, const at::Tensor& per_lora, const at::Tensor& gate, double scale) {
  at::Tensor mixed = at::empty({p.tokens, p.rank}, per_lora.options().dtype(at::toOpMathType(per_lora.scalar_type())));
  const int64_t n = p.tokens * p.rank;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RECLORA_DISPATCH(per_lora.scalar_type(), "mix_loras", [&] {
    RECLORA_LAUNCH(mix_loras_kernel<scalar_t>, grid_blocks(n), kThreads, 0, stream)(
        per_lora.const_data_ptr<scalar_t>(), gate.const_data_ptr<float>(), p.token_samples, p.tokens, p.loras,
        p.rank, scale, mixed.mutable_data_ptr<at::opmath_type<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return mixed;
}

struct GatedFactors {
  at::Tensor v, z, dgate_tokens;  // z and dgate_tokens only in backward
};

// The gate work of forward (h_all undefined) and backward.
GatedFactors gate_loras(
    const Problem& p,
    const at::Tensor& u_all,
    const at::Tensor& h_all,
    const at::Tensor& gate,
    double scaling,
    bool output_mix) {
  const bool backward = h_all.defined();
  at::Tensor u_mixed, h_mixed;
  if (!output_mix) {
    u_mixed = mix_loras(p, u_all, gate, 1.0);
    if (backward) {
      h_mixed = mix_loras(p, h_all, gate, scaling);
    }
  }
  GatedFactors out;
  out.v = at::empty_like(u_all);
  if (backward) {
    out.z = at::empty_like(h_all);
    out.dgate_tokens = at::empty({p.tokens, p.loras}, gate.options());
  }
  const int64_t n = p.tokens * p.loras;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  RECLORA_DISPATCH(u_all.scalar_type(), "gate_loras", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RECLORA_LAUNCH(gate_loras_kernel<scalar_t>, grid_blocks(n), kThreads, 0, stream)(
        u_all.const_data_ptr<scalar_t>(), data_or_null<acc_t>(u_mixed), data_or_null<scalar_t>(h_all),
        data_or_null<acc_t>(h_mixed), gate.const_data_ptr<float>(), p.token_samples, p.tokens, p.loras, p.rank,
        scaling, out.v.mutable_data_ptr<scalar_t>(), mutable_data_or_null<scalar_t>(out.z),
        mutable_data_or_null<float>(out.dgate_tokens));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// grad_gate[b, k] = sum over sample b's tokens of dgate_tokens[:, k], in a fixed order.
at::Tensor sum_per_sample(const Problem& p, const at::Tensor& dgate_tokens, const std::optional<at::Tensor>& sample_index) {
  const int64_t parts =
      std::max<int64_t>(1, std::min(ceil_div(p.tokens, p.samples * kTokensPerPart), kMaxSampleParts / p.samples));
  at::Tensor order, offsets;
  if (sample_index) {
    at::Tensor sorted;
    std::tie(sorted, order) = at::sort(*sample_index, /*stable=*/std::optional<bool>(true), /*dim=*/0);
    offsets = at::searchsorted(sorted, at::arange(p.samples + 1, sample_index->options()));
  }
  at::Tensor partial = at::empty({p.samples, parts, p.loras}, dgate_tokens.options());
  RECLORA_LAUNCH(sample_sums_kernel, grid_blocks(partial.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream())(
      dgate_tokens.const_data_ptr<float>(), data_or_null<int64_t>(order), data_or_null<int64_t>(offsets),
      p.token_samples.tokens_per_sample, p.samples, parts, p.loras, partial.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1);
}

// Returns y and U = x A_cat^T (M, K r) in x's dtype, which the backward reuses (one GEMM of its five).
std::tuple<at::Tensor, at::Tensor> gated_lora_forward_cuda(
    const at::Tensor& x,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& gate,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const std::optional<at::Tensor>& sample_index,
    double scaling,
    bool output_mix) {
  const Problem p = check_problem(x, weight, bias, gate, lora_a, lora_b, sample_index, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  if (p.tokens == 0) {
    return {at::empty({0, p.d_out}, x.options()), at::empty({0, p.loras * p.rank}, x.options())};
  }
  const auto [a_cat, b_cat] = concat_loras(p, lora_a, lora_b);
  at::Tensor u = at::mm(x, a_cat.t());
  const at::Tensor v = gate_loras(p, u, at::Tensor(), gate, scaling, output_mix).v;
  // The memory-bound LoRA GEMM writes y; the compute-bound base GEMM then adds into it (beta = 1),
  // where reading y hides under its math.
  at::Tensor y = bias ? at::addmm(*bias, v, b_cat.t()) : at::mm(v, b_cat.t());
  if (weight) {
    y.addmm_(x, weight->t());
  }
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_lora_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& u,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& gate,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const std::optional<at::Tensor>& sample_index,
    double scaling,
    bool output_mix) {
  const Problem p = check_problem(x, weight, std::nullopt, gate, lora_a, lora_b, sample_index, &grad_out);
  check_tensor(u, "u (the forward's x A_cat^T)", x, {p.tokens, p.loras * p.rank}, x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  if (p.tokens == 0) {
    return {at::empty_like(x), at::zeros_like(gate), at::zeros_like(lora_a), at::zeros_like(lora_b)};
  }
  const auto [a_cat, b_cat] = concat_loras(p, lora_a, lora_b);
  const at::Tensor h_all = at::mm(grad_out, b_cat);
  const GatedFactors f = gate_loras(p, u, h_all, gate, scaling, output_mix);
  at::Tensor grad_a = at::mm(f.z.t(), x).view(lora_a.sizes());
  at::Tensor grad_b = at::mm(grad_out.t(), f.v).view({p.d_out, p.loras, p.rank}).permute({1, 0, 2}).contiguous();
  at::Tensor grad_x = at::mm(f.z, a_cat);
  if (weight) {
    grad_x.addmm_(grad_out, *weight);
  }
  return {grad_x, sum_per_sample(p, f.dgate_tokens, sample_index), grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CUDA, m) {
  m.impl("gated_lora_forward", &gated_lora_forward_cuda);
  m.impl("gated_lora_backward", &gated_lora_backward_cuda);
}
