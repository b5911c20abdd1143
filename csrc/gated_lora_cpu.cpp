// CPU kernels of reclora::gated_lora_forward / gated_lora_backward (schemas in registration.cpp;
// the algebra and its notation: reclora_kernels/gated_lora_reference.py).
//
// What differs from the other backends: the weight mix runs a token-tile pipeline on each
// sample's A_p (r, d_in) and B_p^T (r, d_out), mixed once per call from the gate, so a token's
// activations are r wide, not K r. Tokens are grouped by sample (a counting sort when sample_index
// is given) and cut into pieces of one sample, which threads share out. A piece goes through tiles
// of kTile tokens whose rows of x and grad_out are read (and converted to float32) once, then stay
// in cache for three skinny SIMD kernels: row_dots (u = A_p x), row_combine (y += B_p u) and
// rank_update (dA_p += h x^T). The gradients of A_p, B_p are kept per piece and reduced over pieces
// with the gate at the end. Nothing per token of size r * d is ever formed, and results do not
// depend on how threads pick up pieces. The forward returns u (M, r) for the backward, which then
// runs four skinny passes a tile instead of five.
// The output mix (rank K r) is compute-bound, and goes through the platform's GEMM instead (see
// "Output mix" below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu_utils.h"

namespace reclora {
namespace {

// Tokens per tile: the tile's rows of x and grad_out (2 x 32 x d floats) stay in L2.
constexpr int64_t kTile = 32;

// ---------------------------------------------------------------------------------------------
// Skinny kernels on float32 rows given by pointers (gathered or converted tokens cost nothing).
// Block sizes keep the accumulators, plus the operands of one step, in registers: 16 accumulators
// with AVX-512's 32 registers; 12 with the 16 of AVX2 and SSE, in blocks whose step loads 7
// vectors for 12 FMAs. On a Zen 4, AVX2 blocks of 8 accumulators (6 loads to 8 FMAs) reached 31
// FMA lanes a ns in a standalone loop, 3 x 4 and 4 x 3 blocks 57, the core's peak (2026-12-04).

template <int W>
constexpr bool kWide = W >= 16;

// Floats of a kernel's reused operand that should stay in L2 (most x86 cores have >= 1 MiB).
constexpr int64_t kCacheFloats = 128 * 1024;

// out[t * ldo + j] (+)= alpha * <rows[t], q_j> for t < n, j < R; q_j = q + j * ldq, length len.
template <int W>
struct RowDots {
  using S = cpu::Simd<W>;
  using vec = typename S::vec;

  template <int NT, int NJ, bool kTail>
  static RECLORA_INLINE void step(
      vec (&acc)[NT][NJ], const float* const* rows, const float* q, int64_t ldq, int64_t i, int64_t count) {
    vec qv[NJ];
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) qv[j] = S::template load_n<kTail>(q + j * ldq + i, count);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const vec xv = S::template load_n<kTail>(rows[t] + i, count);
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) acc[t][j] += xv * qv[j];
    }
  }

  template <int NT, int NJ>
  static RECLORA_INLINE void block(
      const float* const* rows, const float* q, int64_t ldq, int64_t begin, int64_t end, float alpha, float* out,
      int64_t ldo, bool accumulate) {
    vec acc[NT][NJ] = {};
    int64_t i = begin;
    for (; i + W <= end; i += W) step<NT, NJ, false>(acc, rows, q, ldq, i, 0);
    if (i < end) step<NT, NJ, true>(acc, rows, q, ldq, i, end - i);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) {
        const float value = alpha * S::hsum(acc[t][j]);
        float& o = out[t * ldo + j];
        o = accumulate ? o + value : value;
      }
    }
  }

  RECLORA_INLINE void operator()(
      const float* const* rows, int64_t n, const float* q, int64_t ldq, int64_t R, int64_t len, float alpha,
      float* out, int64_t ldo, bool accumulate) const {
    // When all R rows of q would not stay in L2, go through the length in chunks that do.
    const int64_t chunks = std::max<int64_t>(1, R * len / kCacheFloats);
    const int64_t chunk = std::max<int64_t>(W, ceil_div(ceil_div(len, chunks), W) * W);
    int64_t begin = 0;
    do {
      const int64_t end = std::min(len, begin + chunk);
      const bool add = accumulate || begin > 0;
      // Four q rows a block, and four rows (three with 16 registers): each vector of q, read from
      // L2 when R is large (the gate's gradient), serves them all.
      cpu::for_blocks<kWide<W> ? 4 : 3>(0, n, [&](auto nt, int64_t t) RECLORA_INLINE_LAMBDA {
        cpu::for_blocks<4>(0, R, [&](auto nj, int64_t j) RECLORA_INLINE_LAMBDA {
          block<decltype(nt)::value, decltype(nj)::value>(
              rows + t, q + j * ldq, ldq, begin, end, alpha, out + t * ldo + j, ldo, add);
        });
      });
      begin = end;
    } while (begin < len);
  }
};

// outs[t][:len] (+)= sum_j c[t * ldc + j] * q_j for t < n, j < R; q_j = q + j * ldq.
template <int W>
struct RowCombine {
  using S = cpu::Simd<W>;
  using vec = typename S::vec;

