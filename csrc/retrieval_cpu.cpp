// CPU kernels of the retrieval ops (schemas: registration.cpp; ground truth:
// reclora_kernels/retrieval_reference.py).
// Forward: rows of the batch run in parallel; each streams once over its history, gathering
// key rows (table rows through ids, prefetched ahead) in blocks of eight that are scored
// together, and keeps its top k in a thresholded buffer of sortable (score, position) keys.
// Backward: only the selected rows are read; each table gradient is written in one pass in
// row order, every row summed by one thread in a fixed order, so all results are the same
// for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
// One portable binary: the loader picks the AVX-512 or AVX2 build of the hot loops (ifunc).
// GCC terminates on exceptions leaving a cloned function: clones never throw (no checks,
// no allocation); their callers do both.
#define RECLORA_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RECLORA_ISA_CLONES
#endif

// ---- float32 math on float32 / float16 / bfloat16 rows --------------------------------------

// Eight float lanes (GCC/Clang vector extensions): one ymm register with AVX2 or AVX-512, two
// xmm otherwise. Wider generic vectors spill badly where the ISA lacks registers that wide.
constexpr int64_t kLanes = 8;
typedef float Floats __attribute__((vector_size(32)));
typedef float Floats4 __attribute__((vector_size(16)));
typedef uint32_t Bits __attribute__((vector_size(32)));
typedef uint16_t Bits16 __attribute__((vector_size(16)));
#if defined(__GNUC__) && !defined(__clang__)
// The helpers below are always inlined: no vector ever crosses a call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

C10_ALWAYS_INLINE Floats load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

C10_ALWAYS_INLINE Floats load(const c10::BFloat16* p) {
  Bits16 h;
  std::memcpy(&h, p, sizeof h);
  return (Floats)(__builtin_convertvector(h, Bits) << 16);
}

// IEEE half to float with integer and float ops only (the FP16 library's method), so that
// every ISA level vectorizes it.
C10_ALWAYS_INLINE Floats load(const c10::Half* p) {
  Bits16 h;
  std::memcpy(&h, p, sizeof h);
  const Bits w = __builtin_convertvector(h, Bits) << 16;
  const Bits sign = w & 0x80000000u;
  const Bits two_w = w + w;
  // Normal, infinite and NaN: shift the exponent field into place and rebias by a multiply.
  const Floats normal = (Floats)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: the magic-number subtraction leaves the exact value.
  const Floats subnormal = (Floats)((two_w >> 17) | (126u << 23)) - 0.5f;
  const Bits magnitude = two_w < (1u << 27) ? (Bits)subnormal : (Bits)normal;
  return (Floats)(sign | magnitude);
}

C10_ALWAYS_INLINE void store(float* p, Floats v) {
  std::memcpy(p, &v, sizeof v);
}

C10_ALWAYS_INLINE float reduce(Floats v) {
  Floats4 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  a += b;
  return (a[0] + a[2]) + (a[1] + a[3]);
}

template <typename T>
C10_ALWAYS_INLINE float dot(const float* x, const T* y, int64_t n) {
  Floats acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(x + i) * load(y + i);
  float total = reduce(acc);
  for (; i < n; ++i) total += x[i] * static_cast<float>(y[i]);
  return total;
}

// out[r] = <x, rows[r]>: independent accumulators keep the FMA pipes busy and share the
// loads of x; each result depends only on its own row.
constexpr int kBlock = 8;

// The r loops are unrolled so that the accumulators stay in registers.
template <typename T>
C10_ALWAYS_INLINE void dot_block(const float* x, const T* const* rows, int64_t n, float* out) {
  Floats acc[kBlock];
#pragma GCC unroll 8
  for (int r = 0; r < kBlock; ++r) acc[r] = Floats{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Floats xi = load(x + i);
#pragma GCC unroll 8
    for (int r = 0; r < kBlock; ++r) acc[r] += xi * load(rows[r] + i);
  }
#pragma GCC unroll 8
  for (int r = 0; r < kBlock; ++r) out[r] = reduce(acc[r]);
  for (; i < n; ++i) {
#pragma GCC unroll 8
    for (int r = 0; r < kBlock; ++r) out[r] += x[i] * static_cast<float>(rows[r][i]);
  }
}

