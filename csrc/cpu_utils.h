// SIMD building blocks of the CPU kernels, with run-time ISA dispatch.
//
// Kernels are function objects Kernel<W> written once on Simd<W> vectors of W floats (GCC/Clang
// vector extensions). run_simd<Kernel>(args...) runs Kernel<16> compiled for AVX-512, Kernel<8>
// for AVX2 + FMA, or Kernel<4> for the baseline ISA (SSE2, NEON), whichever this CPU supports:
// the build needs no -march flag, and each ISA gets register blocking that fits its register
// file. RECLORA_CPU_ISA=avx512, avx2 or baseline forces a path (to test and measure each on any
// machine that has it).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__)
// Vector helpers are always inlined into ISA-specific callers: the ABI notes about them do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// -std=c++NN (ISO mode) stops GCC from contracting a * b + c into FMAs; kernels rely on them.
#define RECLORA_CONTRACT optimize("fp-contract=fast")
#else
#define RECLORA_CONTRACT
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#define RECLORA_X86_DISPATCH 1
#endif

// Two-source permutes (GCC >= 12, Clang); without them the transposes take scalar loops.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define RECLORA_HAS_SHUFFLE 1
#endif
#endif

#define RECLORA_INLINE inline __attribute__((always_inline))
// Lambdas inside kernels must be inlined too, to compile for the caller's ISA.
#define RECLORA_INLINE_LAMBDA __attribute__((always_inline))

namespace reclora::cpu {

#ifdef RECLORA_HAS_SHUFFLE
constexpr bool kHasShuffle = true;
#else
constexpr bool kHasShuffle = false;
#endif

// T only makes the vector types dependent: GCC fixes non-dependent ones at definition time.
template <int W, class T = float>
struct Simd {
  static_assert(W >= 4 && (W & (W - 1)) == 0, "W: a power of two >= 4");
  typedef T vec __attribute__((vector_size(W * sizeof(T))));
  using U32 = std::conditional_t<sizeof(T) == 4, uint32_t, void>;
  using U16 = std::conditional_t<sizeof(T) == 4, uint16_t, void>;
  typedef U32 uvec __attribute__((vector_size(W * 4)));  // float bits
  typedef U16 hvec __attribute__((vector_size(W * 2)));  // bfloat16 / float16 bits

#ifdef RECLORA_HAS_SHUFFLE
  // Lane i of the result is lane index(i) of the 2W lanes a, b: one two-source permute.
  template <class F, size_t... I>
  static RECLORA_INLINE vec lanes(const vec& a, const vec& b, F index, std::index_sequence<I...>) {
    return __builtin_shufflevector(a, b, index(I)...);
  }
  template <class F>
  static RECLORA_INLINE vec lanes(const vec& a, const vec& b, F index) {
    return lanes(a, b, index, std::make_index_sequence<W>{});
  }
#endif

