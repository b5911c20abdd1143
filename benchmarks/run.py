"""`python -m benchmarks.run`: every kernel benchmark for the hardware present, with ratios.

CPU: pytest-benchmark runs benchmarks/bench_*.py (fused op and baselines in the same run),
then peak memory and the history-length scaling study; writes
benchmarks/results/cpu-<date>.json and cpu-scaling-<date>.png.
GPU (when visible): benchmarks/gpu.py with triton.testing.do_bench.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import bench_retrieval
from benchmarks.environment import describe
from benchmarks.memory import peak_bytes
from benchmarks.shapes import LORA_SMOLLM2, RETRIEVAL_CPU

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BENCH_FILES = ["bench_gated_lora.py", "bench_retrieval.py"]


def run_pytest_benchmarks(max_time):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *[os.path.join(HERE, f) for f in BENCH_FILES],
            "--benchmark-enable", "--benchmark-only", f"--benchmark-json={out}",
            f"--benchmark-max-time={max_time}", "--benchmark-min-rounds=5",
            "--benchmark-columns=median,iqr,rounds",
        ]
        subprocess.run(cmd, check=True, cwd=os.path.dirname(HERE))
        with open(out) as f:
            return json.load(f)


def summarize(raw):
    """{group: {impl: {median_ms, iqr_ms, rounds}}} from pytest-benchmark's JSON."""
    table = {}
    for bench in raw["benchmarks"]:
        stats = bench["stats"]
        table.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = {
            "median_ms": stats["median"] * 1e3,
            "iqr_ms": stats["iqr"] * 1e3,
            "rounds": stats["rounds"],
        }
    return table


def ratios(table):
    """Speed-up of each fused op over its baselines (baseline time / fused time)."""
    out = {}
    for group, impls in table.items():
        fused = impls.get("fused")
        if fused is None:
            continue
        for name, stats in impls.items():
            if name != "fused":
                out[f"{group}: {name} / fused"] = stats["median_ms"] / fused["median_ms"]
        pytorch_ways = [impls[n]["median_ms"] for n in ("published", "composition") if n in impls]
        if pytorch_ways:
            out[f"{group}: best PyTorch way / fused"] = min(pytorch_ways) / fused["median_ms"]
        if "fused_linear" in impls and "base_linear" in impls:
            out[f"{group}: fused_linear / base_linear"] = impls["fused_linear"]["median_ms"] / impls["base_linear"]["median_ms"]
    return out


def retrieval_memory():
    """Peak memory of forward+backward: fused op against the composition (median of 3 calls each)."""
    tensors = bench_retrieval.prepare(RETRIEVAL_CPU)
    result = {}
    for name, fn in bench_retrieval.implementations().items():
        bench_retrieval.step(fn, tensors, "forward+backward")  # warm-up: gradients exist from here on
        peaks = sorted(peak_bytes(lambda: bench_retrieval.step(fn, tensors, "forward+backward"), "cpu") for _ in range(3))
        result[name] = peaks[1] / 2**20
    return {"peak_MiB": result, "composition / fused": result["composition"] / max(result["fused"], 1e-9)}


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def retrieval_scaling(batch, lengths, repeats=3):
    """Forward+backward time against history length L, fused and composed, same shapes otherwise."""
    rows = []
    for length in lengths:
        shape = dict(RETRIEVAL_CPU, batch=batch, length=length)
        tensors = bench_retrieval.prepare(shape)
        row = {"L": length}
        for name, fn in bench_retrieval.implementations().items():
            step = lambda: bench_retrieval.step(fn, tensors, "forward+backward")
            step()
            row[f"{name}_ms"] = median_ms(step, repeats)
        rows.append(row)
        print(f"scaling L={length}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items() if k != "L"))
    return rows


def plot_scaling(rows, batch, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [r["L"] for r in rows]
    for name in ("fused", "composition"):
        ax.plot(lengths, [r[f"{name}_ms"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("history length L")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", type=float, default=1.0, help="seconds per pytest-benchmark case")
    parser.add_argument("--scaling-batch", type=int, default=32)
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[512 * 2**i for i in range(8)])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    env = describe()
    table = summarize(run_pytest_benchmarks(args.max_time))
    result = {
        "environment": env,
        "device": "cpu",
        "shapes": {"gated_lora": LORA_SMOLLM2, "topk_target_attention": RETRIEVAL_CPU},
        "dtype": "float32",
        "timings": table,
        "ratios": ratios(table),
        "topk_target_attention_memory": retrieval_memory(),
    }
    rows = retrieval_scaling(args.scaling_batch, args.scaling_lengths)
    png = os.path.join(args.out, f"cpu-scaling-{env['date']}.png")
    plot_scaling(rows, args.scaling_batch, png, f"top-k attention, CPU, B={args.scaling_batch}, d=64, k=64")
    result["topk_target_attention_scaling"] = {"batch": args.scaling_batch, "rows": rows, "plot": os.path.basename(png)}
    path = os.path.join(args.out, f"cpu-{env['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"ratios": result["ratios"], "memory": result["topk_target_attention_memory"]}, indent=2))
    print(f"wrote {path} and {png}")

    if torch.cuda.is_available():
        from benchmarks import gpu

        gpu.main(["--out", args.out])


if __name__ == "__main__":
    main()