  template <int NT, int NV, bool kTail>
  static RECLORA_INLINE void block(
      float* const* outs, const float* c, int64_t ldc, const float* q, int64_t ldq, int64_t R, int64_t o,
      int64_t count, bool accumulate) {
    vec acc[NT][NV] = {};
    for (int64_t j = 0; j < R; ++j) {
      vec qv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) qv[v] = S::template load_n<kTail>(q + j * ldq + o + v * W, count);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const vec cv = S::broadcast(c + t * ldc + j);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[t][v] += cv * qv[v];
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        float* p = outs[t] + o + v * W;
        if (accumulate) acc[t][v] += S::template load_n<kTail>(p, count);
        S::template store_n<kTail>(p, acc[t][v], count);
      }
    }
  }

  RECLORA_INLINE void operator()(
      float* const* outs, int64_t n, const float* c, int64_t ldc, const float* q, int64_t ldq, int64_t R,
      int64_t len, bool accumulate) const {
    // Columns outer: the R x (a few vectors) block of q stays in L1 across all rows.
    const int64_t full = len / W;
    cpu::for_blocks<kWide<W> ? 4 : 3>(0, full, [&](auto nv, int64_t v) RECLORA_INLINE_LAMBDA {
      cpu::for_blocks<4>(0, n, [&](auto nt, int64_t t) RECLORA_INLINE_LAMBDA {
        block<decltype(nt)::value, decltype(nv)::value, false>(
            outs + t, c + t * ldc, ldc, q, ldq, R, v * W, 0, accumulate);
      });
    });
    if (full * W < len) {
      cpu::for_blocks<4>(0, n, [&](auto nt, int64_t t) RECLORA_INLINE_LAMBDA {
        block<decltype(nt)::value, 1, true>(
            outs + t, c + t * ldc, ldc, q, ldq, R, full * W, len - full * W, accumulate);
      });
    }
  }
};

// out[j * ldo : +len] (+)= sum_t c[t * c_ts + j * c_js] * rows[t][:len] for j < R, t < n.
template <int W>
struct RankUpdate {
  using S = cpu::Simd<W>;
  using vec = typename S::vec;

  template <int NJ, int NV, bool kTail>
  static RECLORA_INLINE void block(
      float* out, int64_t ldo, const float* c, int64_t c_ts, int64_t c_js, const float* const* rows, int64_t n,
      int64_t o, int64_t count, bool accumulate) {
    vec acc[NJ][NV] = {};
    for (int64_t t = 0; t < n; ++t) {
      vec pv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) pv[v] = S::template load_n<kTail>(rows[t] + o + v * W, count);
      const float* ct = c + t * c_ts;
#pragma GCC unroll 8
      for (int j = 0; j < NJ; ++j) {
        const vec cv = S::broadcast(ct + j * c_js);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[j][v] += cv * pv[v];
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        float* p = out + j * ldo + o + v * W;
        if (accumulate) acc[j][v] += S::template load_n<kTail>(p, count);
        S::template store_n<kTail>(p, acc[j][v], count);
      }
    }
  }

  RECLORA_INLINE void operator()(
      float* out, int64_t ldo, int64_t R, int64_t len, const float* c, int64_t c_ts, int64_t c_js,
      const float* const* rows, int64_t n, bool accumulate) const {
    // Columns outer: the n x (two or three vectors) block of the rows stays in L1 across all of R.
    const int64_t full = len / W;
    cpu::for_blocks<kWide<W> ? 2 : 3>(0, full, [&](auto nv, int64_t v) RECLORA_INLINE_LAMBDA {
      cpu::for_blocks<kWide<W> ? 8 : 4>(0, R, [&](auto nj, int64_t j) RECLORA_INLINE_LAMBDA {
        block<decltype(nj)::value, decltype(nv)::value, false>(
            out + j * ldo, ldo, c + j * c_js, c_ts, c_js, rows, n, v * W, 0, accumulate);
      });
    });
    if (full * W < len) {
      cpu::for_blocks<kWide<W> ? 8 : 4>(0, R, [&](auto nj, int64_t j) RECLORA_INLINE_LAMBDA {
        block<decltype(nj)::value, 1, true>(
            out + j * ldo, ldo, c + j * c_js, c_ts, c_js, rows, n, full * W, len - full * W, accumulate);
      });
    }
  }
};

void row_dots(
    const float* const* rows, int64_t n, const float* q, int64_t ldq, int64_t R, int64_t len, float alpha,
    float* out, int64_t ldo, bool accumulate) {
  cpu::run_simd<RowDots>(rows, n, q, ldq, R, len, alpha, out, ldo, accumulate);
}

void row_combine(
    float* const* outs, int64_t n, const float* c, int64_t ldc, const float* q, int64_t ldq, int64_t R, int64_t len,
    bool accumulate) {
  cpu::run_simd<RowCombine>(outs, n, c, ldc, q, ldq, R, len, accumulate);
}

void rank_update(
    float* out, int64_t ldo, int64_t R, int64_t len, const float* c, int64_t c_ts, int64_t c_js,
    const float* const* rows, int64_t n, bool accumulate) {
  cpu::run_simd<RankUpdate>(out, ldo, R, len, c, c_ts, c_js, rows, n, accumulate);
}

// Column range of a mix: row t of the source is base + t * ld, row j of the result out + j * ldo.
struct MixPart {
  const float* base;
  int64_t ld;
  float* out;
  int64_t ldo;
  int64_t len;
};

// For each part: out_j[:len] = sum_t c[t * c_ts + j * c_js] * base_t[:len] for j < R, t < T. Mixes
// meta-LoRAs by the gate, and per-piece gradients back into meta-LoRAs; threads split the columns
// of all parts at once.
void mix_rows(const float* c, int64_t c_ts, int64_t c_js, int64_t T, int64_t R, std::initializer_list<MixPart> parts) {
  constexpr int64_t kCols = 64;
  std::vector<int64_t> first_block = {0};
  for (const MixPart& part : parts) first_block.push_back(first_block.back() + ceil_div(part.len, kCols));
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, T * R * kCols));
  at::parallel_for(0, first_block.back(), grain, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(T);
    for (size_t i = 0; i < parts.size(); ++i) {
      const MixPart& part = parts.begin()[i];
      const int64_t block = std::max(begin, first_block[i]), block_end = std::min(end, first_block[i + 1]);
      if (block >= block_end) continue;
      const int64_t col = (block - first_block[i]) * kCols;
      const int64_t cols = std::min(part.len, (block_end - first_block[i]) * kCols) - col;
      for (int64_t t = 0; t < T; ++t) rows[t] = part.base + t * part.ld + col;
      rank_update(part.out + col, part.ldo, R, cols, c, c_ts, c_js, rows.data(), T, false);
    }
  });
}