  // Every lane = *p: on AVX2 and AVX-512 one vbroadcastss from memory, a load that leaves the vector
  // ALU ports to the FMAs. Written as vector code, GCC adds 0 first (vec{} + *p: 0 + x is not x for
  // -0) and broadcasts from a register, or builds the vector lane by lane (other spellings): 2 to 16
  // extra instructions a broadcast, which feeds only 2 to 4 FMAs in RankUpdate and RowCombine (perf
  // annotate, Ice Lake; the backward ran about 8% faster without them).
  static RECLORA_INLINE vec broadcast(const float* p) {
#ifdef RECLORA_X86_DISPATCH
    if constexpr (W >= 8 && std::is_same_v<T, float>) {
      vec v;
      asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
      return v;
    }
#endif
    return vec{} + *p;
  }
  static RECLORA_INLINE uvec splat_bits(uint32_t value) {
    return uvec{} + value;
  }
  // mask lanes are all ones or all zeros
  static RECLORA_INLINE uvec select(const uvec& mask, const uvec& a, const uvec& b) {
    return (a & mask) | (b & ~mask);
  }
  static RECLORA_INLINE vec load(const float* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static RECLORA_INLINE void store(float* p, const vec& v) {
    std::memcpy(p, &v, sizeof(v));
  }
  // kTail: only the first count (< W) floats exist; the other lanes load as zeros.
  template <bool kTail>
  static RECLORA_INLINE vec load_n(const float* p, int64_t count) {
    if constexpr (kTail) {
      vec v = {};
      std::memcpy(&v, p, count * sizeof(float));
      return v;
    } else {
      return load(p);
    }
  }
  template <bool kTail>
  static RECLORA_INLINE void store_n(float* p, const vec& v, int64_t count) {
    std::memcpy(p, &v, (kTail ? count : W) * sizeof(float));
  }

  // bfloat16 / float16 elements (H = c10::BFloat16 or c10::Half), converted as c10 converts them:
  // rounding to nearest even, NaN kept, float16 overflowing to inf and keeping its subnormals.
  template <bool kTail, class H>
  static RECLORA_INLINE vec load_reduced(const H* p, int64_t count) {
    hvec raw = {};
    std::memcpy(&raw, p, (kTail ? count : W) * sizeof(H));
    const uvec bits = __builtin_convertvector(raw, uvec);
    if constexpr (std::is_same_v<H, c10::BFloat16>) {
      return (vec)(bits << 16);
    } else {
      return half_to_float(bits);
    }
  }
  template <bool kTail, class H>
  static RECLORA_INLINE void store_reduced(H* p, const vec& v, int64_t count) {
    uvec bits;
    if constexpr (std::is_same_v<H, c10::BFloat16>) {
      const uvec u = (uvec)v;
      bits = select((uvec)(v != v), splat_bits(0x7FC0u), (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else {
      bits = float_to_half(v);
    }
    const hvec raw = __builtin_convertvector(bits, hvec);
    std::memcpy(p, &raw, (kTail ? count : W) * sizeof(H));
  }
  // The two float16 conversions are F. Giesen's branch-free ones (half_to_float_fast4,
  // float_to_half_fast3_rtne), with selects for branches.
  static RECLORA_INLINE vec half_to_float(const uvec& h) {
    const uvec exp_mask = splat_bits(0x7C00u << 13);
    uvec o = (h & 0x7FFFu) << 13;
    const uvec exp = o & exp_mask;
    o += (127u - 15u) << 23;
    o += (uvec)(exp == exp_mask) & ((128u - 16u) << 23);  // inf, NaN
    const vec renormalized = (vec)(o + (1u << 23)) - (vec)splat_bits(113u << 23);
    o = select((uvec)(exp == 0u), (uvec)renormalized, o);  // zero, subnormal
    return (vec)(o | ((h & 0x8000u) << 16));
  }
  static RECLORA_INLINE uvec float_to_half(const vec& v) {
    const uvec bits = (uvec)v;
    const uvec sign = bits & 0x80000000u;
    const uvec u = bits ^ sign;
    const uvec inf_nan = select((uvec)(u > (255u << 23)), splat_bits(0x7E00u), splat_bits(0x7C00u));
    const uvec denorm_magic = splat_bits(((127u - 15u) + (23u - 10u) + 1u) << 23);
    const uvec subnormal = (uvec)((vec)u + (vec)denorm_magic) - denorm_magic;
    const uvec normal = (u + (((15u - 127u) << 23) + 0xFFFu) + ((u >> 13) & 1u)) >> 13;
    const uvec o = select((uvec)(u >= ((127u + 16u) << 23)), inf_nan,
                          select((uvec)(u < (113u << 23)), subnormal, normal));
    return o | (sign >> 16);
  }

#ifdef RECLORA_HAS_SHUFFLE
  // The even lanes of a then b, and the odd ones: a and b are consecutive W-float pieces of a
  // sequence, and unzip splits it into its even and odd elements. zip is the inverse.
  static RECLORA_INLINE vec unzip_even(const vec& a, const vec& b) {
    return lanes(a, b, [](int i) { return 2 * i; });
  }
  static RECLORA_INLINE vec unzip_odd(const vec& a, const vec& b) {
    return lanes(a, b, [](int i) { return 2 * i + 1; });
  }
  static RECLORA_INLINE vec zip_low(const vec& even, const vec& odd) {
    return lanes(even, odd, [](int i) { return i / 2 + (i % 2) * W; });
  }
  static RECLORA_INLINE vec zip_high(const vec& even, const vec& odd) {
    return lanes(even, odd, [](int i) { return W / 2 + i / 2 + (i % 2) * W; });
  }
#endif

  static RECLORA_INLINE float hsum(const vec& v) {
    typename Simd<W / 2, T>::vec low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
    if constexpr (W == 4) {
      return (low[0] + high[0]) + (low[1] + high[1]);
    } else {
      return Simd<W / 2, T>::hsum(low + high);
    }
  }
};

template <class T>
struct Simd<2, T> {
  typedef T vec __attribute__((vector_size(2 * sizeof(T))));
};

// Calls f(std::integral_constant<int, w>{}, start) over [begin, end) in blocks of w = N while
// they fit, then smaller ones (N - 1 down to a power of two, then halving to 1): kernels get
// compile-time block sizes.
template <int N, class F>
RECLORA_INLINE void for_blocks(int64_t begin, int64_t end, F&& f) {
  for (; begin + N <= end; begin += N) f(std::integral_constant<int, N>{}, begin);
  if constexpr (N > 1) for_blocks<(N & (N - 1)) ? N - 1 : N / 2>(begin, end, f);
}

enum class Isa { kBaseline, kAvx2, kAvx512 };

constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

// The best level this CPU (and its OS, which must save the wider registers) runs.
inline Isa hardware_isa() {
  Isa isa = Isa::kBaseline;
#ifdef RECLORA_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
    isa = Isa::kAvx512;
  }
#endif
  return isa;
}

// hardware_isa(), or the level RECLORA_CPU_ISA names; a level this CPU lacks is refused, never
// silently lowered, so that a test or benchmark of a path runs that path or fails.
inline Isa select_isa() {
  const Isa best = hardware_isa();
  const char* requested = std::getenv("RECLORA_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (int level = 0; level <= static_cast<int>(Isa::kAvx512); ++level) {
    if (std::strcmp(requested, kIsaNames[level]) != 0) continue;
    TORCH_CHECK(level <= static_cast<int>(best), "RECLORA_CPU_ISA=", requested,
                ": this CPU lacks it (the best level here is ", kIsaNames[static_cast<int>(best)],
                "); unset it or pick a level up to that one");
    return static_cast<Isa>(level);
  }
  TORCH_CHECK(false, "RECLORA_CPU_ISA=", requested, " is not a level: expected avx512, avx2 or baseline");
}

// The path every CPU kernel takes, fixed at the first call (an error is raised again at each call).
inline Isa cpu_isa() {
  static const Isa isa = select_isa();
  return isa;
}

#ifdef RECLORA_X86_DISPATCH
template <template <int> class Kernel, class... Args>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), RECLORA_CONTRACT)) void run_avx512(
    Args... args) {
  Kernel<16>{}(args...);
}

template <template <int> class Kernel, class... Args>
__attribute__((target("avx2,fma"), RECLORA_CONTRACT)) void run_avx2(Args... args) {
  Kernel<8>{}(args...);
}
#endif

template <template <int> class Kernel, class... Args>
__attribute__((RECLORA_CONTRACT)) void run_baseline(Args... args) {
  Kernel<4>{}(args...);
}

template <template <int> class Kernel, class... Args>
void run_simd(Args... args) {
#ifdef RECLORA_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return run_avx512<Kernel>(args...);
    case Isa::kAvx2:
      return run_avx2<Kernel>(args...);
    case Isa::kBaseline:
      break;
  }
#endif
  run_baseline<Kernel>(args...);
}