// acc += c * y
template <typename T>
C10_ALWAYS_INLINE void axpy(float* acc, float c, const T* y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(acc + i, load(acc + i) + c * load(y + i));
  for (; i < n; ++i) acc[i] += c * static_cast<float>(y[i]);
}

template <typename T>
C10_ALWAYS_INLINE void to_float(float* out, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

template <typename T>
C10_ALWAYS_INLINE void write_scaled(T* out, const float* acc, float factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(factor * acc[i]);
}

// Rows far apart in a table miss every cache level; later lines of long rows are left to the
// hardware's stream prefetcher.
constexpr int64_t kPrefetchDistance = 32;
constexpr int64_t kPrefetchBytes = 512;

C10_ALWAYS_INLINE void prefetch(const void* row, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(row);
  for (uintptr_t line = first & ~uintptr_t{63}; line < first + bytes; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

// ---- top k ------------------------------------------------------------------------------

// Order-preserving bits of the score above the complemented position: a larger key is a
// higher score or, for equal scores, a smaller position; every key of a real score is > 0.
C10_ALWAYS_INLINE uint64_t rank_key(float score, int64_t position) {
  score += 0.0f;  // -0 becomes +0, so that equal scores tie on position
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof bits);
  if (score != score) bits = 0x7FC00000u;  // every NaN ranks first, as in torch.sort
  bits ^= static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;  // negative: all bits
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(position));
}

C10_ALWAYS_INLINE float key_score(uint64_t key) {
  uint32_t bits = static_cast<uint32_t>(key >> 32);
  bits ^= (bits >> 31) ? 0x80000000u : 0xFFFFFFFFu;
  float score;
  std::memcpy(&score, &bits, sizeof score);
  return score;
}

C10_ALWAYS_INLINE int64_t key_position(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key);
}

// Streaming top k: keys above the running threshold are buffered; a full buffer is cut back
// to its k best, which raises the threshold. Linear in the row length even for ascending
// scores; once the threshold settles almost every position costs one compare.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k), buffer_(k + std::max<int64_t>(k, 256)) {}

  void reset() {
    size_ = 0;
    threshold_ = 0;
  }

  // Branch-free append: acceptance is data-dependent and would mispredict.
  C10_ALWAYS_INLINE void push(uint64_t key) {
    buffer_[size_] = key;
    size_ += key > threshold_;
    if (size_ == static_cast<int64_t>(buffer_.size())) {
      keep_best();
      threshold_ = buffer_[k_ - 1];
    }
  }

  // Sorts the best min(k, pushed) keys first, best first; returns how many.
  int64_t finish() {
    keep_best();
    std::sort(buffer_.begin(), buffer_.begin() + size_, std::greater<uint64_t>());
    return size_;
  }

  const uint64_t* keys() const { return buffer_.data(); }

 private:
  void keep_best() {
    if (size_ <= k_) return;
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.begin() + size_, std::greater<uint64_t>());
    size_ = k_;
  }

  int64_t k_;
  std::vector<uint64_t> buffer_;
  int64_t size_ = 0;
  uint64_t threshold_ = 0;
};

// ---- problem description ------------------------------------------------------------------

// The history rows of the batch: rows of an (N, width) table named by ids (B, L), or a dense
// (B, L, width) block (ids null).
template <typename T>
struct Rows {
  const T* data;
  const int64_t* ids;
  int64_t count;  // N, or B * L when dense
  int64_t length;
  int64_t width;

  C10_ALWAYS_INLINE int64_t row(int64_t b, int64_t l) const {
    const int64_t position = b * length + l;
    return ids ? ids[position] : position;
  }
  C10_ALWAYS_INLINE const T* at(int64_t row) const { return data + row * width; }
};

template <typename T>
struct Selection {
  const T* query;
  Rows<T> keys;
  const int64_t* lengths;  // null: every row is L long
  const bool* mask;        // null: nothing masked
  int64_t row_limit;       // rows of the smallest table read through ids
  int64_t k;
  float scale;
  float* scores;   // (B, k)
  int64_t* index;  // (B, k)
};