// out[j * rows + i] = in[i * cols + j]: one (rows, cols) matrix transposed. lora_b's factors are
// (d_out, r) and r is small: with that side a compile-time N <= W, a block of W rows (N vectors) is
// transposed in registers by log2 N rounds of two-source permutes. Each round of unzip moves the
// lowest bit of an element's index to the top, so log2 N rounds turn (W, N) row-major into column
// major; zip undoes a round. The scalar loops this replaces were a third of a small call's time
// (perf, cpu-clock sampling, on an Ice Lake). Other sizes take the blocked scalar loop.
template <int W>
struct Transpose {
  using S = cpu::Simd<W>;
  using vec = typename S::vec;

  // log2 N rounds over N vectors: unzip (pairs 2k, 2k + 1 into k, N/2 + k), or zip, its inverse.
  template <int N, bool kUnzip>
  static RECLORA_INLINE void permute_rounds(vec (&v)[N]) {
#pragma GCC unroll 4
    for (int round = 1; round < N; round *= 2) {
      vec next[N];
#pragma GCC unroll 8
      for (int k = 0; k < N / 2; ++k) {
        if constexpr (kUnzip) {
          next[k] = S::unzip_even(v[2 * k], v[2 * k + 1]);
          next[N / 2 + k] = S::unzip_odd(v[2 * k], v[2 * k + 1]);
        } else {
          next[2 * k] = S::zip_low(v[k], v[N / 2 + k]);
          next[2 * k + 1] = S::zip_high(v[k], v[N / 2 + k]);
        }
      }
      std::copy_n(next, N, v);
    }
  }

  // (rows, N) -> (N, rows)
  template <int N>
  static RECLORA_INLINE void few_cols(const float* in, float* out, int64_t rows) {
    int64_t i0 = 0;
    if constexpr (cpu::kHasShuffle && N > 1 && N <= W) {
      for (; i0 + W <= rows; i0 += W) {
        vec v[N];
#pragma GCC unroll 16
        for (int m = 0; m < N; ++m) v[m] = S::load(in + i0 * N + m * W);
        permute_rounds<N, true>(v);
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) S::store(out + j * rows + i0, v[j]);
      }
    }
    for (int j = 0; j < N; ++j) {
      for (int64_t i = i0; i < rows; ++i) out[j * rows + i] = in[i * N + j];
    }
  }

  // (N, cols) -> (cols, N)
  template <int N>
  static RECLORA_INLINE void few_rows(const float* in, float* out, int64_t cols) {
    int64_t j0 = 0;
    if constexpr (cpu::kHasShuffle && N > 1 && N <= W) {
      for (; j0 + W <= cols; j0 += W) {
        vec v[N];
#pragma GCC unroll 16
        for (int m = 0; m < N; ++m) v[m] = S::load(in + m * cols + j0);
        permute_rounds<N, false>(v);
#pragma GCC unroll 16
        for (int m = 0; m < N; ++m) S::store(out + j0 * N + m * W, v[m]);
      }
    }
    for (int64_t j = j0; j < cols; ++j) {
      for (int i = 0; i < N; ++i) out[j * N + i] = in[i * cols + j];
    }
  }

  static void blocked(const float* in, float* out, int64_t rows, int64_t cols) {
    // Blocks of 16 rows: the reads stay in a few cache lines while the writes run contiguously.
    for (int64_t i0 = 0; i0 < rows; i0 += 16) {
      const int64_t i1 = std::min(rows, i0 + 16);
      for (int64_t j = 0; j < cols; ++j) {
        for (int64_t i = i0; i < i1; ++i) out[j * rows + i] = in[i * cols + j];
      }
    }
  }

  template <int N = 16>
  static RECLORA_INLINE bool small_side(const float* in, float* out, int64_t rows, int64_t cols) {
    if (cols == N) return few_cols<N>(in, out, rows), true;
    if (rows == N) return few_rows<N>(in, out, cols), true;
    if constexpr (N > 1) return small_side<N / 2>(in, out, rows, cols);
    return false;
  }

  // Inlined into run_simd's ISA-specific caller, like every kernel: compiled on its own, it would
  // get the baseline ISA (and the permutes, scalar code).
  RECLORA_INLINE void operator()(const float* in, float* out, int64_t rows, int64_t cols) const {
    if (!small_side(in, out, rows, cols)) blocked(in, out, rows, cols);
  }
};

// out[k][j][i] = in[k][i][j]: (K, rows, cols) -> (K, cols, rows).
void transpose_inner(const float* in, float* out, int64_t K, int64_t rows, int64_t cols) {
  const int64_t size = rows * cols;
  at::parallel_for(0, K, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, size)), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) cpu::run_simd<Transpose>(in + k * size, out + k * size, rows, cols);
  });
}

// ---------------------------------------------------------------------------------------------
// Token grouping

struct Piece {
  int64_t sample, begin, end;  // positions [begin, end) of the grouped token order
};

struct Grouping {
  std::vector<int64_t> order;  // row of x at each grouped position; empty when already grouped
  std::vector<Piece> pieces;
  int64_t row(int64_t position) const {
    return order.empty() ? position : order[position];
  }
};

