"""`python -m benchmarks.run`: every kernel benchmark for the hardware present, with ratios.

CPU: at each ISA path of this CPU (RECLORA_CPU_ISA, one child process per path), the groups of
bench_gated_lora.py and bench_retrieval.py (fused op and baselines) timed round-robin, medians over
--rounds rounds, and the roofline (benchmarks/roofline.py): a large torch.mm and a STREAM triad
measured in the same child, each fused op's GFLOP/s and GB/s as fractions of them. Each path is
measured in --repeats children, the paths taking turns; a path's ratios, timings and peaks are the
medians over its children (every child's own result is kept beside them). The AVX2 path
also caps PyTorch's own libraries at AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA), as on an AVX2-only CPU. Then the peak memory and the history-length scaling of
top-k attention at the best path. Writes benchmarks/results/cpu-<cpu>-<date>[-<N>thread].json and
cpu-scaling-<cpu>-<date>[-<N>thread].png (atomically).
GPU (when visible): benchmarks/gpu.py with triton.testing.do_bench.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import bench_gated_lora, bench_retrieval, roofline
from benchmarks.environment import RESULTS, cpu_slug, describe
from benchmarks.memory import peak_bytes
from benchmarks.shapes import RETRIEVAL_CPU
from reclora.files import write_json
from reclora_kernels import cpu_features

HERE = os.path.dirname(os.path.abspath(__file__))
# What a CPU without the wider levels would run, for PyTorch's libraries as for ours.
LIBRARY_CAPS = {
    "avx512": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
PYTORCH_WAYS = ("published", "composition", "published+linear", "composition+linear")


def measure_path(rounds, warmup):
    """This process's ISA path: machine peaks, every group round-robin, ratios and roofline."""
    peaks = roofline.machine_peaks(max(rounds // 2, 10))
    print(
        f"[{cpu_features.active_isa()}] torch.mm {peaks['mm_gflops']:.1f} GFLOP/s, triad "
        f"{peaks['triad_l3_gbs']:.1f} GB/s (L3), {peaks['triad_dram_gbs']:.1f} GB/s (DRAM)",
        flush=True,
    )
    groups = {}
    for name, impls, meta in bench_gated_lora.groups() + bench_retrieval.groups():
        table = roofline.interleaved(impls, rounds, warmup)
        groups[name] = {
            "meta": meta,
            "timings": table,
            "ratios": ratios(table),
            "cpu_time_ratios": ratios(table, "cpu_median_ms"),
            "roofline": roofline.roofline(table["fused"]["median_ms"], meta, peaks),
            "loadavg": os.getloadavg(),
        }
        print_medians(name, table)
        if meta["op"] != "topk_target_attention":  # gated_lora's operands fit in L2 / L3; top-k's do not
            warm = roofline.interleaved(impls, rounds, warmup, back_to_back=True)
            groups[name]["in_cache"] = {"timings": warm, "ratios": ratios(warm)}
            print_medians(f"{name}, in cache", warm)
    return {"environment": describe(), "peaks": peaks, "groups": groups}


def print_medians(label, table):
    print(
        f"[{cpu_features.active_isa()}] {label}: "
        + ", ".join(f"{impl} {s['median_ms']:.3f} ms" for impl, s in table.items()),
        flush=True,
    )


def ratios(table, key="median_ms"):
    """Speed-up of the fused op over each baseline (baseline time / fused time), the best PyTorch way's,
    and (gated_lora_linear groups) the fused linear's cost over the base linear alone; key: the wall-time
    or CPU-time median."""
    fused = table["fused"][key]
    out = {f"{name} / fused": s[key] / fused for name, s in table.items() if name != "fused"}
    ways = [table[name][key] for name in PYTORCH_WAYS if name in table]
    if ways:
        out["best PyTorch way / fused"] = min(ways) / fused
    if "base_linear" in table:  # a gated_lora_linear group, whose "fused" is the fused linear
        out["fused_linear / base_linear"] = fused / table["base_linear"][key]
    return out


def run_path(level, rounds, warmup):
    """measure_path in a child process forced to ISA level (the path is fixed once per process)."""
    env = {**os.environ, cpu_features.ISA_ENV: level, **LIBRARY_CAPS[level]}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "path.json")
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", out, "--rounds", str(rounds), "--warmup", str(warmup)]
        subprocess.run(cmd, check=True, cwd=os.path.dirname(HERE), env=env)
        with open(out) as f:
            return json.load(f)


def combine_children(children):
    """One path's result from its repeated children: each ratio, each implementation's median (wall and
    CPU time) and each machine peak as the median over the children, the roofline recomputed from the
    combined fused median and peaks; every child's result under "children". From one process to the
    next, the same kernel in the same build took up to 1.5x longer on a shared VM, so one child's
    ratio is one draw."""
    median = statistics.median
    peaks = {k: median(c["peaks"][k] for c in children) for k in ("mm_gflops", "triad_l3_gbs", "triad_dram_gbs")}
    groups = {}
    for name, first in children[0]["groups"].items():
        measured = [c["groups"][name] for c in children]
        group = {"meta": first["meta"], **combine_tables([(g["timings"], g["ratios"]) for g in measured])}
        group["cpu_time_ratios"] = median_by_key([g["cpu_time_ratios"] for g in measured])
        group["roofline"] = roofline.roofline(group["timings"]["fused"]["median_ms"], first["meta"], peaks)
        group["loadavg"] = [g["loadavg"] for g in measured]
        if "in_cache" in first:
            group["in_cache"] = combine_tables([(g["in_cache"]["timings"], g["in_cache"]["ratios"]) for g in measured])
        groups[name] = group
    return {"environment": children[0]["environment"], "peaks": peaks, "groups": groups, "children": children}


def combine_tables(tables):
    """{"timings", "ratios"} from (timings, ratios) of several children: medians over them."""
    timings = {
        impl: {
            "median_ms": statistics.median(t[impl]["median_ms"] for t, _ in tables),
            "cpu_median_ms": statistics.median(t[impl]["cpu_median_ms"] for t, _ in tables),
            "children_median_ms": [t[impl]["median_ms"] for t, _ in tables],
        }
        for impl in tables[0][0]
    }
    return {"timings": timings, "ratios": median_by_key([r for _, r in tables])}


def median_by_key(dicts):
    return {key: statistics.median(d[key] for d in dicts) for key in dicts[0]}


def retrieval_memory():
    """Peak memory of forward+backward: fused op against the composition (median of 3 calls each)."""
    tensors = bench_retrieval.prepare(RETRIEVAL_CPU)
    result = {}
    for name, fn in bench_retrieval.implementations().items():
        bench_retrieval.step(fn, tensors, "forward+backward")  # warm-up: gradients exist from here on
        step = functools.partial(bench_retrieval.step, fn, tensors, "forward+backward")
        peaks = sorted(peak_bytes(step, "cpu") for _ in range(3))
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
            step = functools.partial(bench_retrieval.step, fn, tensors, "forward+backward")
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
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per group (medians; at least 25)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="child processes per ISA path, the paths taking turns; results are medians over them",
    )
    levels = cpu_features.isa_levels()
    parser.add_argument(
        "--isa",
        nargs="+",
        choices=cpu_features.ISA_LEVELS,
        default=[v for v in levels if v != "baseline"],
        help=f"ISA paths to measure (default: {' '.join(v for v in levels if v != 'baseline')})",
    )
    parser.add_argument("--scaling-batch", type=int, default=32)
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[512 * 2**i for i in range(8)])
    parser.add_argument("--no-scaling", action="store_true", help="skip the memory and scaling study")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 keeps a busy shared machine from stalling "
        "every parallel region on a descheduled thread",
    )
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's thread count
    if args.child:
        write_json(args.child, measure_path(args.rounds, args.warmup))
        return
    for level in args.isa:
        error = cpu_features.isa_error(level)
        if error:
            parser.error(error)
    os.makedirs(args.out, exist_ok=True)

    env = describe()
    stem = f"cpu-{cpu_slug()}-{env['date']}" + (f"-{args.threads}thread" if args.threads else "")
    result = {
        "environment": env,
        "device": "cpu",
        "method": {
            "timer": "time.perf_counter around each call",
            "interleaving": "round-robin over the implementations of a group, round by round",
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "statistic": "median (with quartiles, min, max and every round's time)",
            "isa_paths": "child processes per path (RECLORA_CPU_ISA plus the library caps in LIBRARY_CAPS), "
            "the paths taking turns; a path's figures are medians over its children (combine_children)",
            "repeats": args.repeats,
            "work_model": roofline.__doc__,
        },
        "library_caps": {level: LIBRARY_CAPS[level] for level in args.isa},
    }
    children = {level: [] for level in args.isa}
    for _ in range(args.repeats):
        for level in args.isa:
            children[level].append(run_path(level, args.rounds, args.warmup))
    result["paths"] = {level: combine_children(runs) for level, runs in children.items()}
    if not args.no_scaling:
        result["topk_target_attention_memory"] = retrieval_memory()
        rows = retrieval_scaling(args.scaling_batch, args.scaling_lengths)
        png = os.path.join(args.out, stem.replace("cpu-", "cpu-scaling-", 1) + ".png")
        plot_scaling(rows, args.scaling_batch, png, f"top-k attention, CPU, B={args.scaling_batch}, d=64, k=64")
        result["topk_target_attention_scaling"] = {
            "batch": args.scaling_batch,
            "rows": rows,
            "plot": os.path.basename(png),
        }
    result["environment"]["loadavg_after"] = os.getloadavg()
    path = os.path.join(args.out, f"{stem}.json")
    write_json(path, result)
    summary = {level: {name: g["ratios"] for name, g in p["groups"].items()} for level, p in result["paths"].items()}
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")

    if torch.cuda.is_available():
        from benchmarks import gpu

        gpu.main(["--out", args.out])


if __name__ == "__main__":
    main()