// Scores rows[0, filled) (a partial block is padded with a repeated row) into the top k.
template <typename T>
C10_ALWAYS_INLINE void push_block(const float* query, const T** rows, const int64_t* positions, int filled,
                                  int64_t dim, float scale, TopK& top) {
  std::fill(rows + filled, rows + kBlock, rows[0]);
  float dots[kBlock];
  dot_block(query, rows, dim, dots);
  for (int r = 0; r < filled; ++r) top.push(rank_key(scale * dots[r], positions[r]));
}

// Returns -1, or the flat position b * L + l of an id that is not below s.row_limit (the
// rows [begin, end) are then incomplete).
template <typename T>
RECLORA_ISA_CLONES int64_t select_rows(const Selection<T>& s, int64_t begin, int64_t end, float* query, TopK& top) {
  const Rows<T>& keys = s.keys;
  const int64_t length = keys.length, dim = keys.width;
  const int64_t prefetch_bytes = std::min<int64_t>(dim * sizeof(T), kPrefetchBytes);
  for (int64_t b = begin; b < end; ++b) {
    to_float(query, s.query + b * dim, dim);
    const int64_t valid_end = s.lengths ? s.lengths[b] : length;
    const bool* mask = s.mask ? s.mask + b * length : nullptr;
    top.reset();
    const T* rows[kBlock];
    int64_t positions[kBlock];
    int filled = 0;
    for (int64_t l = 0; l < valid_end; ++l) {
      if (mask && !mask[l]) continue;
      const int64_t ahead = l + kPrefetchDistance;
      if (keys.ids && ahead < valid_end && (!mask || mask[ahead])) {
        prefetch(keys.at(keys.row(b, ahead)), prefetch_bytes);
      }
      const int64_t row = keys.row(b, l);
      if (row < 0 || row >= s.row_limit) return b * length + l;
      rows[filled] = keys.at(row);
      positions[filled] = l;
      if (++filled == kBlock) {
        push_block(query, rows, positions, filled, dim, s.scale, top);
        filled = 0;
      }
    }
    if (filled > 0) push_block(query, rows, positions, filled, dim, s.scale, top);
    const int64_t found = top.finish();
    float* scores = s.scores + b * s.k;
    int64_t* index = s.index + b * s.k;
    for (int64_t j = 0; j < found; ++j) {
      scores[j] = key_score(top.keys()[j]);
      index[j] = key_position(top.keys()[j]);
    }
    std::fill(scores + found, scores + s.k, -std::numeric_limits<float>::infinity());
    std::fill(index + found, index + s.k, int64_t{-1});
  }
  return -1;
}

template <typename T>
struct Pooling {
  Rows<T> values;
  const float* scores;    // (B, k), sorted: selected slots first
  const int64_t* index;   // (B, k)
  int64_t k;
  float* probs;  // (B, k)
  T* pooled;     // (B, d_v)
};

// Rows named by the selection were checked by select_rows.
template <typename T>
RECLORA_ISA_CLONES void pool_rows(const Pooling<T>& p, int64_t begin, int64_t end, float* acc) {
  const Rows<T>& values = p.values;
  const int64_t width = values.width;
  for (int64_t b = begin; b < end; ++b) {
    const float* scores = p.scores + b * p.k;
    const int64_t* index = p.index + b * p.k;
    float* probs = p.probs + b * p.k;
    const int64_t found = std::find(index, index + p.k, int64_t{-1}) - index;
    // Sorted scores: the first is the maximum. A double sum keeps sum(probs) within rounding
    // of 1, which the backward's p * (dp - <p, dp>) relies on when many dp are equal.
    double total = 0.0;
    for (int64_t j = 0; j < found; ++j) {
      probs[j] = std::exp(scores[j] - scores[0]);
      total += probs[j];
    }
    std::fill(acc, acc + width, 0.0f);
    for (int64_t j = 0; j < found; ++j) {
      probs[j] = static_cast<float>(probs[j] / total);
      axpy(acc, probs[j], values.at(values.row(b, index[j])), width);
    }
    std::fill(probs + found, probs + p.k, 0.0f);
    write_scaled(p.pooled + b * width, acc, 1.0f, width);
  }
}

