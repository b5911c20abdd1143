// CUDA kernels of the retrieval ops (schemas in registration.cpp, ground truth in
// reclora_kernels/retrieval_reference.py).
//
// Forward:
//   score_select_kernel  one block per (row, chunk of at most kChunkMax positions), so that long
//                        rows fill the GPU: groups of lanes score the chunk's valid positions,
//                        gathering table rows through ids as they go, into shared memory; a
//                        radix select then writes the chunk's top k as 64-bit keys.
//   merge_kernel         one block per row: radix select over the row's chunk candidates, then a
//                        bitonic sort of the survivors (at::topk on the keys past kSortMax).
//   pool_kernel          attention, one block per row: softmax over the selected scores and the
//                        probability-weighted sum of the selected value rows.
// Backward, one block per row: the query gradient is a weighted sum of the selected rows; row
// gradients are scattered with atomics (into a float32 buffer for tables) or, in deterministic
// mode, written per slot and summed by index_add_.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "cuda_platform.cuh"  // last: the CUDA headers, or the CPU emulation (tests)

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace {

constexpr int kThreads = 256;  // every kernel; the radix select gives each thread one bin
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunkMax = 4096;  // positions per block: 16 KB of score codes in shared memory
constexpr int kChunkMin = 512;   // smaller chunks cost more in the merge than they gain
constexpr int kSortMax = 4096;   // survivors sorted in shared memory (32 KB of keys)
constexpr int kUnits = 2;        // query vectors each lane holds per tile of the dimension
constexpr int kUnroll = 4;       // key rows each group has in flight
constexpr uint64_t kSignBit = uint64_t(1) << 63;

// ---- keys: (score, position) as one sortable integer -----------------------------------------

// Order-preserving float -> uint32. NaN ranks above +inf (as in torch.sort) and -0 is folded
// into +0 so that equal scores tie on position. The smallest code, -inf's, is 0x007fffff.
__device__ __forceinline__ uint32_t score_code(float score) {
  if (score != score) return 0xffffffffu;
  const uint32_t bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float code_score(uint32_t code) {
  return __uint_as_float((code & 0x80000000u) ? (code & 0x7fffffffu) : ~code);
}

// Larger key = better rank: the score code above, the reversed position below (ties go to the
// smaller position). Keys of valid positions are distinct and never 0; 0 marks "no candidate".
__device__ __forceinline__ uint64_t make_key(uint32_t code, int64_t pos) {
  return (uint64_t(code) << 32) | (0xffffffffu - uint32_t(pos));
}

__device__ __forceinline__ void write_slot(uint64_t key, float* score, int64_t* index) {
  *score = key ? code_score(uint32_t(key >> 32)) : -std::numeric_limits<float>::infinity();
  *index = key ? int64_t(0xffffffffu - uint32_t(key)) : int64_t(-1);
}

// ---- block-wide building blocks ----------------------------------------------------------------

// Every thread gets the total, summed in the same order (so the same value everywhere).
template <typename T>
__device__ T block_sum(T value, T* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  __syncthreads();  // the previous call's readers are done with scratch
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

struct alignas(16) SelectShared {
  uint32_t hist[kThreads];
  uint32_t warp_total[kWarps];
  int count[kWarps];  // block_sum scratch
  uint32_t cursor;
  uint32_t bin, above, in_bin;
};

// The largest T such that exactly m of the n keys are >= T, one 8-bit digit per pass from the
// top (torch's radixSelect, with an early exit once the chosen bin is taken whole). Requires
// 1 <= m <= number of nonzero keys, the nonzero keys being distinct; then the m-th largest key
// is nonzero and zeros can never reach the selection.
template <typename KeyAt>
__device__ uint64_t radix_threshold(const KeyAt& key_at, int n, uint32_t m, SelectShared& sh) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  uint64_t prefix = 0;
  uint32_t remaining = m;
  for (int shift = 56; shift >= 0; shift -= 8) {
    const uint64_t high = shift == 56 ? 0 : ~uint64_t(0) << (shift + 8);
    sh.hist[tid] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kThreads) {
      const uint64_t key = key_at(i);
      if ((key & high) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    // Thread t owns bin 255 - t: an inclusive scan counts the keys in the bins above and in it.
    const uint32_t own = sh.hist[kThreads - 1 - tid];
    uint32_t inclusive = own;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const uint32_t other = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) sh.warp_total[warp] = inclusive;
    __syncthreads();
    for (int w = 0; w < warp; ++w) inclusive += sh.warp_total[w];
    const uint32_t exclusive = inclusive - own;
    if (exclusive < remaining && remaining <= inclusive) {  // exactly one thread
      sh.bin = uint32_t(kThreads - 1 - tid);
      sh.above = exclusive;
      sh.in_bin = own;
    }
    __syncthreads();
    prefix |= uint64_t(sh.bin) << shift;
    remaining -= sh.above;
    const bool whole_bin = sh.in_bin == remaining;
    __syncthreads();  // hist and the bin are rewritten by the next pass
    if (whole_bin) break;
  }
  return prefix;
}

// Writes the m = min(cap, valid) largest keys to out[0, m) in no particular order and returns m.
// valid: the number of nonzero keys among key_at(0 .. n-1), the same in every thread. Callers
// order the writes of what key_at reads before the call with a barrier.
template <typename KeyAt>
__device__ int select_top(const KeyAt& key_at, int n, int valid, int cap, uint64_t* out, SelectShared& sh) {
  const int m = min(cap, valid);
  const uint64_t threshold = m < valid ? radix_threshold(key_at, n, uint32_t(m), sh) : 1;
  if (threadIdx.x == 0) sh.cursor = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const uint64_t key = key_at(i);
    if (key != 0 && key >= threshold) {
      const uint32_t slot = atomicAdd(&sh.cursor, 1u);
      if (slot < uint32_t(cap)) out[slot] = key;
    }
  }
  return m;
}

// Sorts keys[0, size) descending; size is a power of two. Ends with a barrier when size > 1.
__device__ void bitonic_sort_descending(uint64_t* keys, int size) {
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < size / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == ((lo & span) == 0)) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// ---- rows of keys or values ---------------------------------------------------------------------

// Where position pos of row b lives: row b * L + pos of a dense (B * L, dim) tensor, or the table
// row ids[b, pos]. Only valid positions are ever looked up (padding ids may be garbage).
struct Gather {
  const int64_t* ids;  // (B, L), or nullptr for dense rows
  int length;          // L
  int64_t rows;        // rows of the table (or B * L)

  __device__ int64_t row(int64_t b, int64_t pos) const {
    if (ids == nullptr) return b * length + pos;
    const int64_t r = ids[b * length + pos];
    RECLORA_KERNEL_ASSERT(r >= 0 && r < rows);
    return r;
  }
};

template <typename scalar_t, int W>
struct alignas(sizeof(scalar_t) * W) Pack {
  scalar_t v[W];
};

struct alignas(16) RowsShared {
  int64_t row[kThreads];  // row of each slot of the staged tile, -1 for missing slots
  float weight[kThreads];
  float partial[kThreads];
  float sum[kWarps];  // block_sum scratch
};

// Stages the slots [j0, j0 + kThreads) of one row (index, weight: that row's (k,) entries): their
// rows and factor * weight, or -1 and 0 when missing. Begins with a barrier so that the
// previous tile's readers are done, and ends with one so that the tile can be read.
__device__ void stage_slots(const int64_t* index, const float* weight, float factor, const Gather& gather,
                            int64_t b, int k, int j0, RowsShared& sh) {
  __syncthreads();
  const int j = j0 + int(threadIdx.x);
  int64_t row = -1;
  float w = 0.0f;
  if (j < k) {
    const int64_t pos = index[j];
    if (pos >= 0) {
      RECLORA_KERNEL_ASSERT(pos < gather.length);
      row = gather.row(b, pos);
      w = factor * weight[j];
    }
  }
  sh.row[threadIdx.x] = row;
  sh.weight[threadIdx.x] = w;
  __syncthreads();
}

// out = sum over the selected slots j of factor * weight[j] * x[row_j], summed in float32.
// Threads split the dimension; with dim < kThreads, several threads share an element and add up
// disjoint slot sets, combined through shared memory.
template <typename scalar_t>
__device__ void weighted_rows(const int64_t* index, const float* weight, float factor, const Gather& gather,
                              const scalar_t* x, int dim, int64_t b, int k, scalar_t* out, RowsShared& sh) {
  if (dim == 0) return;
  const int tid = threadIdx.x;
  const int span = min(dim, kThreads);
  const int lanes = kThreads / span;
  const int lane = tid / span;
  for (int e0 = 0; e0 < dim; e0 += span) {
    const int e = e0 + tid % span;
    const bool active = lane < lanes && e < dim;
    float acc = 0.0f;
    for (int j0 = 0; j0 < k; j0 += kThreads) {
      stage_slots(index, weight, factor, gather, b, k, j0, sh);
      const int tile = min(kThreads, k - j0);
      if (active) {
        for (int t = lane; t < tile; t += lanes) {
          const int64_t row = sh.row[t];
          if (row >= 0) acc = fmaf(sh.weight[t], static_cast<float>(x[row * dim + e]), acc);
        }
      }
    }
    if (lanes == 1) {
      if (active) out[e] = static_cast<scalar_t>(acc);
    } else {  // dim < kThreads: this is the only pass over e0
      sh.partial[tid] = acc;
      __syncthreads();
      if (tid < span) {
        float total = 0.0f;
        for (int l = 0; l < lanes; ++l) total += sh.partial[l * span + tid];
        out[tid] = static_cast<scalar_t>(total);
      }
    }
  }
}

// dst[row_j] += factor * weight[j] * src for every selected slot j, with atomics. In
// deterministic mode (contrib != nullptr) writes each product to contrib[j] instead, zeros for
// missing slots, and, when contrib_rows != nullptr, row_j (0 for missing slots) to contrib_rows[j].
template <typename scalar_t, typename dst_t>
__device__ void scatter_rows(const int64_t* index, const float* weight, float factor, const Gather& gather,
                             const scalar_t* src, int dim, int64_t b, int k, dst_t* dst, float* contrib,
                             int64_t* contrib_rows, RowsShared& sh) {
  const int tid = threadIdx.x;
  for (int j0 = 0; j0 < k; j0 += kThreads) {
    stage_slots(index, weight, factor, gather, b, k, j0, sh);
    const int tile = min(kThreads, k - j0);
    if (contrib_rows != nullptr && tid < tile) contrib_rows[j0 + tid] = max(sh.row[tid], int64_t(0));
    if (dim == 0) continue;
    // Thread tid takes the elements f = tid, tid + kThreads, ... of the (tile, dim) block, f = t * dim + e;
    // (t, e) advance by (step_t, step_e) each time: no per-element division (a 64-bit one is a
    // subroutine call, around which ptxas spilled registers).
    const int step_t = kThreads / dim, step_e = kThreads % dim;
    for (int t = tid / dim, e = tid % dim; t < tile;) {
      const int64_t row = sh.row[t];
      const float value = row >= 0 ? sh.weight[t] * static_cast<float>(src[e]) : 0.0f;
      if (contrib != nullptr) {
        contrib[int64_t(j0 + t) * dim + e] = value;
      } else if (row >= 0) {
        gpuAtomicAdd(dst + row * dim + e, static_cast<dst_t>(value));
      }
      t += step_t;
      if (e >= dim - step_e) {  // e + step_e >= dim, without overflowing
        e -= dim - step_e;
        ++t;
      } else {
        e += step_e;
      }
    }
  }
}

// ---- kernels ------------------------------------------------------------------------------------

// Block (b, c) scores positions [c * chunk, (c + 1) * chunk) of row b and writes its top
// cap = min(k, chunk) keys, unordered, zero-padded, to cand[b * chunks + c].
// Lanes form groups of `group` (a power of two <= 32); a group scores one position at a time,
// lane l reading vectors l, l + group, ... of W elements (16 bytes when aligned); the dimension
// is walked in tiles of group * kUnits vectors so that each lane keeps its query slice in
// registers. Scores (partial sums between tiles) live in shared memory, one word per position.
template <typename scalar_t, int W>
__global__ void __launch_bounds__(kThreads)
    score_select_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ keys, Gather gather,
                        const int64_t* __restrict__ lengths, const bool* __restrict__ mask, int dim, int chunk,
                        int chunks, int cap, int group, float scale, uint64_t* __restrict__ cand) {
  RECLORA_DYNAMIC_SHARED(smem);
  SelectShared& sh = *reinterpret_cast<SelectShared*>(smem);
  uint32_t* code = reinterpret_cast<uint32_t*>(smem + sizeof(SelectShared));
  using Vec = Pack<scalar_t, W>;

  const int length = gather.length;
  const int64_t b = blockIdx.x / unsigned(chunks);
  const int start = int(blockIdx.x % unsigned(chunks)) * chunk;
  const int64_t row_length = lengths ? min(max(lengths[b], int64_t(0)), int64_t(length)) : int64_t(length);
  // Positions past the row's length are invalid: the chunk stops there.
  const int n = int(max(min(int64_t(chunk), row_length - start), int64_t(0)));

  const int units = dim / W;
  const int lane = threadIdx.x & (group - 1);
  const int groups = kThreads / group;
  const int g = threadIdx.x / group;
  const int tile_units = group * kUnits;
  const int tiles = max(1, (units + tile_units - 1) / tile_units);
  const scalar_t* q_row = query + b * dim;
  int valid_count = 0;

  for (int tile = 0; tile < tiles; ++tile) {
    const int u0 = tile * tile_units + lane;
    float q[kUnits][W];
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      const int u = u0 + j * group;
      const Vec v = u < units ? *reinterpret_cast<const Vec*>(q_row + u * W) : Vec{};
#pragma unroll
      for (int w = 0; w < W; ++w) q[j][w] = static_cast<float>(v.v[w]);
    }
    const bool last = tile == tiles - 1;
    // Block-uniform trip count: every lane reaches the shuffles below.
    for (int base = 0; base < n; base += groups * kUnroll) {
      Vec kv[kUnroll][kUnits];
      bool live[kUnroll];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int i = base + r * groups + g;
        const int64_t pos = start + i;
        live[r] = i < n && (mask == nullptr || mask[b * length + pos]);
        const scalar_t* key_row = live[r] ? keys + gather.row(b, pos) * dim : nullptr;
#pragma unroll
        for (int j = 0; j < kUnits; ++j) {
          const int u = u0 + j * group;
          kv[r][j] = live[r] && u < units ? *reinterpret_cast<const Vec*>(key_row + u * W) : Vec{};
        }
      }
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < kUnits; ++j) {
#pragma unroll
          for (int w = 0; w < W; ++w) s = fmaf(q[j][w], static_cast<float>(kv[r][j].v[w]), s);
        }
        for (int offset = group / 2; offset > 0; offset >>= 1) s += __shfl_xor_sync(kFullMask, s, offset);
        const int i = base + r * groups + g;
        if (lane == 0 && i < n) {
          if (tile > 0) s += __uint_as_float(code[i]);
          if (!last) {
            code[i] = __float_as_uint(s);
          } else {
            code[i] = live[r] ? score_code(scale * s) : 0u;
            valid_count += live[r];
          }
        }
      }
    }
  }

  const int valid = block_sum(valid_count, sh.count);  // its barriers publish code[]
  uint64_t* out = cand + int64_t(blockIdx.x) * cap;
  const auto key_at = [=](int i) -> uint64_t {
    const uint32_t c = code[i];
    return c ? make_key(c, start + i) : 0;
  };
  const int m = select_top(key_at, n, valid, cap, out, sh);
  for (int slot = m + int(threadIdx.x); slot < cap; slot += kThreads) out[slot] = 0;
}

