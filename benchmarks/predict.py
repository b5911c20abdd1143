"""`python -m benchmarks.predict`: requests per second of reclora.predict against the other ways to score.

  python -m benchmarks.predict --run RUN_DIR [--lora-run RUN_DIR] [--requests 128] [--batch-size 32] [--rounds 3]
                               [--device cpu|cuda] [--bf16|--no-bf16] [--json OUT.json]

Same run, same requests (the first --requests samples of the run's predictions.npz), same
adapters; after a warm-up batch of each, --rounds rounds of one pass of every path in turn (on a
shared machine every path sees the same drift); the median pass is reported:
  predict         Recommender.score_samples: prompts sorted by length, torch.inference_mode, the CRM
                  and gates once per request, the fused gated_lora_linear (what reclora.predict runs)
  trainer_eval    reclora.train.loop.predict: the trainer's evaluation path (batches in sample
                  order, torch.no_grad, the same model)
  published       (--run of method reclora) the same adapters and gates the published way
                  (benchmarks/published_reclora.py), batches as the trainer forms them
  peft            (--lora-run of method lora) the same LoRA loaded into PEFT (get_peft_model), same batches
The lora run's own `predict` and `trainer_eval` rows are measured too. Reported per path: seconds,
requests per second, the ratio to trainer_eval and to the published / PEFT way, the peak memory of
the pass (CUDA: the allocator's peak; CPU: the resident set's high-water mark above the start), and
the largest score difference to `predict` (all paths compute the same function). Throughput does
not depend on how well the adapters were trained: a small run is enough.
"""

import argparse
import copy
import functools
import statistics
import time

import numpy as np
import torch

from benchmarks.environment import describe
from benchmarks.memory import peak_bytes
from benchmarks.published_reclora import PublishedRecLoRA
from reclora import Recommender
from reclora.files import write_json
from reclora.llm import last_token_logits, load_llm
from reclora.train.distributed import Processes
from reclora.train.loop import autocast
from reclora.train.loop import predict as trainer_predict


def _timed(fn, device):
    """(seconds, peak MiB, result) of one call."""
    out = {}

    def call():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out["result"] = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - start

    peak = peak_bytes(call, device.type) / 2**20
    return out["seconds"], peak, out["result"]


def _batched(recommender, forward, samples):
    """Scores of samples (the run's own) through forward(batch) -> logits, batches in sample order as the trainer forms them."""
    model, config = recommender.model, recommender.config
    recommender.table.serve(recommender.table.run_requests(samples))
    out = []
    with torch.no_grad():
        for first in range(0, len(samples), recommender.batch_size):
            batch = model.prepare(np.arange(first, min(len(samples), first + recommender.batch_size)))
            with autocast(config, recommender.device):
                out.append(model.readout.yes_probability(forward(batch)).float().cpu().numpy())
    return np.concatenate(out)


def _published_forward(recommender):
    llm, _ = load_llm(
        recommender.config.llm,
        device=recommender.device,
        cache_dir=recommender.config.cache_dir,
        seed=recommender.config.seed,
    )
    published = PublishedRecLoRA.from_personalized(llm, recommender.model.llm).eval()
    model = recommender.model
    return lambda batch: published(batch["input_ids"], batch["attention_mask"], model.gate_features(batch))


def _peft_forward(recommender):
    from peft import LoraConfig, get_peft_model

    adapters = recommender.model.llm
    llm = copy.deepcopy(adapters.llm)
    for name in adapters.slot_names:  # back to plain nn.Linear layers holding the same frozen weights
        layer = llm.get_submodule(name)
        parent, _, attribute = name.rpartition(".")
        plain = torch.nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device
        )
        plain.weight, plain.bias = layer.weight, layer.bias
        setattr(llm.get_submodule(parent), attribute, plain)
    config = adapters.config
    peft_model = get_peft_model(
        llm,
        LoraConfig(
            r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=list(config.target_modules)
        ),
    ).eval()
    with torch.no_grad():
        for name in adapters.slot_names:
            ours, theirs = adapters.llm.get_submodule(name), peft_model.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(ours.lora_a[0])
            theirs.lora_B["default"].weight.copy_(ours.lora_b[0])

    def forward(batch):
        return last_token_logits(peft_model, batch["input_ids"], batch["attention_mask"])

    return forward