// ---- backward ---------------------------------------------------------------------------------

struct Selected {
  int64_t row;   // table row, or b * L + l when dense
  int64_t slot;  // b * k + j
};

// Selected rows grouped by row, slots ascending within a group: one thread sums each row's
// contributions in slot order, so gradients do not depend on the thread count.
struct RowGroups {
  std::vector<Selected> entries;
  std::vector<int64_t> starts;  // group g: entries [starts[g], starts[g + 1]); one group per row

  int64_t size() const { return static_cast<int64_t>(starts.size()) - 1; }
  int64_t row(int64_t g) const { return entries[starts[g]].row; }
};

// Stable LSD radix sort on the row (rows below row_limit): slots, appended in ascending
// order, stay ascending within a row. One pass over the entries per 11 bits of row_limit.
void sort_by_row(std::vector<Selected>& entries, int64_t row_limit) {
  constexpr int kBits = 11;
  constexpr int64_t kDigits = int64_t{1} << kBits;
  std::vector<Selected> sorted(entries.size());
  std::vector<int64_t> offsets(kDigits);
  for (int shift = 0; shift < 63 && ((row_limit - 1) >> shift) > 0; shift += kBits) {
    std::fill(offsets.begin(), offsets.end(), 0);
    for (const Selected& e : entries) ++offsets[(e.row >> shift) & (kDigits - 1)];
    int64_t total = 0;
    for (int64_t& offset : offsets) total += std::exchange(offset, total);
    for (const Selected& e : entries) sorted[offsets[(e.row >> shift) & (kDigits - 1)]++] = e;
    entries.swap(sorted);
  }
}

// Checks index (-1 or a position on L) and the rows it names (below row_limit).
template <typename T>
RowGroups group_selected_rows(const Rows<T>& keys, const int64_t* index, int64_t batch, int64_t k, int64_t row_limit,
                              const char* op) {
  RowGroups groups;
  groups.entries.reserve(batch * k);
  for (int64_t slot = 0; slot < batch * k; ++slot) {
    const int64_t b = slot / k, l = index[slot];
    if (l == -1) continue;
    TORCH_CHECK(l >= 0 && l < keys.length, op, ": index[", b, ", ", slot % k, "] = ", l, " is neither -1 nor in [0, ",
                keys.length, ")");
    const int64_t row = keys.row(b, l);
    TORCH_CHECK(row >= 0 && row < row_limit, op, ": ids[", b, ", ", l, "] = ", row, " is not a row of the table (",
                row_limit, " rows)");
    groups.entries.push_back({row, slot});
  }
  sort_by_row(groups.entries, row_limit);
  for (int64_t e = 0; e < static_cast<int64_t>(groups.entries.size()); ++e) {
    if (e == 0 || groups.entries[e].row != groups.entries[e - 1].row) groups.starts.push_back(e);
  }
  groups.starts.push_back(static_cast<int64_t>(groups.entries.size()));
  return groups;
}

// One table's gradient: grad[row] = factor * sum over the row's slots of
// coef[slot] * source[slot / k]; zero for rows nobody selected.
template <typename T>
struct RowAccumulation {
  const RowGroups* groups;
  const float* coef;  // (B, k)
  float factor;
  const T* source;  // (B, width)
  int64_t k, width;
  T* grad;  // (rows, width)
};