void check_sample_ids(const at::Tensor& sample_index, int64_t B) {
  const int64_t* ids = sample_index.data_ptr<int64_t>();
  for (int64_t m = 0; m < sample_index.size(0); ++m) {
    TORCH_CHECK(ids[m] >= 0 && ids[m] < B, "gated_lora (cpu): sample_index[", m, "] = ", ids[m],
                " is not a row of gate (B = ", B, ")");
  }
}

// piece: the most tokens per piece.
Grouping group_tokens(const c10::optional<at::Tensor>& sample_index, int64_t M, int64_t B, int64_t piece) {
  Grouping grouping;
  std::vector<int64_t> offsets(B + 1, 0);
  if (sample_index.has_value()) {
    check_sample_ids(*sample_index, B);
    const int64_t* ids = sample_index->data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) ++offsets[ids[m] + 1];
    for (int64_t b = 0; b < B; ++b) offsets[b + 1] += offsets[b];
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    grouping.order.resize(M);
    for (int64_t m = 0; m < M; ++m) grouping.order[next[ids[m]]++] = m;
  } else {
    for (int64_t b = 0; b < B; ++b) offsets[b + 1] = offsets[b] + M / B;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t begin = offsets[b]; begin < offsets[b + 1]; begin += piece) {
      grouping.pieces.push_back({b, begin, std::min(begin + piece, offsets[b + 1])});
    }
  }
  return grouping;
}

// Runs fn(piece, worker) for every piece, worker < workers: workers take pieces from a shared
// counter, which balances uneven pieces. What a piece computes does not depend on its worker.
template <class F>
void for_each_piece(const Grouping& grouping, int64_t workers, const F& fn) {
  const int64_t count = grouping.pieces.size();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t) {
    for (int64_t p; (p = next.fetch_add(1)) < count;) fn(p, begin);
  });
}

// ---------------------------------------------------------------------------------------------
// Tiles of token rows in float32

// An (M, d) operand read through its strides: a gradient broadcast over tokens has row stride 0.
template <typename scalar_t>
struct StridedRows {
  const scalar_t* base;
  int64_t row_stride, col_stride;
};

template <typename scalar_t>
StridedRows<scalar_t> strided_rows(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// Float rows of a tile of an (M, d) operand: the rows themselves for float32 with unit column
// stride, converted or gathered copies in buf otherwise.
template <typename scalar_t>
void read_rows(const StridedRows<scalar_t>& src, int64_t d, const int64_t* rows, int64_t n, float* buf,
               const float** out) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  if (src.col_stride == 1) {
    if constexpr (kFloat) {
      for (int64_t t = 0; t < n; ++t) out[t] = src.base + rows[t] * src.row_stride;
      return;
    } else {
      cpu::run_simd<cpu::GatherRows>(src.base, src.row_stride, rows, n, d, buf);
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t* row = src.base + rows[t] * src.row_stride;
      for (int64_t i = 0; i < d; ++i) buf[t * d + i] = static_cast<float>(row[i * src.col_stride]);
    }
  }
  for (int64_t t = 0; t < n; ++t) out[t] = buf + t * d;
}

// Where kernels write a tile of an (M, d) output: in place for float32, else buf for write_rows.
template <typename scalar_t>
void output_rows(scalar_t* base, int64_t d, const int64_t* rows, int64_t n, float* buf, float** out) {
  for (int64_t t = 0; t < n; ++t) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      out[t] = base + rows[t] * d;
    } else {
      out[t] = buf + t * d;
    }
  }
}

template <typename scalar_t>
void write_rows(scalar_t* base, int64_t d, const int64_t* rows, int64_t n, const float* buf, bool accumulate) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    cpu::run_simd<cpu::ScatterRows>(buf, base, rows, n, d, accumulate);
  }
}

// ---------------------------------------------------------------------------------------------
// Problem setup shared by forward and backward

struct Problem {
  int64_t M, B, K, r, d_in, d_out;
  float scaling;
  const float* gate;
  at::Tensor a;      // float (K, r, d_in): A_k
  at::Tensor bt;     // float (K, r, d_out): B_k^T
  at::Tensor mixed;  // float (B, r (d_in + d_out)), [A_p | B_p^T] of each sample
  Grouping grouping;
  int64_t workers;

  int64_t mixed_ld() const {
    return r * (d_in + d_out);
  }
  const float* a_p(int64_t sample) const {
    return mixed.data_ptr<float>() + sample * mixed_ld();
  }
  const float* bt_p(int64_t sample) const {
    return a_p(sample) + r * d_in;
  }
};