def _trainer_eval(recommender, samples, processes):
    recommender.table.serve(recommender.table.run_samples)  # the trainer reads the run's samples by index
    return trainer_predict(recommender.model, samples, recommender.config, processes, "eval").astype(np.float32)


def measure(recommender, samples, baseline_name, baseline_forward, rounds) -> dict:
    processes = Processes(device=recommender.device)
    paths = {
        "predict": lambda s: recommender.score_samples(s),
        "trainer_eval": lambda s: _trainer_eval(recommender, s, processes),
        baseline_name: lambda s: _batched(recommender, baseline_forward, s),
    }
    warm_up = samples[: recommender.batch_size]
    for path in paths.values():
        path(warm_up)
    seconds, peaks, scores = {name: [] for name in paths}, {name: [] for name in paths}, {}
    for _ in range(rounds):  # every path once per round: a shared machine's drift falls on all alike
        for name, path in paths.items():
            elapsed, peak, scores[name] = _timed(functools.partial(path, samples), recommender.device)
            seconds[name].append(elapsed)
            peaks[name].append(peak)
    rows = {
        name: {
            "seconds": statistics.median(seconds[name]),
            "all_seconds": seconds[name],
            "requests_per_s": len(samples) / statistics.median(seconds[name]),
            "peak_mib": max(peaks[name]),
        }
        for name in paths
    }
    for name, row in rows.items():
        row["max_abs_score_difference_to_predict"] = float(np.abs(scores[name] - scores["predict"]).max())
        row["speedup_of_predict"] = row["seconds"] / rows["predict"]["seconds"]
    return rows


def _prompt_tokens(recommender, samples) -> dict:
    recommender.table.serve(recommender.table.run_requests(samples))
    lengths = [len(ids) for ids in recommender.model.prompt_token_ids(np.arange(len(samples)))]
    return {"mean": float(np.mean(lengths)), "min": int(np.min(lengths)), "max": int(np.max(lengths))}


def run(args) -> dict:
    result = {
        "environment": describe(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "note": "throughput does not depend on the adapters' quality: the runs may be small",
        "runs": {},
    }
    for run_dir, expected, baseline_name, make_baseline in (
        (args.run, "reclora", "published", _published_forward),
        (args.lora_run, "lora", "peft", _peft_forward),
    ):
        if run_dir is None:
            continue
        recommender = Recommender.load(run_dir, device=args.device, bf16=args.bf16, batch_size=args.batch_size)
        if recommender.method != expected:
            raise SystemExit(f"{run_dir}: a {recommender.method} run, expected {expected}")
        samples = recommender.split_samples("test")[: args.requests]
        rows = measure(recommender, samples, baseline_name, make_baseline(recommender), args.rounds)
        result["runs"][expected] = {
            "run": str(run_dir),
            "dataset": recommender.config.dataset,
            "llm": recommender.config.llm,
            "requests": len(samples),
            "batch_size": recommender.batch_size,
            "device": str(recommender.device),
            "dtype": "bfloat16 autocast" if recommender.config.bf16 else "float32",
            "kernel_backend": recommender.model.llm.config.backend or "default",
            "train_size": recommender.run.results_json.get("train_size"),
            "prompt_tokens": _prompt_tokens(recommender, samples),
            "paths": rows,
        }
        for name, row in rows.items():
            print(
                f"{expected} {name:>12}: {row['requests_per_s']:7.2f} requests/s ({row['seconds']:.1f} s, peak "
                f"{row['peak_mib']:.0f} MiB, predict is {row['speedup_of_predict']:.2f}x faster, max |score "
                f"difference| {row['max_abs_score_difference_to_predict']:.1e})",
                flush=True,
            )
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished reclora run (python -m reclora.train --method reclora)")
    parser.add_argument("--lora-run", help="a finished lora run, for the PEFT comparison")
    parser.add_argument("--requests", type=int, default=128, help="test samples of the run scored by every path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="passes of every path, in turn; medians are reported")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: as the run was trained)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not (args.run or args.lora_run):
        parser.error("give --run and/or --lora-run")
    result = run(args)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