// Writes rows [begin, end) of the gradient once each, in row order: no separate zero fill,
// no scattered writes.
template <typename T>
RECLORA_ISA_CLONES void write_grad_rows(const RowAccumulation<T>& a, int64_t begin, int64_t end, float* acc) {
  const RowGroups& groups = *a.groups;
  const int64_t row_bytes = a.width * sizeof(T);
  int64_t lo = 0, hi = groups.size();  // first group at or after row begin
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (groups.row(mid) < begin) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  int64_t next = begin;  // first row not written yet
  for (int64_t g = lo; g < groups.size() && groups.row(g) < end; ++g) {
    const int64_t row = groups.row(g);
    std::memset(static_cast<void*>(a.grad + next * a.width), 0, (row - next) * row_bytes);
    std::fill(acc, acc + a.width, 0.0f);
    for (int64_t e = groups.starts[g]; e < groups.starts[g + 1]; ++e) {
      const int64_t slot = groups.entries[e].slot;
      axpy(acc, a.coef[slot], a.source + (slot / a.k) * a.width, a.width);
    }
    write_scaled(a.grad + row * a.width, acc, a.factor, a.width);
    next = row + 1;
  }
  std::memset(static_cast<void*>(a.grad + next * a.width), 0, (end - next) * row_bytes);
}

template <typename T>
void write_grad(const RowAccumulation<T>& a, int64_t rows) {
  if (rows * a.width == 0) return;
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(a.width);
    write_grad_rows(a, begin, end, acc.data());
  });
}

// grad_query[b] = scale * sum_j coef[b, j] * key(b, index[b, j]); optionally first turns
// grad_pooled into the score gradients coef = p * (dp - <p, dp>), dp_j = <grad_pooled, v_j>.
template <typename T>
struct QueryGrad {
  Rows<T> keys;
  Rows<T> values;
  const int64_t* index;  // (B, k), checked by group_selected_rows
  int64_t k;
  float scale;
  const T* grad_pooled;  // (B, d_v) or null: coef is given
  const float* probs;    // (B, k) with grad_pooled
  float* coef;           // (B, k): given, or written from grad_pooled
  T* grad_query;         // (B, d)
};

// acc: d floats; grad_pooled: d_v floats when q.grad_pooled is given.
template <typename T>
RECLORA_ISA_CLONES void query_grad_rows(const QueryGrad<T>& q, int64_t begin, int64_t end, float* acc,
                                        float* grad_pooled) {
  const int64_t dim = q.keys.width, value_width = q.values.width;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t* index = q.index + b * q.k;
    float* coef = q.coef + b * q.k;
    if (q.grad_pooled) {
      to_float(grad_pooled, q.grad_pooled + b * value_width, value_width);
      const float* probs = q.probs + b * q.k;
      double expected = 0.0;  // cancels against dp: keep it exact to rounding
      for (int64_t j = 0; j < q.k; ++j) {
        coef[j] = index[j] < 0 ? 0.0f : dot(grad_pooled, q.values.at(q.values.row(b, index[j])), value_width);
        expected += static_cast<double>(probs[j]) * coef[j];
      }
      for (int64_t j = 0; j < q.k; ++j) coef[j] = probs[j] * static_cast<float>(coef[j] - expected);
    }
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = 0; j < q.k; ++j) {
      if (index[j] >= 0) axpy(acc, coef[j], q.keys.at(q.keys.row(b, index[j])), dim);
    }
    write_scaled(q.grad_query + b * dim, acc, q.scale, dim);
  }
}