void check_inputs(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& gate, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const c10::optional<at::Tensor>& sample_index) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "gated_lora (cpu): x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, "gated_lora (cpu): x must be (M, d_in), got ", x.sizes());
  TORCH_CHECK(gate.dim() == 2 && gate.scalar_type() == at::kFloat && gate.size(1) >= 1,
              "gated_lora (cpu): gate must be float32 (B, K) with K >= 1, got ", gate.scalar_type(), " ",
              gate.sizes());
  const int64_t K = gate.size(1);
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(0) == K && lora_a.size(1) >= 1 && lora_a.size(2) == x.size(1),
              "gated_lora (cpu): lora_a must be (K, r, d_in) = (", K, ", r, ", x.size(1), "), got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == K && lora_b.size(2) == lora_a.size(1),
              "gated_lora (cpu): lora_b must be (K, d_out, r) = (", K, ", d_out, ", lora_a.size(1), "), got ",
              lora_b.sizes());
  TORCH_CHECK(lora_a.scalar_type() == dtype && lora_b.scalar_type() == dtype,
              "gated_lora (cpu): lora_a and lora_b must have x's dtype ", dtype);
  std::vector<const at::Tensor*> tensors = {&x, &gate, &lora_a, &lora_b};
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == lora_b.size(1) && weight->size(1) == x.size(1),
                "gated_lora (cpu): weight must be (d_out, d_in) = (", lora_b.size(1), ", ", x.size(1), "), got ",
                weight->sizes());
    TORCH_CHECK(weight->scalar_type() == dtype, "gated_lora (cpu): weight must have x's dtype ", dtype);
    tensors.push_back(&*weight);
  }
  if (sample_index.has_value()) {
    TORCH_CHECK(sample_index->dim() == 1 && sample_index->size(0) == x.size(0) &&
                    sample_index->scalar_type() == at::kLong,
                "gated_lora (cpu): sample_index must be int64 (M,) with M = ", x.size(0), ", got ",
                sample_index->scalar_type(), " ", sample_index->sizes());
    tensors.push_back(&*sample_index);
  } else {
    const int64_t B = gate.size(0), M = x.size(0);
    TORCH_CHECK(B > 0 ? M % B == 0 : M == 0, "gated_lora (cpu): without sample_index the M = ", M,
                " tokens must split evenly over the B = ", B, " samples");
  }
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "gated_lora (cpu): all inputs must be contiguous CPU tensors");
  }
}

Problem make_problem(
    const at::Tensor& x, const at::Tensor& gate, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const c10::optional<at::Tensor>& sample_index, double scaling) {
  Problem pb;
  pb.M = x.size(0);
  pb.B = gate.size(0);
  pb.K = gate.size(1);
  pb.r = lora_a.size(1);
  pb.d_in = lora_a.size(2);
  pb.d_out = lora_b.size(1);
  pb.scaling = static_cast<float>(scaling);
  pb.gate = gate.data_ptr<float>();
  pb.a = lora_a.to(at::kFloat);
  pb.bt = at::empty({pb.K, pb.r, pb.d_out}, lora_b.options().dtype(at::kFloat));
  transpose_inner(lora_b.to(at::kFloat).data_ptr<float>(), pb.bt.data_ptr<float>(), pb.K, pb.d_out, pb.r);
  const int64_t threads = at::get_num_threads();
  // Pieces carry gradient accumulators: few, long ones (yet enough to balance the threads).
  const int64_t piece = std::max(kTile, ceil_div(ceil_div(pb.M, 4 * threads), kTile) * kTile);
  pb.grouping = group_tokens(sample_index, pb.M, pb.B, piece);
  pb.workers = std::min<int64_t>(threads, pb.grouping.pieces.size());
  // A_p and B_p^T of every sample: (B, r d) = gate (B, K) @ (K, r d).
  pb.mixed = at::empty({pb.B, pb.mixed_ld()}, pb.a.options());
  float* mixed = pb.mixed.data_ptr<float>();
  mix_rows(pb.gate, 1, pb.K, pb.K, pb.B,
           {{pb.a.data_ptr<float>(), pb.r * pb.d_in, mixed, pb.mixed_ld(), pb.r * pb.d_in},
            {pb.bt.data_ptr<float>(), pb.r * pb.d_out, mixed + pb.r * pb.d_in, pb.mixed_ld(), pb.r * pb.d_out}});
  return pb;
}

// Grouped positions [begin, begin + n) as rows of x.
void tile_rows(const Grouping& grouping, int64_t begin, int64_t n, int64_t* rows) {
  for (int64_t t = 0; t < n; ++t) rows[t] = grouping.row(begin + t);
}

// The base projection a @ b (+ bias) with BLAS. float16 goes through float32 BLAS: ATen's float16
// CPU GEMM accumulates in float32 as well but runs up to ~30x slower than that.
at::Tensor base_gemm(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias) {
  if (a.scalar_type() != at::kHalf) return bias.has_value() ? at::addmm(*bias, a, b) : at::mm(a, b);
  const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
  const at::Tensor out = bias.has_value() ? at::addmm(bias->to(at::kFloat), a32, b32) : at::mm(a32, b32);
  return out.to(at::kHalf);
}

// Whether the weight mix's pieces write the LoRA term (and the bias) first and the base GEMM then
// adds onto it (beta 1): the GEMM reads its output tiles anyway, which saves the pieces a pass over
// the output. float16 keeps the base first: its GEMM runs on float32 copies (base_gemm).
bool base_after_delta(const at::Tensor& x, const c10::optional<at::Tensor>& weight, bool output_mix) {
  return weight.has_value() && !output_mix && x.scalar_type() != at::kHalf;
}

// ---------------------------------------------------------------------------------------------
// Output mix: the composition, in float32 on the platform's GEMM
//
// Its rank is K r (128 at the SmolLM2 shape): about 57 flops a byte, compute-bound, where fusing
// saves little traffic and the vendor's GEMM, tuned for each CPU, wins. The tile pipeline's skinny
// kernels, tuned on one AMD core, ran this backward 1.4x slower than these GEMMs on an Ice Lake Xeon
// (benchmarks/README.md). The forward returns U = x A_cat^T (M, K r), ungated, which the backward
// reuses instead of recomputing it (one GEMM of its five).

// s g[b(t), k] for each token t, shaped (M, K, 1) to scale the K blocks of a token's U.
at::Tensor token_gate(const at::Tensor& gate, const c10::optional<at::Tensor>& sample_index, int64_t M,
                      double scaling) {
  at::Tensor per_token;
  if (sample_index.has_value()) {
    check_sample_ids(*sample_index, gate.size(0));
    per_token = gate.index_select(0, *sample_index);
  } else {
    per_token = gate.repeat_interleave(M / gate.size(0), 0);
  }
  return (per_token * scaling).unsqueeze(-1);
}