// dst[t * d : +d] = float(base[rows[t] * ld : +d]) for t < n; H = c10::BFloat16 or c10::Half.
template <int W>
struct GatherRows {
  template <class H>
  RECLORA_INLINE void operator()(const H* base, int64_t ld, const int64_t* rows, int64_t n, int64_t d, float* dst) const {
    using S = Simd<W>;
    for (int64_t t = 0; t < n; ++t) {
      const H* src = base + rows[t] * ld;
      float* out = dst + t * d;
      int64_t i = 0;
      for (; i + W <= d; i += W) S::store(out + i, S::template load_reduced<false>(src + i, 0));
      if (i < d) S::template store_n<true>(out + i, S::template load_reduced<true>(src + i, d - i), d - i);
    }
  }
};

// base[rows[t] * d : +d] = src[t * d : +d] (or += it, rounding once), t < n; H as in GatherRows.
template <int W>
struct ScatterRows {
  template <class H>
  RECLORA_INLINE void operator()(
      const float* src, H* base, const int64_t* rows, int64_t n, int64_t d, bool accumulate) const {
    using S = Simd<W>;
    for (int64_t t = 0; t < n; ++t) {
      const float* in = src + t * d;
      H* out = base + rows[t] * d;
      int64_t i = 0;
      for (; i + W <= d; i += W) {
        typename S::vec v = S::load(in + i);
        if (accumulate) v += S::template load_reduced<false>(out + i, 0);
        S::template store_reduced<false>(out + i, v, 0);
      }
      if (i < d) {
        typename S::vec v = S::template load_n<true>(in + i, d - i);
        if (accumulate) v += S::template load_reduced<true>(out + i, d - i);
        S::template store_reduced<true>(out + i, v, d - i);
      }
    }
  }
};

}  // namespace reclora::cpu