// ---- argument handling ---------------------------------------------------------------------

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": supports float32, float16 and bfloat16, got ", dtype);
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// query, keys, values (optional) and ids: shapes, dtypes, devices. Returns L.
int64_t check_history(const char* op, const at::Tensor& query, const at::Tensor& keys, const at::Tensor* values,
                      const std::optional<at::Tensor>& ids) {
  check_cpu(query, op, "query");
  check_cpu(keys, op, "keys");
  TORCH_CHECK(query.dim() == 2, op, ": query must be (B, d), got shape ", query.sizes());
  TORCH_CHECK(keys.scalar_type() == query.scalar_type(), op, ": keys must have query's dtype ",
              query.scalar_type(), ", got ", keys.scalar_type());
  const int64_t batch = query.size(0), dim = query.size(1);
  int64_t length;
  if (ids) {
    check_cpu(*ids, op, "ids");
    TORCH_CHECK(ids->scalar_type() == at::kLong, op, ": ids must be int64, got ", ids->scalar_type());
    TORCH_CHECK(ids->dim() == 2 && ids->size(0) == batch, op, ": ids must be (B, L) with B = ", batch,
                ", got shape ", ids->sizes());
    TORCH_CHECK(keys.dim() == 2 && keys.size(1) == dim, op, ": keys must be a table (N, ", dim,
                ") with ids, got shape ", keys.sizes());
    length = ids->size(1);
  } else {
    TORCH_CHECK(keys.dim() == 3 && keys.size(0) == batch && keys.size(2) == dim, op, ": keys must be (", batch,
                ", L, ", dim, ") without ids, got shape ", keys.sizes());
    length = keys.size(1);
  }
  if (values) {
    check_cpu(*values, op, "values");
    TORCH_CHECK(values->scalar_type() == query.scalar_type(), op, ": values must have query's dtype ",
                query.scalar_type(), ", got ", values->scalar_type());
    if (ids) {
      TORCH_CHECK(values->dim() == 2, op, ": values must be a table (N_v, d_v) with ids, got shape ",
                  values->sizes());
    } else {
      TORCH_CHECK(values->dim() == 3 && values->size(0) == batch && values->size(1) == length, op,
                  ": values must be (", batch, ", ", length, ", d_v) without ids, got shape ", values->sizes());
    }
  }
  // Positions are packed into 32 bits of the rank key.
  TORCH_CHECK(length <= 0xFFFFFFFFLL, op, ": histories longer than 2^32 - 1 are not supported, got L = ", length);
  return length;
}

template <typename T>
Rows<T> rows_of(const at::Tensor& table_or_dense, const at::Tensor* ids, int64_t batch, int64_t length) {
  const int64_t width = table_or_dense.size(-1);
  return Rows<T>{table_or_dense.data_ptr<T>(), ids ? ids->data_ptr<int64_t>() : nullptr,
                 ids ? table_or_dense.size(0) : batch * length, length, width};
}

// Scores and index (B, k) of the top k; lengths, mask and the ids read are checked here
// (values: the table read through the same ids by the caller, or null).
std::tuple<at::Tensor, at::Tensor> select_topk(const char* op, const at::Tensor& query, const at::Tensor& keys,
                                               const at::Tensor* values, const at::Tensor* ids,
                                               const std::optional<at::Tensor>& lengths,
                                               const std::optional<at::Tensor>& mask, int64_t length, int64_t k,
                                               double scale) {
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  const int64_t batch = query.size(0);
  at::Tensor lengths_c, mask_c;
  if (lengths) {
    check_cpu(*lengths, op, "lengths");
    TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == batch, op,
                ": lengths must be (B,) int64 with B = ", batch, ", got ", lengths->scalar_type(), " of shape ",
                lengths->sizes());
    lengths_c = lengths->contiguous();
    const int64_t* values = lengths_c.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(values, values + batch);
    TORCH_CHECK(batch == 0 || (*lo >= 0 && *hi <= length), op, ": lengths must lie in [0, L] = [0, ", length,
                "], got values in [", batch ? *lo : 0, ", ", batch ? *hi : 0, "]");
  }
  if (mask) {
    check_cpu(*mask, op, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == batch &&
                    mask->size(1) == length,
                op, ": mask must be (B, L) = (", batch, ", ", length, ") bool, got ", mask->scalar_type(),
                " of shape ", mask->sizes());
    mask_c = mask->contiguous();
  }
  auto scores = at::empty({batch, k}, query.options().dtype(at::kFloat));
  auto index = at::empty({batch, k}, query.options().dtype(at::kLong));
  dispatch_dtype(query.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> key_rows = rows_of<T>(keys, ids, batch, length);
    const int64_t row_limit = ids && values ? std::min(keys.size(0), values->size(0)) : key_rows.count;
    const Selection<T> s{query.data_ptr<T>(),
                         key_rows,
                         lengths ? lengths_c.data_ptr<int64_t>() : nullptr,
                         mask ? mask_c.data_ptr<bool>() : nullptr,
                         row_limit,
                         k,
                         static_cast<float>(scale),
                         scores.data_ptr<float>(),
                         index.data_ptr<int64_t>()};
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> query_row(key_rows.width);
      TopK top(std::min(k, length));
      const int64_t bad = select_rows(s, begin, end, query_row.data(), top);
      if (bad >= 0) {  // only table rows can be out of range
        const std::string value_rows = values ? " and values (" + std::to_string(values->size(0)) + " rows)" : "";
        TORCH_CHECK(false, op, ": ids[", bad / length, ", ", bad % length, "] = ", key_rows.ids[bad],
                    " is not a row of keys (", keys.size(0), " rows)", value_rows);
      }
    });
  });
  return {scores, index};
}