// The factors in float32, each right-hand operand contiguous in the layout its GEMM reads (x @
// A_cat^T ran 1.2x faster with A_cat^T stored than as a transposed view). B_cat is laid out for the
// one pass that reads it: B_cat^T in the forward, B_cat in the backward.
struct OutputMix {
  int64_t M, K, r;
  at::Tensor a, at;  // A_cat (K r, d_in) and A_cat^T (d_in, K r)
  at::Tensor b32;    // float (K, d_out, r): B_k
  at::Tensor scale;  // (M, K, 1) from token_gate

  OutputMix(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& lora_a, const at::Tensor& lora_b,
            const c10::optional<at::Tensor>& sample_index, double scaling)
      : M(x.size(0)), K(gate.size(1)), r(lora_a.size(1)) {
    a = lora_a.to(at::kFloat).view({K * r, -1});
    at = a.t().contiguous();
    b32 = lora_b.to(at::kFloat);
    scale = token_gate(gate, sample_index, M, scaling);
  }
  at::Tensor b_cat() const {  // (d_out, K r)
    return b32.permute({1, 0, 2}).reshape({-1, K * r});
  }
  at::Tensor b_cat_t() const {  // (K r, d_out)
    return b32.transpose(1, 2).reshape({K * r, -1});
  }
  // t's rank-K r activations with block k scaled by s g[b(t), k].
  at::Tensor gated(const at::Tensor& u) const {
    return (u.view({M, K, r}) * scale).view({M, K * r});
  }
  void gate_(at::Tensor& u) const {
    u.view({M, K, r}).mul_(scale);
  }
};

// y (+)= s sum_k g_k B_k A_k x. y holds the base projection when accumulate. Returns U = x A_cat^T.
at::Tensor output_mix_forward(const OutputMix& mix, const at::Tensor& x, at::Tensor& y, bool accumulate) {
  const at::Tensor u = at::mm(x.to(at::kFloat), mix.at);
  const at::Tensor v = mix.gated(u);
  const at::Tensor bt = mix.b_cat_t();
  if (y.scalar_type() == at::kFloat) {
    if (accumulate) {
      y.addmm_(v, bt);
    } else {
      at::mm_out(y, v, bt);
    }
  } else {
    const at::Tensor delta = at::mm(v, bt);  // rounded once, onto the base where there is one
    accumulate ? y.add_(delta) : y.copy_(delta);
  }
  return u;
}

// Gradients of x (added to grad_x's base-projection gradient when accumulate), of the gate and of
// A_k, B_k (float). u: the forward's U = x A_cat^T.
std::tuple<at::Tensor, at::Tensor, at::Tensor> output_mix_backward(
    const OutputMix& mix, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& u, int64_t B,
    const c10::optional<at::Tensor>& sample_index, double scaling, at::Tensor& grad_x, bool accumulate) {
  const int64_t M = mix.M, K = mix.K, r = mix.r;
  const at::Tensor x32 = x.to(at::kFloat), g32 = grad_out.to(at::kFloat);
  at::Tensor h = at::mm(g32, mix.b_cat());  // B_cat^T G
  // dgate[b, k] = s sum over b's tokens of <A_k x, B_k^T G>.
  const at::Tensor token_dgate = (u * h).view({M, K, r}).sum(-1).mul_(scaling);
  at::Tensor grad_gate = sample_index.has_value()
                             ? at::zeros({B, K}, token_dgate.options()).index_add_(0, *sample_index, token_dgate)
                             : token_dgate.view({B, M / B, K}).sum(1);
  mix.gate_(h);
  if (grad_x.scalar_type() == at::kFloat && accumulate) {
    grad_x.addmm_(h, mix.a);
  } else {
    const at::Tensor dx = at::mm(h, mix.a);
    accumulate ? grad_x.add_(dx) : grad_x.copy_(dx);
  }
  at::Tensor grad_a = at::mm(h.t(), x32).view({K, r, -1});
  at::Tensor grad_b = at::mm(mix.gated(u).t(), g32).view({K, r, -1}).transpose(1, 2);  // (K, d_out, r)
  return {grad_gate, grad_a, grad_b};
}

// ---------------------------------------------------------------------------------------------
// Forward

// u rows (r floats each) between a tile's scratch and the op's saved u (M, r), by token row.
void save_u(const float* tile, const int64_t* rows, int64_t n, int64_t r, float* saved) {
  for (int64_t t = 0; t < n; ++t) std::copy_n(tile + t * r, r, saved + rows[t] * r);
}
void load_u(const float* saved, const int64_t* rows, int64_t n, int64_t r, float* tile) {
  for (int64_t t = 0; t < n; ++t) std::copy_n(saved + rows[t] * r, r, tile + t * r);
}

// y (+)= B_p A_p x s (+ bias, when given), and u = s A_p x into saved_u (M, r).
template <typename scalar_t>
void forward_pieces(const Problem& pb, const StridedRows<scalar_t>& x, scalar_t* y, bool accumulate, float* saved_u,
                    const float* bias = nullptr) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t stride = kTile * (pb.r + pb.d_in + pb.d_out);
  std::unique_ptr<float[]> scratch(new float[pb.workers * stride]);
  for_each_piece(pb.grouping, pb.workers, [&](int64_t p, int64_t worker) {
    const Piece& piece = pb.grouping.pieces[p];
    float* u = scratch.get() + worker * stride;
    float* x_buf = u + kTile * pb.r;
    float* y_buf = x_buf + kTile * pb.d_in;
    const float* a_p = pb.a_p(piece.sample);
    const float* bt_p = pb.bt_p(piece.sample);
    int64_t rows[kTile];
    const float* x_rows[kTile];
    float* y_rows[kTile];
    for (int64_t begin = piece.begin; begin < piece.end; begin += kTile) {
      const int64_t n = std::min(kTile, piece.end - begin);
      tile_rows(pb.grouping, begin, n, rows);
      read_rows(x, pb.d_in, rows, n, x_buf, x_rows);
      row_dots(x_rows, n, a_p, pb.d_in, pb.r, pb.d_in, pb.scaling, u, pb.r, false);
      save_u(u, rows, n, pb.r, saved_u);
      output_rows(y, pb.d_out, rows, n, y_buf, y_rows);
      row_combine(y_rows, n, u, pb.r, bt_p, pb.d_out, pb.r, pb.d_out, kFloat && accumulate);
      if (bias != nullptr) {
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t o = 0; o < pb.d_out; ++o) y_rows[t][o] += bias[o];
        }
      }
      write_rows(y, pb.d_out, rows, n, y_buf, accumulate);
    }
  });
}

