// The CPU skinny kernels alone, on operands that stay in L1/L2 (a tile of 32 tokens at the SmolLM2
// shape: d 576, r 8): nanoseconds a call and FMA lanes a nanosecond, best of 7 runs of 2,000 calls.
// What the kernels reach without memory traffic, against the core's FMA peak (2 FMA units x 16 lanes
// on AVX-512, x 8 on AVX2, times the clock). Built and run by `make bench-cpu-kernels` (one thread;
// RECLORA_CPU_ISA picks the path).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>

#include "../csrc/gated_lora_cpu.cpp"

int main() {
  using namespace reclora;
  constexpr int64_t n = 32, R = 8, len = 576;
  std::vector<float> x(n * len), q(R * len), dots(n * R), acc(R * len), c(n * R), y(n * len);
  std::mt19937 generator(0);
  std::normal_distribution<float> normal;
  for (auto* values : {&x, &q, &c, &y}) std::generate(values->begin(), values->end(), [&] { return normal(generator); });
  std::vector<const float*> rows(n);
  std::vector<float*> out_rows(n);
  for (int64_t t = 0; t < n; ++t) {
    rows[t] = x.data() + t * len;
    out_rows[t] = y.data() + t * len;
  }
  const double fmas = double(n) * R * len;
  std::printf("RECLORA_CPU_ISA path: %s; %lld tokens, r %lld, d %lld\n", cpu::kIsaNames[static_cast<int>(cpu::cpu_isa())],
              static_cast<long long>(n), static_cast<long long>(R), static_cast<long long>(len));
  const auto bench = [&](const char* name, const auto& kernel) {
    for (int i = 0; i < 200; ++i) kernel();
    double best = 1e30;
    for (int run = 0; run < 7; ++run) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < 2000; ++i) kernel();
      const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
      best = std::min(best, took.count() / 2000);
    }
    std::printf("%-12s %8.0f ns  %5.1f FMA/ns\n", name, best, fmas / best);
  };
  bench("row_dots", [&] { row_dots(rows.data(), n, q.data(), len, R, len, 1.f, dots.data(), R, false); });
  bench("row_combine", [&] { row_combine(out_rows.data(), n, c.data(), R, q.data(), len, R, len, false); });
  bench("rank_update", [&] { rank_update(acc.data(), len, R, len, c.data(), R, 1, rows.data(), n, true); });
  return 0;
}