const at::Tensor* optional_ptr(const std::optional<at::Tensor>& t) {
  return t ? &*t : nullptr;
}

// ---- ops ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> retrieve_topk_forward(const at::Tensor& query, const at::Tensor& keys,
                                                         const std::optional<at::Tensor>& ids,
                                                         const std::optional<at::Tensor>& lengths,
                                                         const std::optional<at::Tensor>& mask, int64_t k,
                                                         double scale) {
  constexpr const char* op = "retrieve_topk_forward";
  const int64_t length = check_history(op, query, keys, nullptr, ids);
  const auto ids_c = ids ? std::optional<at::Tensor>(ids->contiguous()) : std::nullopt;
  return select_topk(op, query.contiguous(), keys.contiguous(), nullptr, optional_ptr(ids_c), lengths, mask, length, k,
                     scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_forward(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& ids,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, int64_t k, double scale) {
  constexpr const char* op = "topk_attention_forward";
  const int64_t length = check_history(op, query, keys, &values, ids);
  const auto ids_c = ids ? std::optional<at::Tensor>(ids->contiguous()) : std::nullopt;
  const at::Tensor values_c = values.contiguous();
  auto [scores, index] =
      select_topk(op, query.contiguous(), keys.contiguous(), &values_c, optional_ptr(ids_c), lengths, mask, length, k,
                  scale);
  const int64_t batch = query.size(0);
  auto probs = at::empty({batch, k}, scores.options());
  auto pooled = at::empty({batch, values.size(-1)}, values.options());
  dispatch_dtype(values.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const Pooling<T> p{rows_of<T>(values_c, optional_ptr(ids_c), batch, length),
                       scores.data_ptr<float>(),
                       index.data_ptr<int64_t>(),
                       k,
                       probs.data_ptr<float>(),
                       pooled.data_ptr<T>()};
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(p.values.width);
      pool_rows(p, begin, end, acc.data());
    });
  });
  return {pooled, index, probs};
}