// Row b: the top min(k, valid) of its n candidates, sorted, as scores and index (k slots).
// take = min(k, n) and sort_size = the power of two >= take bound the survivors.
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const uint64_t* __restrict__ cand, int n, int k, int take, int sort_size, float* __restrict__ scores,
                 int64_t* __restrict__ index) {
  RECLORA_DYNAMIC_SHARED(smem);
  SelectShared& sh = *reinterpret_cast<SelectShared*>(smem);
  uint64_t* top = reinterpret_cast<uint64_t*>(smem + sizeof(SelectShared));
  const int64_t b = blockIdx.x;
  const uint64_t* row = cand + b * n;

  int mine = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) mine += row[i] != 0;
  for (int i = threadIdx.x; i < sort_size; i += kThreads) top[i] = 0;
  const int valid = block_sum(mine, sh.count);
  const int m = select_top([=](int i) { return row[i]; }, n, valid, take, top, sh);
  __syncthreads();
  bitonic_sort_descending(top, sort_size);
  for (int j = threadIdx.x; j < k; j += kThreads) write_slot(j < m ? top[j] : 0, scores + b * k + j, index + b * k + j);
}

// Past kSortMax the merge runs through at::topk on the sign-flipped keys: decode them.
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const int64_t* __restrict__ top, int64_t take, int64_t k, int64_t total, float* __restrict__ scores,
                  int64_t* __restrict__ index) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t b = i / k, j = i % k;
  write_slot(j < take ? uint64_t(top[b * take + j]) ^ kSignBit : 0, scores + i, index + i);
}