// The activations the backward reuses: float32 (M, r) for the weight mix, (M, K r) for the output mix.
int64_t saved_width(const at::Tensor& lora_a, bool output_mix) {
  return output_mix ? lora_a.size(0) * lora_a.size(1) : lora_a.size(1);
}

std::tuple<at::Tensor, at::Tensor> gated_lora_forward_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& gate, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const c10::optional<at::Tensor>& sample_index, double scaling, bool output_mix) {
  check_inputs(x, weight, gate, lora_a, lora_b, sample_index);
  const int64_t d_out = lora_b.size(1);
  at::Tensor y;
  const bool delta_first = base_after_delta(x, weight, output_mix);
  const bool base_first = weight.has_value() && !delta_first;  // y holds x W^T + bias before the pieces
  if (weight.has_value()) {
    TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == d_out &&
                                      bias->scalar_type() == x.scalar_type() && bias->device().is_cpu()),
                "gated_lora (cpu): bias must be (d_out,) = (", d_out, ",) with x's dtype, got ", bias->sizes());
    y = base_first ? base_gemm(x, weight->t(), bias) : at::empty({x.size(0), d_out}, x.options());
  } else {
    TORCH_CHECK(!bias.has_value(), "gated_lora (cpu): bias needs weight");
    y = at::empty({x.size(0), d_out}, x.options());
  }
  if (x.size(0) == 0) return {y, at::empty({0, saved_width(lora_a, output_mix)}, gate.options())};
  if (output_mix) {
    at::Tensor u = output_mix_forward(OutputMix(x, gate, lora_a, lora_b, sample_index, scaling), x, y,
                                      weight.has_value());
    return {y, u};
  }
  const Problem pb = make_problem(x, gate, lora_a, lora_b, sample_index, scaling);
  at::Tensor u = at::empty({pb.M, pb.r}, gate.options());
  const at::Tensor bias32 = delta_first && bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  RECLORA_DISPATCH(x.scalar_type(), "gated_lora_forward_cpu", [&] {
    forward_pieces<scalar_t>(pb, strided_rows<scalar_t>(x), y.data_ptr<scalar_t>(), base_first, u.data_ptr<float>(),
                             bias32.defined() ? bias32.data_ptr<float>() : nullptr);
  });
  if (delta_first) y.addmm_(x, weight->t());
  return {y, u};
}

// ---------------------------------------------------------------------------------------------
// Backward

// Gradient accumulators [dA_p | dB_p^T] of each piece's sample, float (pieces, r (d_in + d_out)).
struct Accumulators {
  at::Tensor data;
  std::vector<char> written;
};

