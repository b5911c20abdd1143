"""`python -m benchmarks.scaling`: the Long-Short study, cost per training sample against history length.

  python -m benchmarks.scaling [--llm smollm2-135m|tiny-llama|llama-1b|PATH] [--device cpu|cuda]
                               [--dtype ...] [--lengths 10 30 100 ...] [--batch-size B]
                               [--steps N] [--warmup W] [--max-seconds S] [--json OUT] [--png OUT]

One RecLoRA model (fused ops: PersonalizedLLM, K = 16, r = 8, and a frozen SIM CRM with
K_long = 60), trained on B samples whose user history has N behaviours (random items of the
synthetic dataset, random ratings), N from 10 to 10,000, in two ways:
  (a) prompt: the N behaviours go into the LLM prompt as text (N history lines); the CRM sees
      the last 60. The prompt grows with N; once it no longer fits the model's context
      (max_position_embeddings), (a) stops: the JSON says at which N and how many tokens, and
      the largest N that fits (found by tokenizing, not timed).
  (b) long-short: the prompt keeps K_short = 10 behaviours, picked by the Long-Short retriever
      (retrieve_topk of the target's text embedding over the N items' embeddings, top 60, first
      10 back in chronological order); the CRM (SIM) sees all N through retrieve_topk (top 60)
      then DIN attention.
A timed step is the whole per-batch pipeline: retrieval (b), prompt rendering and tokenization,
the frozen CRM forward, the LLM forward, the loss, backward and the AdamW step. Steps of (a) and
(b) alternate at each N. Per N: W warm-up steps (skipped once a step takes longer than 5 s),
then --steps steps, for (a) fewer when they would pass --max-seconds per N (at least one): every point is
measured, none extrapolated; the JSON records the count. Reported: the median time per sample
(step time / B).
"""

import argparse
import functools
import json
import os
import statistics
import time

import numpy as np
import torch

import reclora_kernels as rk
from benchmarks.environment import RESULTS, describe
from benchmarks.timing import stats, timed_ms
from benchmarks.workload import DTYPES, RECLORA, build_llm, history_prompt, synthetic_history
from reclora.adapters import AdapterConfig, PersonalizedLLM
from reclora.crm import build_crm
from reclora.crm.features import CrmInputs
from reclora.data import load_dataset
from reclora.item_embeddings import bow_embeddings, item_sentences
from reclora.llm import SMOLLM2
from reclora.prompt import PromptBuilder
from reclora.readout import YesNoReadout
from reclora.retriever import LongShortRetriever

LENGTHS = [10, 30, 100, 300, 1000, 3000, 10000]
K_LONG, K_SHORT = 60, 10