// Attention forward, row b: probs = softmax over the selected scores, pooled = sum of probs *
// value rows.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pool_kernel(const float* __restrict__ scores, const int64_t* __restrict__ index, const scalar_t* __restrict__ values,
                Gather gather, int dim_v, int k, float* probs, scalar_t* __restrict__ pooled) {
  RECLORA_DYNAMIC_SHARED(smem);
  RowsShared& sh = *reinterpret_cast<RowsShared*>(smem);
  const int64_t b = blockIdx.x;
  const float* s = scores + b * k;
  const int64_t* idx = index + b * k;
  float* p = probs + b * k;
  // Sorted descending with the missing slots last: the first score is the maximum.
  const float top = s[0];
  float mine = 0.0f;
  for (int j = threadIdx.x; j < k; j += kThreads)
    if (idx[j] >= 0) mine += expf(s[j] - top);
  const float total = block_sum(mine, sh.sum);
  for (int j = threadIdx.x; j < k; j += kThreads) p[j] = idx[j] >= 0 ? expf(s[j] - top) / total : 0.0f;
  // probs is read back by other threads after stage_slots' first barrier.
  weighted_rows(idx, p, 1.0f, gather, values, dim_v, b, k, pooled + b * dim_v, sh);
}

// retrieve_topk backward, row b: grad_query = scale * sum_j g_j key_j; grad_keys[row_j] +=
// scale * g_j * query (dense: atomics on the output; table: float32 buffer or per-slot rows).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    retrieve_backward_kernel(const float* __restrict__ grad_scores, const scalar_t* __restrict__ query,
                             const scalar_t* __restrict__ keys, Gather gather, const int64_t* __restrict__ index, int dim,
                             int k, float scale, scalar_t* __restrict__ grad_query, scalar_t* dense_grad_keys,
                             float* table_grad_keys, float* contrib, int64_t* contrib_rows) {
  RECLORA_DYNAMIC_SHARED(smem);
  RowsShared& sh = *reinterpret_cast<RowsShared*>(smem);
  const int64_t b = blockIdx.x;
  const float* g = grad_scores + b * k;
  const int64_t* idx = index + b * k;
  const scalar_t* q = query + b * dim;
  weighted_rows(idx, g, scale, gather, keys, dim, b, k, grad_query + b * dim, sh);
  if (dense_grad_keys != nullptr) {
    scatter_rows(idx, g, scale, gather, q, dim, b, k, dense_grad_keys, static_cast<float*>(nullptr),
                 static_cast<int64_t*>(nullptr), sh);
  } else {
    scatter_rows(idx, g, scale, gather, q, dim, b, k, table_grad_keys, contrib ? contrib + b * k * dim : nullptr,
                 contrib ? contrib_rows + b * k : nullptr, sh);
  }
}

