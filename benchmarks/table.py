"""`python -m benchmarks.table RESULT.json`: the markdown table of a `benchmarks.run` CPU result, as
benchmarks/README.md shows it (one row per group and ISA path, the paths interleaved)."""

import argparse
import json
import sys

HEADER = (
    "| group | path | fused ms (CPU ms) | best PyTorch way (+ linear) / fused: wall (CPU time) | fused_linear / base_linear: "
    "wall (CPU) | in cache: fused ms, best PyTorch way / fused, fused_linear / base_linear | bound | GFLOP/s, "
    "fraction of torch.mm | GB/s, fraction of L3 triad |\n|---|---|---|---|---|---|---|---|---|"
)
BEST, LINEAR = "best PyTorch way / fused", "fused_linear / base_linear"


def row(name, path, group, peaks) -> str:
    fused = group["timings"]["fused"]
    wall, cpu = group["ratios"], group["cpu_time_ratios"]
    linear = f"{wall[LINEAR]:.2f} ({cpu[LINEAR]:.2f})" if LINEAR in wall else "-"
    cache = group.get("in_cache")
    if cache:
        cached_linear = f", {cache['ratios'][LINEAR]:.2f}" if LINEAR in cache["ratios"] else ""
        in_cache = f"{cache['timings']['fused']['median_ms']:.2f}, {cache['ratios'][BEST]:.2f}{cached_linear}"
    else:
        in_cache = "-"
    roof = group["roofline"]
    bound = "compute" if roof["flops_per_byte"] > roof["machine_balance_l3"] else "memory"
    return (
        f"| {name.replace('topk_target_attention', 'topk attention').replace('gated_lora ', '')} | {path} "
        f"| {fused['median_ms']:.2f} ({fused['cpu_median_ms']:.2f}) | {wall[BEST]:.2f} ({cpu[BEST]:.2f}) | {linear} "
        f"| {in_cache} | {bound} ({roof['flops_per_byte']:.1f} FLOP/B) "
        f"| {roof['gflops']:.1f}, {roof['gflops'] / peaks['mm_gflops']:.2f} "
        f"| {roof['gbs']:.1f}, {roof['gbs'] / peaks['triad_l3_gbs']:.2f} |"
    )


def table(result: dict) -> str:
    paths = result["paths"]
    names = list(next(iter(paths.values()))["groups"])
    lines = [HEADER]
    for name in names:
        for path, measured in paths.items():
            if name in measured["groups"]:
                lines.append(row(name, path, measured["groups"][name], measured["peaks"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a benchmarks/results/cpu-*.json of benchmarks.run")
    args = parser.parse_args(argv)
    with open(args.result) as f:
        print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