class Study:
    def __init__(self, args):
        self.device, self.batch_size = args.device, args.batch_size
        dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
        self.dtype = dtype
        self.dataset = load_dataset("synthetic", progress=False)
        llm, self.tokenizer = build_llm(args.llm, dtype, args.device, args.seed, args.tokenizer)
        self.context = int(llm.config.max_position_embeddings)
        torch.manual_seed(args.seed)
        self.model = PersonalizedLLM(llm, AdapterConfig(**RECLORA)).train()
        params = [p for _, p in self.model.named_adapter_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.readout = YesNoReadout.from_tokenizer(self.tokenizer)
        self.builder = PromptBuilder(self.tokenizer, max_length=10**9)  # no cut: (a) measures the whole prompt
        self.crm_inputs = CrmInputs(self.dataset, history_slots=None)
        self.crm = build_crm("sim", self.crm_inputs, hidden=RECLORA["gate_input_dim"], k_long=K_LONG)
        self.crm = self.crm.to(args.device).eval().requires_grad_(False)
        # the retriever's item table: L2-normalized text embeddings (hashed bag of words: no LLM pass needed)
        retriever = LongShortRetriever(self.dataset, bow_embeddings(item_sentences(self.dataset)), K_LONG, K_SHORT)
        self.table = retriever.table.to(args.device)
        self.rng = np.random.default_rng(args.seed)
        samples = self.rng.choice(self.dataset.split("train"), self.batch_size, replace=False)
        self.samples = samples
        self.targets = self.dataset.samples.item[samples]
        self.last_tokens = {}
        self.history_ms = {"a": [], "b": []}  # retrieval + CRM forward per step
        self.labels = torch.from_numpy(self.dataset.samples.label[samples].astype(np.float32)).to(args.device)

    def _clock(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def histories(self, length):
        """(B, N) item ids and ratings, oldest first."""
        pairs = [synthetic_history(self.dataset, self.rng, length) for _ in range(self.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def crm_batch(self, items, ratings):
        """The CRM's batch for these samples with the given history (HistoryBatch layout)."""
        lengths = np.full(items.shape[0], items.shape[1], dtype=np.int64)
        return self.crm_inputs.batch(self.samples, self.device, history=(items, ratings, lengths))

    def prompt_tokens(self, items, ratings):
        return [
            len(ids)
            for ids in self.builder.token_ids(
                [history_prompt(self.dataset, i, r, t) for i, r, t in zip(items, ratings, self.targets)]
            )
        ]

    def train(self, prompts, crm_batch, way, retrieval_ms=0.0):
        batch = {k: v.to(self.device) for k, v in self.builder.encode(prompts).items()}
        start = self._clock()
        with torch.no_grad():
            features = self.crm.represent(crm_batch)
        self.history_ms[way].append(retrieval_ms + (self._clock() - start) * 1e3)
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(batch["input_ids"], batch["attention_mask"], gate_features=features)
        self.readout.loss(logits, self.labels).backward()
        self.optimizer.step()
        self.last_tokens[way] = batch["input_ids"].shape[1]

    def step_prompt(self, items, ratings):
        """(a): every behaviour in the prompt; the CRM sees the last K_LONG."""
        prompts = [history_prompt(self.dataset, i, r, t) for i, r, t in zip(items, ratings, self.targets)]
        return self.train(prompts, self.crm_batch(items[:, -K_LONG:], ratings[:, -K_LONG:]), "a")

    def step_long_short(self, items, ratings):
        """(b): the retriever picks K_SHORT for the prompt; the CRM (SIM) searches all N."""
        start = self._clock()
        ids = torch.from_numpy(items).to(self.device)
        lengths = torch.full((items.shape[0],), items.shape[1], dtype=torch.long, device=self.device)
        query = self.table[torch.from_numpy(self.targets).to(self.device)]
        _, positions = rk.retrieve_topk(query, self.table, K_LONG, lengths=lengths, ids=ids)
        short = positions[:, :K_SHORT].sort(1).values.cpu().numpy()  # chronological
        retrieval_ms = (self._clock() - start) * 1e3
        prompts = [
            history_prompt(self.dataset, items[b, p], ratings[b, p], self.targets[b]) for b, p in enumerate(short)
        ]
        return self.train(prompts, self.crm_batch(items, ratings), "b", retrieval_ms)

    def max_fitting_lines(self, items, ratings, hi):
        """The largest number of history lines whose prompt (the longest in the batch) fits the context."""
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if max(self.prompt_tokens(items[:, -mid:], ratings[:, -mid:])) <= self.context:
                lo = mid
            else:
                hi = mid - 1
        return lo


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    load = {"before": os.getloadavg()}
    study = Study(args)
    rows, stop = [], None
    for length in args.lengths:
        items, ratings = study.histories(length)
        row = {"N": length}
        tokens_a = max(study.prompt_tokens(items, ratings))
        row["a_prompt_tokens"] = tokens_a
        run_a = stop is None and tokens_a <= study.context
        if stop is None and not run_a:
            stop = {
                "N": length,
                "prompt_tokens": tokens_a,
                "context": study.context,
                "max_lines_fitting": study.max_fitting_lines(items, ratings, length),
            }
            print(
                f"(a) stops at N={length}: {tokens_a} tokens > context {study.context} "
                f"(at most {stop['max_lines_fitting']} lines fit)",
                flush=True,
            )
        # (a) and (b) alternate step by step
        times = {"a": [], "b": []}
        fns = {"a": study.step_prompt, "b": study.step_long_short} if run_a else {"b": study.step_long_short}
        for fn in fns.values():
            for _ in range(args.warmup):
                if timed_ms(functools.partial(fn, items, ratings), study.device) > 5000:
                    break
        study.history_ms = {"a": [], "b": []}
        for i in range(args.steps):  # (b) takes every step; (a) while its time budget lasts (at least one)
            for name, fn in fns.items():
                spent = sum(times[name]) / 1e3
                if times[name] and spent * (i + 1) / i > args.max_seconds:
                    continue
                times[name].append(timed_ms(functools.partial(fn, items, ratings), study.device))
        if run_a:
            row["a_ms_per_sample"] = stats(times["a"])["median_ms"] / study.batch_size
            row["a"] = stats(times["a"])
        row["b_prompt_tokens"] = study.last_tokens["b"]
        row["b_ms_per_sample"] = stats(times["b"])["median_ms"] / study.batch_size
        row["b"] = stats(times["b"])
        # the part that reads the history: retrieval (b) and the CRM forward, in the same steps
        row["b_history_ms_per_sample"] = statistics.median(study.history_ms["b"]) / study.batch_size
        if run_a:
            row["a_history_ms_per_sample"] = statistics.median(study.history_ms["a"]) / study.batch_size
        rows.append(row)
        print(
            f"N={length}: (a) {row.get('a_ms_per_sample', float('nan')):.1f} ms/sample ({tokens_a} tokens), "
            f"(b) {row['b_ms_per_sample']:.1f} ms/sample ({row['b_prompt_tokens']} tokens, retrieval + CRM "
            f"{row['b_history_ms_per_sample']:.2f} ms)",
            flush=True,
        )
    b = [r["b_ms_per_sample"] for r in rows]
    load["after"] = os.getloadavg()
    result = {
        "benchmark": "scaling",
        "environment": describe(),
        "llm": args.llm,
        "device": args.device,
        "dtype": str(study.dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "context": study.context,
        "k_long": K_LONG,
        "k_short": K_SHORT,
        "reclora": RECLORA,
        "crm": "SIM (retrieve_topk top-60 over the history, then DIN attention), frozen, random weights",
        "method": {
            "step": "retrieval (b) + prompt rendering and tokenization + frozen CRM forward + LLM forward, loss,"
            " backward, AdamW step; time per sample = median step time / batch size",
            "interleaving": "(a) and (b) alternate step by step at each N",
            "warmup_steps": args.warmup,
            "max_steps": args.steps,
            "max_seconds_per_N": args.max_seconds,
        },
        "rows": rows,
        "a_stops": stop,
        "b_max_over_min": max(b) / min(b),
        "b_max_over_first": max(b) / b[0],
        "b_within_10pct_of_flat": max(b) / b[0] <= 1.10,
        "b_history_ms_per_sample": {r["N"]: r["b_history_ms_per_sample"] for r in rows},
        "loadavg": load,
    }
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    a = [(r["N"], r["a_ms_per_sample"]) for r in rows if "a_ms_per_sample" in r]
    b = [(r["N"], r["b_ms_per_sample"]) for r in rows]
    ax.plot(*zip(*a), marker="o", label="(a) history in the prompt")
    ax.plot(*zip(*b), marker="s", label=f"(b) K_short={K_SHORT} in the prompt, N to the CRM (SIM)")
    stop = result["a_stops"]
    if stop:
        ax.axvline(
            stop["max_lines_fitting"],
            color="grey",
            linestyle="--",
            label=f"(a) leaves the {stop['context']}-token context (N > {stop['max_lines_fitting']})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("user history length N (behaviours)")
    ax.set_ylabel("training time per sample (ms)")
    env = result["environment"]
    where = env.get("gpu") or "CPU"
    ax.set_title(
        f"{result['llm']}, {where}, {result['dtype']}, batch {result['batch_size']}, {env['date']}", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=SMOLLM2, help="as benchmarks.e2e's --llm")
    parser.add_argument("--tokenizer", default=None, help="as benchmarks.e2e's --tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time budget per N (at least one step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    date, llm = result["environment"]["date"], os.path.basename(str(args.llm).rstrip("/"))
    card = "" if args.device == "cpu" else "-" + torch.cuda.get_device_name().replace(" ", "_")
    stem = f"{args.device}{card}-scaling-e2e-{llm}-{date}"
    os.makedirs(RESULTS, exist_ok=True)
    json_path = args.json or os.path.join(RESULTS, stem + ".json")
    png_path = args.png or os.path.join(RESULTS, stem + ".png")
    result["plot"] = os.path.basename(png_path)
    plot(result, png_path)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("a_stops", "b_max_over_first", "b_within_10pct_of_flat")}, indent=2))
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