template <typename scalar_t>
void backward_pieces(
    const Problem& pb, const StridedRows<scalar_t>& grad_out, const StridedRows<scalar_t>& x, const float* saved_u,
    scalar_t* grad_x, bool accumulate_x, Accumulators& acc) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t r = pb.r, d_in = pb.d_in, d_out = pb.d_out;
  const int64_t stride = kTile * (2 * r + 2 * d_in + d_out);
  std::unique_ptr<float[]> scratch(new float[pb.workers * stride]);
  const int64_t acc_ld = r * (d_in + d_out);
  for_each_piece(pb.grouping, pb.workers, [&](int64_t p, int64_t worker) {
    const Piece& piece = pb.grouping.pieces[p];
    float* u = scratch.get() + worker * stride;
    float* h = u + kTile * r;
    float* x_buf = h + kTile * r;
    float* g_buf = x_buf + kTile * d_in;
    float* dx_buf = g_buf + kTile * d_out;
    const float* a_p = pb.a_p(piece.sample);
    const float* bt_p = pb.bt_p(piece.sample);
    float* acc_a = acc.data.data_ptr<float>() + p * acc_ld;
    float* acc_bt = acc_a + r * d_in;
    int64_t rows[kTile];
    const float* x_rows[kTile];
    const float* g_rows[kTile];
    float* dx_rows[kTile];
    for (int64_t begin = piece.begin; begin < piece.end; begin += kTile) {
      const int64_t n = std::min(kTile, piece.end - begin);
      tile_rows(pb.grouping, begin, n, rows);
      read_rows(x, d_in, rows, n, x_buf, x_rows);
      read_rows(grad_out, d_out, rows, n, g_buf, g_rows);
      // u = s A_p x, from the forward; h = s B_p^T G.
      load_u(saved_u, rows, n, r, u);
      row_dots(g_rows, n, bt_p, d_out, r, d_out, pb.scaling, h, r, false);
      output_rows(grad_x, d_in, rows, n, dx_buf, dx_rows);
      row_combine(dx_rows, n, h, r, a_p, d_in, r, d_in, kFloat && accumulate_x);
      write_rows(grad_x, d_in, rows, n, dx_buf, accumulate_x);
      const bool first = !acc.written[p];
      rank_update(acc_a, d_in, r, d_in, h, r, 1, x_rows, n, !first);
      rank_update(acc_bt, d_out, r, d_out, u, r, 1, g_rows, n, !first);
      acc.written[p] = 1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_lora_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& u, const c10::optional<at::Tensor>& weight,
    const at::Tensor& gate, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const c10::optional<at::Tensor>& sample_index, double scaling, bool output_mix) {
  check_inputs(x, weight, gate, lora_a, lora_b, sample_index);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == lora_b.size(1) &&
                  grad_out.scalar_type() == x.scalar_type() && grad_out.device().is_cpu(),
              "gated_lora (cpu): grad_out must be (M, d_out) = (", x.size(0), ", ", lora_b.size(1),
              ") with x's dtype, got ", grad_out.sizes());
  const int64_t width = saved_width(lora_a, output_mix);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == x.size(0) && u.size(1) == width && u.scalar_type() == at::kFloat &&
                  u.device().is_cpu() && u.is_contiguous(),
              "gated_lora (cpu): u must be the forward's contiguous float32 (M, ", width, ") = (", x.size(0), ", ",
              width, "), got ", u.scalar_type(), " ", u.sizes());
  const int64_t B = gate.size(0), K = gate.size(1);
  const bool delta_first = base_after_delta(x, weight, output_mix);
  const bool base_first = weight.has_value() && !delta_first;  // grad_x holds grad_out W before the pieces
  at::Tensor grad_x = base_first ? base_gemm(grad_out, *weight, c10::nullopt) : at::empty_like(x);
  at::Tensor grad_gate = at::zeros({B, K}, gate.options());
  if (x.size(0) == 0) return {grad_x, grad_gate, at::zeros_like(lora_a), at::zeros_like(lora_b)};

  const auto float_options = gate.options();
  if (output_mix) {
    auto [dgate, grad_a, grad_b] = output_mix_backward(OutputMix(x, gate, lora_a, lora_b, sample_index, scaling),
                                                       grad_out, x, u, B, sample_index, scaling, grad_x,
                                                       weight.has_value());
    return {grad_x, dgate, grad_a.to(lora_a.scalar_type()).contiguous(), grad_b.to(lora_b.scalar_type()).contiguous()};
  }

  const Problem pb = make_problem(x, gate, lora_a, lora_b, sample_index, scaling);
  const int64_t P = pb.grouping.pieces.size(), r = pb.r, d_in = pb.d_in, d_out = pb.d_out;
  // Any strides are read as they are; a broadcast row (y.sum()'s gradient) is made contiguous once.
  const at::Tensor grad_rows = grad_out.stride(0) == 0 && grad_out.stride(1) != 1
                                   ? grad_out.select(0, 0).contiguous().expand_as(grad_out)
                                   : grad_out;
  Accumulators acc;
  const int64_t ld = r * (d_in + d_out);
  acc.data = at::empty({P, ld}, float_options);
  acc.written.assign(P, 0);
  RECLORA_DISPATCH(x.scalar_type(), "gated_lora_backward_cpu", [&] {
    backward_pieces<scalar_t>(pb, strided_rows<scalar_t>(grad_rows), strided_rows<scalar_t>(x), u.data_ptr<float>(),
                              grad_x.data_ptr<scalar_t>(), base_first, acc);
  });
  if (delta_first) grad_x.addmm_(grad_out, *weight);

  // dA_k = sum_p g[b(p), k] dA_p, likewise dB_k; dgate[b(p), k] += <dA_p, A_k> + <dB_p, B_k>.
  std::vector<float> piece_gate(P * K);
  for (int64_t p = 0; p < P; ++p) {
    std::copy_n(pb.gate + pb.grouping.pieces[p].sample * K, K, piece_gate.begin() + p * K);
  }
  at::Tensor grad_a = at::empty({K * r * d_in}, float_options);
  at::Tensor grad_bt = at::empty({K * r * d_out}, float_options);
  const float* acc_base = acc.data.data_ptr<float>();
  mix_rows(piece_gate.data(), K, 1, P, K,
           {{acc_base, ld, grad_a.data_ptr<float>(), r * d_in, r * d_in},
            {acc_base + r * d_in, ld, grad_bt.data_ptr<float>(), r * d_out, r * d_out}});
  const float* a = pb.a.data_ptr<float>();
  const float* bt = pb.bt.data_ptr<float>();
  std::vector<float> dgate_pieces(P * K, 0.f);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * ld));
  at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
    std::vector<const float*> rows(end - begin);
    for (int64_t p = begin; p < end; ++p) rows[p - begin] = acc_base + p * ld;
    float* out = dgate_pieces.data() + begin * K;
    row_dots(rows.data(), end - begin, a, r * d_in, K, r * d_in, 1.f, out, K, false);
    for (auto& row : rows) row += r * d_in;
    row_dots(rows.data(), end - begin, bt, r * d_out, K, r * d_out, 1.f, out, K, true);
  });
  float* dgate = grad_gate.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t b = pb.grouping.pieces[p].sample;
    for (int64_t k = 0; k < K; ++k) dgate[b * K + k] += dgate_pieces[p * K + k];
  }
  at::Tensor grad_lora_a = grad_a.view({K, r, d_in}).to(lora_a.scalar_type());
  at::Tensor grad_lora_b = at::empty({K, d_out, r}, float_options);
  transpose_inner(grad_bt.data_ptr<float>(), grad_lora_b.data_ptr<float>(), K, r, d_out);
  return {grad_x, grad_gate, grad_lora_a, grad_lora_b.to(lora_b.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CPU, m) {
  m.impl("gated_lora_forward", &gated_lora_forward_cpu);
  m.impl("gated_lora_backward", &gated_lora_backward_cpu);
}

}  // namespace reclora
