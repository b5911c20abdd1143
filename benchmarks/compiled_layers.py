"""`python -m benchmarks.compiled_layers`: what the trainer's --compile buys on this machine. SmolLM2-135M
with RecLoRA (K = 16, r = 8, q and v, weight mix, frozen DIN) or with `lora`'s default (one LoRA of
rank 8 on all seven projections), one training step and one inference batch, the eager model against
a copy whose decoder layers are compiled (reclora.llm.compile_decoder_layers).

The batches rotate over three prompt lengths (--seq-len and 16 tokens either side), as the
trainer's length-sorted batches do, so the compiled model runs with the dynamic shapes it has in
training. The compile itself (the first calls, until every length has run once) is timed apart.
Then eager and compiled steps alternate round-robin; medians of --rounds steps, with quartiles,
the CPU model, its ISA levels, the thread count and the load average. Writes
benchmarks/results/cpu-compile-<cpu>-<date>.json (atomically).
"""

import argparse
import contextlib
import itertools
import os
import time

import torch

from benchmarks.environment import describe, write_cpu_result
from benchmarks.roofline import interleaved
from benchmarks.workload import add_step_arguments, build_configs, make_batch, step_workload
from reclora.llm import compile_decoder_layers
from reclora.methods import ALL_PROJECTIONS

LENGTH_OFFSETS = (0, -16, 16)
METHODS = ("reclora", "lora")


def variant(method, llm, tokenizer, crm, batch, seed):
    """reclora as the other benchmarks run it, or lora_ours on lora's default projections (all seven)."""
    name = "reclora" if method == "reclora" else "lora_ours"
    return build_configs(llm, tokenizer, crm, batch, (name,), seed=seed, lora_targets=ALL_PROJECTIONS)[name]


def run(args):
    dataset, llm, tokenizer, crm, crm_inputs = step_workload(args)
    batches = [
        make_batch(dataset, tokenizer, crm_inputs, args.batch_size, args.seq_len + offset, "cpu", args.seed + i)
        for i, offset in enumerate(LENGTH_OFFSETS)
    ]
    variants = {
        name: variant(args.method, llm, tokenizer, crm, batches[0], args.seed) for name in ("eager", "compiled")
    }
    compile_decoder_layers(variants["compiled"].model.llm)
    autocast = args.precision == "bf16_autocast"
    result = {
        "benchmark": "compiled_layers",
        "environment": describe(),
        "llm": args.llm,
        "method": args.method,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "seq_lens": [args.seq_len + offset for offset in LENGTH_OFFSETS],
        "rounds": args.rounds,
        "warmup": args.warmup,
        "timing": "round-robin over eager and compiled decoder layers, time.perf_counter per step, medians",
    }

    def step(name, kind):
        variant, lengths = variants[name], itertools.cycle(batches)

        def call():
            variant.batch = next(lengths)
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                variant.train_step() if kind == "train" else variant.infer_step()

        return call

    for kind in ("train", "inference"):
        steps = {name: step(name, kind) for name in variants}
        start = time.perf_counter()
        for _ in batches:  # the compiles: a graph for the first length, a dynamic one for the next
            steps["compiled"]()
        result[f"{kind}_compile_s"] = time.perf_counter() - start
        table = interleaved(steps, args.rounds, args.warmup)
        result[kind] = table
        ratio = table["eager"]["median_ms"] / table["compiled"]["median_ms"]
        result[f"{kind}_eager_over_compiled"] = ratio
        print(
            f"{kind}: eager {table['eager']['median_ms']:.0f} ms, compiled {table['compiled']['median_ms']:.0f} ms "
            f"(eager / compiled = {ratio:.2f}); compiling took {result[f'{kind}_compile_s']:.0f} s",
            flush=True,
        )
    result["loadavg_after"] = os.getloadavg()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="reclora")
    parser.add_argument("--precision", choices=("bf16_autocast", "float32"), default="bf16_autocast")
    add_step_arguments(parser, batch_size=16, seq_len=256, rounds=10, warmup=1)
    args = parser.parse_args(argv)
    write_cpu_result(run(args), args.json, f"compile-{args.method}")


if __name__ == "__main__":
    main()
