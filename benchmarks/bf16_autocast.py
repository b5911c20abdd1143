"""`python -m benchmarks.bf16_autocast`: does bf16 autocast pay on this CPU? SmolLM2-135M with RecLoRA
(K = 16, r = 8, weight mix, frozen DIN), one training step and one inference batch, float32
against torch.autocast("cpu", dtype=torch.bfloat16), as the trainer's --bf16 runs them.

Same model and batch for both; float32 and bf16 steps alternate round-robin (so a shared machine's
drift hits both alike); median of --rounds steps after --warmup, with quartiles. Records the CPU
model, whether it has native bf16 arithmetic (AVX512-BF16 / AMX), the thread count and the load
average. Writes benchmarks/results/cpu-bf16-<cpu>-<date>.json (atomically).
"""

import argparse
import contextlib
import os

import torch

from benchmarks.environment import describe, write_cpu_result
from benchmarks.roofline import interleaved
from benchmarks.workload import add_step_arguments, build_configs, make_batch, step_workload

PRECISIONS = ("float32", "bf16_autocast")


def precision(name):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16_autocast" else contextlib.nullcontext()


def run(args):
    dataset, llm, tokenizer, crm, crm_inputs = step_workload(args)
    batch = make_batch(dataset, tokenizer, crm_inputs, args.batch_size, args.seq_len, "cpu", args.seed)
    config = build_configs(llm, tokenizer, crm, batch, ("reclora",), seed=args.seed)["reclora"]
    result = {
        "benchmark": "bf16_autocast",
        "environment": describe(),
        "llm": args.llm,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "method": "round-robin over float32 and bf16 autocast, time.perf_counter per step, medians",
    }
    for kind, step in (("train", config.train_step), ("inference", config.infer_step)):

        def timed(name, step=step):
            def call():
                with precision(name):
                    step()

            return call

        table = interleaved({name: timed(name) for name in PRECISIONS}, args.rounds, args.warmup)
        result[kind] = table
        result[f"{kind}_float32_over_bf16"] = table["float32"]["median_ms"] / table["bf16_autocast"]["median_ms"]
        print(
            f"{kind}: float32 {table['float32']['median_ms']:.1f} ms, bf16 autocast "
            f"{table['bf16_autocast']['median_ms']:.1f} ms: float32 / bf16 = {result[f'{kind}_float32_over_bf16']:.2f}",
            flush=True,
        )
    result["loadavg_after"] = os.getloadavg()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch_size=4, seq_len=64, rounds=25, warmup=2)
    args = parser.parse_args(argv)
    write_cpu_result(run(args), args.json, "bf16")


if __name__ == "__main__":
    main()