// Attention backward, row b: dp_j = <grad_pooled, v_j>, ds_j = p_j (dp_j - sum_i p_i dp_i) (kept in
// the (B, k) scratch ds); then the query gradient and the key and value row gradients.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kernel(const scalar_t* __restrict__ grad_pooled, const scalar_t* __restrict__ query,
                              const scalar_t* __restrict__ keys, const scalar_t* __restrict__ values, Gather key_rows,
                              Gather value_rows, const int64_t* __restrict__ index, const float* __restrict__ probs,
                              int dim, int dim_v, int k, float scale, float* ds, scalar_t* __restrict__ grad_query,
                              scalar_t* dense_grad_keys, float* table_grad_keys, scalar_t* dense_grad_values,
                              float* table_grad_values, float* contrib_keys, float* contrib_values,
                              int64_t* contrib_rows) {
  RECLORA_DYNAMIC_SHARED(smem);
  RowsShared& sh = *reinterpret_cast<RowsShared*>(smem);
  const int64_t b = blockIdx.x;
  const int64_t* idx = index + b * k;
  const float* p = probs + b * k;
  const scalar_t* gp = grad_pooled + b * dim_v;
  float* ds_row = ds + b * k;
  const int lane = threadIdx.x % 32;

  for (int j = threadIdx.x / 32; j < k; j += kWarps) {  // a warp per slot
    const int64_t pos = idx[j];
    float dot = 0.0f;
    if (pos >= 0) {
      RECLORA_KERNEL_ASSERT(pos < value_rows.length);
      const scalar_t* v = values + value_rows.row(b, pos) * dim_v;
      for (int e = lane; e < dim_v; e += 32) dot = fmaf(static_cast<float>(gp[e]), static_cast<float>(v[e]), dot);
    }
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(kFullMask, dot, offset);
    if (lane == 0) ds_row[j] = dot;
  }
  __syncthreads();
  float mine = 0.0f;
  for (int j = threadIdx.x; j < k; j += kThreads) mine += p[j] * ds_row[j];
  const float expected = block_sum(mine, sh.sum);
  for (int j = threadIdx.x; j < k; j += kThreads) ds_row[j] = p[j] * (ds_row[j] - expected);
  // ds_row is read by other threads after stage_slots' first barrier.
  weighted_rows(idx, ds_row, scale, key_rows, keys, dim, b, k, grad_query + b * dim, sh);
  const scalar_t* q = query + b * dim;
  if (dense_grad_keys != nullptr) {
    scatter_rows(idx, ds_row, scale, key_rows, q, dim, b, k, dense_grad_keys, static_cast<float*>(nullptr),
                 static_cast<int64_t*>(nullptr), sh);
    scatter_rows(idx, p, 1.0f, value_rows, gp, dim_v, b, k, dense_grad_values, static_cast<float*>(nullptr),
                 static_cast<int64_t*>(nullptr), sh);
  } else {
    const bool per_slot = contrib_keys != nullptr;
    scatter_rows(idx, ds_row, scale, key_rows, q, dim, b, k, table_grad_keys,
                 per_slot ? contrib_keys + b * k * dim : nullptr, per_slot ? contrib_rows + b * k : nullptr, sh);
    scatter_rows(idx, p, 1.0f, value_rows, gp, dim_v, b, k, table_grad_values,
                 per_slot ? contrib_values + b * k * dim_v : nullptr, static_cast<int64_t*>(nullptr), sh);
  }
}