void check_slots(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t batch) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == batch, op, ": ", name, " must be (B, k) ",
              dtype, " with B = ", batch, ", got ", t.scalar_type(), " of shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> retrieve_topk_backward(const at::Tensor& grad_scores, const at::Tensor& query,
                                                          const at::Tensor& keys,
                                                          const std::optional<at::Tensor>& ids,
                                                          const at::Tensor& index, double scale) {
  constexpr const char* op = "retrieve_topk_backward";
  const int64_t length = check_history(op, query, keys, nullptr, ids);
  const int64_t batch = query.size(0), k = index.size(-1);
  check_slots(op, "index", index, at::kLong, batch);
  check_slots(op, "grad_scores", grad_scores, at::kFloat, batch);
  TORCH_CHECK(grad_scores.size(1) == k, op, ": grad_scores must have index's shape ", index.sizes(), ", got ",
              grad_scores.sizes());
  const auto ids_c = ids ? std::optional<at::Tensor>(ids->contiguous()) : std::nullopt;
  const at::Tensor query_c = query.contiguous(), keys_c = keys.contiguous(), index_c = index.contiguous();
  at::Tensor coef = grad_scores.contiguous();
  auto grad_query = at::empty_like(query_c);
  auto grad_keys = at::empty_like(keys_c);
  dispatch_dtype(query.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> key_rows = rows_of<T>(keys_c, optional_ptr(ids_c), batch, length);
    const RowGroups groups = group_selected_rows(key_rows, index_c.data_ptr<int64_t>(), batch, k, key_rows.count, op);
    const QueryGrad<T> q{key_rows, key_rows, index_c.data_ptr<int64_t>(), k, static_cast<float>(scale), nullptr,
                         nullptr, coef.data_ptr<float>(), grad_query.data_ptr<T>()};
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(key_rows.width);
      query_grad_rows(q, begin, end, acc.data(), nullptr);
    });
    const RowAccumulation<T> a{&groups, coef.data_ptr<float>(), static_cast<float>(scale), query_c.data_ptr<T>(), k,
                               key_rows.width, grad_keys.data_ptr<T>()};
    write_grad(a, key_rows.count);
  });
  return {grad_query, grad_keys};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_attention_backward(
    const at::Tensor& grad_pooled, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
    const std::optional<at::Tensor>& ids, const at::Tensor& index, const at::Tensor& probs, double scale) {
  constexpr const char* op = "topk_attention_backward";
  const int64_t length = check_history(op, query, keys, &values, ids);
  const int64_t batch = query.size(0), k = index.size(-1);
  check_slots(op, "index", index, at::kLong, batch);
  check_slots(op, "probs", probs, at::kFloat, batch);
  TORCH_CHECK(probs.size(1) == k, op, ": probs must have index's shape ", index.sizes(), ", got ", probs.sizes());
  check_cpu(grad_pooled, op, "grad_pooled");
  TORCH_CHECK(grad_pooled.scalar_type() == values.scalar_type() && grad_pooled.dim() == 2 &&
                  grad_pooled.size(0) == batch && grad_pooled.size(1) == values.size(-1),
              op, ": grad_pooled must be (B, d_v) = (", batch, ", ", values.size(-1), ") ", values.scalar_type(),
              ", got ", grad_pooled.scalar_type(), " of shape ", grad_pooled.sizes());
  const auto ids_c = ids ? std::optional<at::Tensor>(ids->contiguous()) : std::nullopt;
  const at::Tensor query_c = query.contiguous(), keys_c = keys.contiguous(), values_c = values.contiguous();
  const at::Tensor index_c = index.contiguous(), probs_c = probs.contiguous(), grad_pooled_c = grad_pooled.contiguous();
  auto coef = at::empty({batch, k}, probs.options());
  auto grad_query = at::empty_like(query_c);
  auto grad_keys = at::empty_like(keys_c);
  auto grad_values = at::empty_like(values_c);
  dispatch_dtype(query.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> key_rows = rows_of<T>(keys_c, optional_ptr(ids_c), batch, length);
    const Rows<T> value_rows = rows_of<T>(values_c, optional_ptr(ids_c), batch, length);
    const RowGroups groups = group_selected_rows(key_rows, index_c.data_ptr<int64_t>(), batch, k,
                                                 std::min(key_rows.count, value_rows.count), op);
    const QueryGrad<T> q{key_rows, value_rows, index_c.data_ptr<int64_t>(), k, static_cast<float>(scale),
                         grad_pooled_c.data_ptr<T>(), probs_c.data_ptr<float>(), coef.data_ptr<float>(),
                         grad_query.data_ptr<T>()};
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(key_rows.width), grad_pooled_row(value_rows.width);
      query_grad_rows(q, begin, end, acc.data(), grad_pooled_row.data());
    });
    const RowAccumulation<T> to_keys{&groups, coef.data_ptr<float>(), static_cast<float>(scale),
                                     query_c.data_ptr<T>(), k, key_rows.width, grad_keys.data_ptr<T>()};
    const RowAccumulation<T> to_values{&groups, probs_c.data_ptr<float>(), 1.0f, grad_pooled_c.data_ptr<T>(), k,
                                       value_rows.width, grad_values.data_ptr<T>()};
    write_grad(to_keys, key_rows.count);
    write_grad(to_values, value_rows.count);
  });
  return {grad_query, grad_keys, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(reclora, CPU, m) {
  m.impl("retrieve_topk_forward", &retrieve_topk_forward);
  m.impl("retrieve_topk_backward", &retrieve_topk_backward);
  m.impl("topk_attention_forward", &topk_attention_forward);
  m.impl("topk_attention_backward", &topk_attention_backward);
}
