"""The CPU timer and roofline of benchmarks.run: implementations timed round-robin, the machine's
attainable fp32 GEMM rate and memory bandwidth measured in the same process, and each fused op's
achieved GFLOP/s and GB/s as fractions of them.

Work models (float32, leading terms; M = B T tokens, D = d_in + d_out, R = r for mix=weight and K r
for mix=output):
  gated_lora forward:  2 M R D FLOPs (+ 2 B K r D to mix A_p, B_p); bytes x, y and the factors
  forward+backward:    3 times the forward's token FLOPs (forward, input gradient, factor gradients;
                       the backward reuses the forward's x A^T) + 3 times the mixing; bytes
                       also x again, grad_out (one row when it is broadcast), grad_x, factor gradients
  gated_lora_linear:   gated_lora's, plus 2 M d_in d_out FLOPs and the weight's bytes per base GEMM
                       (one forward, one more backward: grad_out W; the weight is frozen)
  topk attention:      2 d FLOPs per valid history position, plus the pooling; bytes: the gathered
                       key rows, the ids, the query; backward adds the k selected rows, their
                       gradients and the dense (N, d) table gradient it must write
"""

import statistics
import time

import torch

from benchmarks.timing import stats, timed_ms

FLOAT = 4
GEMM_SIZE = 2048
TRIAD_DRAM = 1 << 24  # floats per array: 3 x 64 MiB, far beyond any L3
TRIAD_L3 = 1 << 20  # 3 x 4 MiB: about the working set of gated_lora at the SmolLM2 shape


def interleaved(impls, rounds, warmup, back_to_back=False):
    """{name: stats}: round i of every implementation runs before round i + 1 of any. Wall time, and
    beside it the process's CPU time (all threads), which time slices lost to other processes on a
    shared machine do not inflate. The rounds take their orders from a Williams design
    (balanced_orders), so within rounds every implementation comes right after each of the others
    equally often: what runs just before an op moves its time (gated_lora took 2.4-2.6 ms after the
    base linear's GEMMs, 2.1 ms after the published way, on an Ice Lake), and a fixed order would
    charge that to one implementation.

    By default the other implementations run between two calls of one and evict its operands from
    the caches, as a model's other layers do between two calls of an op. back_to_back: each timed
    call comes right after an untimed identical one, so its operands are in cache (a loop's regime)."""
    wall, cpu = {name: [] for name in impls}, {name: [] for name in impls}
    names = list(impls)
    orders = balanced_orders(len(names))
    for i in range(warmup + rounds):
        for name in (names[k] for k in orders[i % len(orders)]):
            fn = impls[name]
            if back_to_back:
                fn()
            start = time.process_time()
            ms = timed_ms(fn, "cpu")
            if i >= warmup:
                wall[name].append(ms)
                cpu[name].append((time.process_time() - start) * 1e3)
    return {name: {**stats(wall[name]), "cpu_median_ms": statistics.median(cpu[name])} for name in impls}


def balanced_orders(n):
    """Williams' design: orders of range(n) (n of them, 2 n for odd n) in which each element comes right
    after each other one equally often."""
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    orders = [[(k + shift) % n for k in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def machine_peaks(rounds, warmup=2):
    """Attainable fp32 GEMM GFLOP/s (torch.mm, n = 2048) and STREAM-triad GB/s (a = b + s c, three
    arrays counted), from DRAM and from L3, timed round-robin."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    out = torch.empty(GEMM_SIZE, GEMM_SIZE)
    arrays = {n: [torch.rand(n) for _ in range(3)] for n in (TRIAD_DRAM, TRIAD_L3)}

    def triad(n):
        x, y, z = arrays[n]
        return lambda: torch.add(y, z, alpha=3.0, out=x)

    table = interleaved(
        {"mm": lambda: torch.mm(a, b, out=out), "triad_dram": triad(TRIAD_DRAM), "triad_l3": triad(TRIAD_L3)},
        rounds,
        warmup,
    )
    rate = lambda work, name: work / (table[name]["median_ms"] * 1e6)
    return {
        "mm_gflops": rate(2 * GEMM_SIZE**3, "mm"),
        "triad_dram_gbs": rate(3 * FLOAT * TRIAD_DRAM, "triad_dram"),
        "triad_l3_gbs": rate(3 * FLOAT * TRIAD_L3, "triad_l3"),
        "gemm_size": GEMM_SIZE,
        "triad_floats": {"dram": TRIAD_DRAM, "l3": TRIAD_L3},
        "timings": {name: {k: v for k, v in s.items() if k != "all_ms"} for name, s in table.items()},
    }


def gated_lora_work(meta):
    s = meta["shape"]
    tokens, d = s["batch"] * s["tokens"], s["d_in"] + s["d_out"]
    factors = s["num_loras"] * s["rank"] * d
    rank = s["rank"] * (s["num_loras"] if meta["mix"] == "output" else 1)
    token_flops = 2 * tokens * rank * d
    mixing = 2 * s["batch"] * factors if meta["mix"] == "weight" else 0
    forward_bytes = FLOAT * (tokens * d + factors)
    if meta["passes"] == "forward":
        return token_flops + mixing, forward_bytes
    grad_rows = tokens if meta["gradient"] == "dense" else 1
    backward_bytes = FLOAT * (2 * tokens * s["d_in"] + grad_rows * s["d_out"] + factors)
    return 3 * (token_flops + mixing), forward_bytes + backward_bytes


def topk_attention_work(meta):
    s = meta["shape"]
    valid, batch, dim, k = meta["valid_positions"], s["batch"], s["dim"], s["k"]
    flops = 2 * valid * dim + 2 * batch * k * dim
    forward_bytes = FLOAT * (valid * dim + batch * dim) + 8 * batch * s["length"]
    if meta["passes"] == "forward":
        return flops, forward_bytes
    return flops + 4 * batch * k * dim, forward_bytes + FLOAT * (2 * batch * k * dim + s["table_rows"] * dim)


def gated_lora_linear_work(meta):
    """gated_lora's work plus the base GEMMs: x W^T forward, grad_out W backward (W is frozen)."""
    flops, nbytes = gated_lora_work(meta)
    s = meta["shape"]
    gemms = 1 if meta["passes"] == "forward" else 2
    weight = s["d_in"] * s["d_out"]
    return flops + gemms * 2 * s["batch"] * s["tokens"] * weight, nbytes + gemms * FLOAT * weight


WORK = {
    "gated_lora": gated_lora_work,
    "gated_lora_linear": gated_lora_linear_work,
    "topk_target_attention": topk_attention_work,
}


def roofline(fused_ms, meta, peaks):
    """The fused op's rates as fractions of the machine's, and the bound it sits against: compute when
    its arithmetic intensity exceeds the machine balance (GEMM rate / L3 triad bandwidth), else memory."""
    flops, nbytes = WORK[meta["op"]](meta)
    gflops, gbs = flops / (fused_ms * 1e6), nbytes / (fused_ms * 1e6)
    intensity, balance = flops / nbytes, peaks["mm_gflops"] / peaks["triad_l3_gbs"]
    return {
        "flops": flops,
        "bytes": nbytes,
        "gflops": gflops,
        "gbs": gbs,
        "flops_per_byte": intensity,
        "machine_balance_l3": balance,
        "bound": "compute" if intensity > balance else "memory",
        "fraction_of_mm": gflops / peaks["mm_gflops"],
        "fraction_of_triad_l3": gbs / peaks["triad_l3_gbs"],
        "fraction_of_triad_dram": gbs / peaks["triad_dram_gbs"],
    }