// ---- host side ----------------------------------------------------------------------------------

using reclora::ceil_div;

int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

const int64_t* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK(t.device() == query.device(), name, " must be on ", query.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_typed(const at::Tensor& t, const char* name, const at::Tensor& query, at::ScalarType dtype,
                 at::IntArrayRef shape) {
  check_operand(t, name, query);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Checks query, rows (keys or values: (B, L, *) dense, or (N, *) with ids) and ids; returns L.
int64_t check_rows(const at::Tensor& query, const at::Tensor& rows, const char* name,
                   const std::optional<at::Tensor>& ids, std::optional<int64_t> dim) {
  TORCH_CHECK(query.is_cuda(), "query must be a CUDA tensor, got ", query.device());
  TORCH_CHECK(query.dim() == 2, "query must be (B, d), got ", query.sizes());
  check_operand(query, "query", query);
  check_operand(rows, name, query);
  TORCH_CHECK(rows.scalar_type() == query.scalar_type(), name, " must have query's dtype ", query.scalar_type(),
              ", got ", rows.scalar_type());
  const int64_t batch = query.size(0);
  int64_t length;
  if (ids.has_value()) {
    TORCH_CHECK(ids->dim() == 2 && ids->size(0) == batch, "ids must be (B, L) with B = ", batch, ", got ",
                ids->sizes());
    check_typed(*ids, "ids", query, at::kLong, ids->sizes());
    TORCH_CHECK(rows.dim() == 2, name, " must be a (N, d) table when ids are given, got ", rows.sizes());
    length = ids->size(1);
  } else {
    TORCH_CHECK(rows.dim() == 3 && rows.size(0) == batch, name, " must be (B, L, d) with B = ", batch, ", got ",
                rows.sizes());
    length = rows.size(1);
  }
  if (dim.has_value()) TORCH_CHECK(rows.size(-1) == *dim, name, " must have d = ", *dim, " columns, got ", rows.sizes());
  TORCH_CHECK(length < std::numeric_limits<int32_t>::max() && rows.size(-1) < std::numeric_limits<int32_t>::max(),
              "L and d must be below 2^31 - 1");
  return length;
}

Gather make_gather(const at::Tensor& rows, const std::optional<at::Tensor>& ids, int64_t batch, int64_t length) {
  return Gather{ptr_or_null(ids), int(length), ids.has_value() ? rows.size(0) : batch * length};
}

// Scores, index: the forward's top k (shared by both ops).
std::tuple<at::Tensor, at::Tensor> select_topk(const at::Tensor& query, const at::Tensor& keys,
                                               const std::optional<at::Tensor>& ids,
                                               const std::optional<at::Tensor>& lengths,
                                               const std::optional<at::Tensor>& mask, int64_t k, double scale,
                                               int64_t length) {
  const int64_t batch = query.size(0), dim = query.size(1);
  TORCH_CHECK(k >= 1 && k < std::numeric_limits<int32_t>::max(), "k must lie in [1, 2^31 - 1), got ", k);
  if (lengths.has_value()) check_typed(*lengths, "lengths", query, at::kLong, {batch});
  if (mask.has_value()) check_typed(*mask, "mask", query, at::kBool, {batch, length});
  auto scores = at::empty({batch, k}, query.options().dtype(at::kFloat));
  auto index = at::empty({batch, k}, query.options().dtype(at::kLong));
  if (batch == 0) return {scores, index};
  if (length == 0) {
    scores.fill_(-std::numeric_limits<float>::infinity());
    index.fill_(-1);
    return {scores, index};
  }
  // Enough (row, chunk) blocks to fill the GPU, chunks no longer than kChunkMax.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::max(ceil_div(length, kChunkMax),
                            std::min(ceil_div(2 * sms, batch), ceil_div(length, kChunkMin)));
  const int64_t chunk = ceil_div(length, chunks);
  chunks = ceil_div(length, chunk);
  const int64_t cap = std::min(k, chunk);
  const int64_t n = chunks * cap;
  TORCH_CHECK(batch * chunks <= std::numeric_limits<int32_t>::max() && n <= std::numeric_limits<int32_t>::max(),
              "retrieve_topk: B = ", batch, ", L = ", length, " and k = ", k, " exceed the CUDA kernel's grid");
  auto cand = at::empty({batch, n}, index.options());
  auto* cand_ptr = reinterpret_cast<uint64_t*>(cand.data_ptr<int64_t>());
  const Gather gather = make_gather(keys, ids, batch, length);
  const auto stream = at::cuda::getCurrentCUDAStream();

  RECLORA_DISPATCH(query.scalar_type(), "retrieve_topk_cuda", [&] {
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool wide = dim % vec == 0 && aligned16(query) && aligned16(keys);
    const int64_t units = dim / (wide ? vec : 1);
    const int group = int(std::min<int64_t>(32, pow2_ceil(ceil_div(units, kUnits))));
    const auto score_select = wide ? score_select_kernel<scalar_t, vec> : score_select_kernel<scalar_t, 1>;
    const size_t smem = sizeof(SelectShared) + chunk * sizeof(uint32_t);
    RECLORA_LAUNCH(score_select, unsigned(batch * chunks), kThreads, smem, stream)(
        query.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), gather, lengths ? lengths->data_ptr<int64_t>() : nullptr,
        mask ? mask->data_ptr<bool>() : nullptr, int(dim), int(chunk), int(chunks), int(cap), group, float(scale),
        cand_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const int64_t take = std::min(k, n);
  if (take <= kSortMax) {
    const int64_t sort_size = pow2_ceil(take);
    RECLORA_LAUNCH(merge_kernel, unsigned(batch), kThreads, sizeof(SelectShared) + sort_size * sizeof(uint64_t), stream)(
        cand_ptr, int(n), int(k), int(take), int(sort_size), scores.data_ptr<float>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // Flipping the sign bit makes signed order the keys' unsigned order.
    const auto top = std::get<0>(at::topk(at::bitwise_xor(cand, std::numeric_limits<int64_t>::min()), take, 1));
    const int64_t total = batch * k;
    TORCH_CHECK(ceil_div(total, kThreads) <= std::numeric_limits<int32_t>::max(), "B * k is too large");
    RECLORA_LAUNCH(decode_kernel, unsigned(ceil_div(total, kThreads)), kThreads, 0, stream)(
        top.data_ptr<int64_t>(), take, k, total, scores.data_ptr<float>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {scores, index};
}

std::tuple<at::Tensor, at::Tensor> retrieve_topk_forward(const at::Tensor& query, const at::Tensor& keys,
                                                         const std::optional<at::Tensor>& ids,
                                                         const std::optional<at::Tensor>& lengths,
                                                         const std::optional<at::Tensor>& mask, int64_t k,
                                                         double scale) {
  const int64_t length = check_rows(query, keys, "keys", ids, query.size(-1));
  const c10::cuda::CUDAGuard guard(query.device());
  return select_topk(query, keys, ids, lengths, mask, k, scale, length);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_forward(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& ids,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, int64_t k, double scale) {
  const int64_t length = check_rows(query, keys, "keys", ids, query.size(-1));
  TORCH_CHECK(check_rows(query, values, "values", ids, std::nullopt) == length, "values must have L = ", length,
              " positions, got ", values.sizes());
  const c10::cuda::CUDAGuard guard(query.device());
  auto [scores, index] = select_topk(query, keys, ids, lengths, mask, k, scale, length);
  const int64_t batch = query.size(0), dim_v = values.size(-1);
  auto probs = at::empty_like(scores);
  auto pooled = at::empty({batch, dim_v}, values.options());
  if (batch == 0) return {pooled, index, probs};
  const Gather gather = make_gather(values, ids, batch, length);
  RECLORA_DISPATCH(values.scalar_type(), "topk_attention_cuda", [&] {
    RECLORA_LAUNCH(pool_kernel<scalar_t>, unsigned(batch), kThreads, sizeof(RowsShared), at::cuda::getCurrentCUDAStream())(
        scores.data_ptr<float>(), index.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), gather, int(dim_v), int(k),
        probs.data_ptr<float>(), pooled.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pooled, index, probs};
}

// Gradient of a row operand (keys or values). Dense rows get atomics on the output itself: a
// dense row belongs to one query row, whose selected positions are distinct, so each element
// receives at most one add (exact and deterministic). Table rows may repeat across and within
// query rows: float32 buffer with atomics, or in deterministic mode per-slot products summed by
// index_add_ (deterministic on CUDA when deterministic algorithms are on).
struct RowGrad {
  at::Tensor out;      // dense: the gradient itself
  at::Tensor buffer;   // table: float32 sums
  at::Tensor contrib;  // table, deterministic: (B * k, dim) per-slot products

  RowGrad(const at::Tensor& rows, bool table, bool deterministic, int64_t slots) {
    if (!table) {
      out = at::zeros_like(rows);
      return;
    }
    buffer = at::zeros(rows.sizes(), rows.options().dtype(at::kFloat));
    if (deterministic) contrib = at::empty({slots, rows.size(-1)}, buffer.options());
  }

  template <typename scalar_t>
  scalar_t* dense() const { return out.defined() ? out.data_ptr<scalar_t>() : nullptr; }
  float* table() const { return buffer.defined() ? buffer.data_ptr<float>() : nullptr; }
  float* per_slot() const { return contrib.defined() ? contrib.data_ptr<float>() : nullptr; }

  at::Tensor finish(const at::Tensor& rows, const at::Tensor& contrib_rows) {
    if (out.defined()) return out;
    if (contrib.defined()) buffer.index_add_(0, contrib_rows, contrib);
    return buffer.to(rows.scalar_type());
  }
};

void check_slots(const at::Tensor& index, const at::Tensor& query, const char* name, const at::Tensor& t) {
  check_typed(index, "index", query, at::kLong, {query.size(0), index.size(-1)});
  check_typed(t, name, query, t.scalar_type(), index.sizes());
}

std::tuple<at::Tensor, at::Tensor> retrieve_topk_backward(const at::Tensor& grad_scores, const at::Tensor& query,
                                                          const at::Tensor& keys, const std::optional<at::Tensor>& ids,
                                                          const at::Tensor& index, double scale) {
  const int64_t length = check_rows(query, keys, "keys", ids, query.size(-1));
  TORCH_CHECK(index.dim() == 2, "index must be (B, k), got ", index.sizes());
  check_slots(index, query, "grad_scores", grad_scores);
  TORCH_CHECK(grad_scores.scalar_type() == at::kFloat, "grad_scores must be float32, got ", grad_scores.scalar_type());
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch = query.size(0), dim = query.size(1), k = index.size(1);
  TORCH_CHECK(k < std::numeric_limits<int32_t>::max(), "k must be below 2^31 - 1");
  const bool table = ids.has_value();
  const bool deterministic = table && at::globalContext().deterministicAlgorithms();
  const bool launch = batch > 0 && k > 0;
  auto grad_query = launch ? at::empty_like(query) : at::zeros_like(query);  // the kernel writes all of it
  RowGrad grad_keys(keys, table, deterministic, batch * k);
  auto contrib_rows = at::empty({deterministic ? batch * k : 0}, index.options());
  if (launch) {
    const Gather gather = make_gather(keys, ids, batch, length);
    RECLORA_DISPATCH(query.scalar_type(), "retrieve_topk_backward_cuda", [&] {
      RECLORA_LAUNCH(retrieve_backward_kernel<scalar_t>, unsigned(batch), kThreads, sizeof(RowsShared), at::cuda::getCurrentCUDAStream())(
              grad_scores.data_ptr<float>(), query.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(), gather,
              index.data_ptr<int64_t>(), int(dim), int(k), float(scale), grad_query.data_ptr<scalar_t>(),
              grad_keys.dense<scalar_t>(), grad_keys.table(), grad_keys.per_slot(),
              deterministic ? contrib_rows.data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_query, grad_keys.finish(keys, contrib_rows)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward(
    const at::Tensor& grad_pooled, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& ids, const at::Tensor& index, const at::Tensor& probs, double scale) {
  const int64_t length = check_rows(query, keys, "keys", ids, query.size(-1));
  TORCH_CHECK(check_rows(query, values, "values", ids, std::nullopt) == length, "values must have L = ", length,
              " positions, got ", values.sizes());
  TORCH_CHECK(index.dim() == 2, "index must be (B, k), got ", index.sizes());
  check_slots(index, query, "probs", probs);
  TORCH_CHECK(probs.scalar_type() == at::kFloat, "probs must be float32, got ", probs.scalar_type());
  const int64_t batch = query.size(0), dim = query.size(1), dim_v = values.size(-1), k = index.size(1);
  check_typed(grad_pooled, "grad_pooled", query, values.scalar_type(), {batch, dim_v});
  TORCH_CHECK(k < std::numeric_limits<int32_t>::max(), "k must be below 2^31 - 1");
  const c10::cuda::CUDAGuard guard(query.device());
  const bool table = ids.has_value();
  const bool deterministic = table && at::globalContext().deterministicAlgorithms();
  const bool launch = batch > 0 && k > 0;
  auto grad_query = launch ? at::empty_like(query) : at::zeros_like(query);  // the kernel writes all of it
  RowGrad grad_keys(keys, table, deterministic, batch * k);
  RowGrad grad_values(values, table, deterministic, batch * k);
  auto contrib_rows = at::empty({deterministic ? batch * k : 0}, index.options());
  if (launch) {
    auto ds = at::empty({batch, k}, probs.options());
    RECLORA_DISPATCH(query.scalar_type(), "topk_attention_backward_cuda", [&] {
      RECLORA_LAUNCH(attention_backward_kernel<scalar_t>, unsigned(batch), kThreads, sizeof(RowsShared), at::cuda::getCurrentCUDAStream())(
              grad_pooled.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(),
              values.data_ptr<scalar_t>(), make_gather(keys, ids, batch, length),
              make_gather(values, ids, batch, length), index.data_ptr<int64_t>(), probs.data_ptr<float>(), int(dim),
              int(dim_v), int(k), float(scale), ds.data_ptr<float>(), grad_query.data_ptr<scalar_t>(),
              grad_keys.dense<scalar_t>(), grad_keys.table(), grad_values.dense<scalar_t>(), grad_values.table(),
              grad_keys.per_slot(), grad_values.per_slot(), deterministic ? contrib_rows.data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_query, grad_keys.finish(keys, contrib_rows), grad_values.finish(values, contrib_rows)};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CUDA, m) {
  m.impl("retrieve_topk_forward", &retrieve_topk_forward);
  m.impl("retrieve_topk_backward", &retrieve_topk_backward);
  m.impl("topk_attention_forward", &topk_attention_forward);
  m.impl("topk_attention_backward", &topk_attention_backward);
}
