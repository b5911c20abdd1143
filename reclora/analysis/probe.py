"""Does the untuned LLM already hold the answer? A linear probe on its last hidden state.

The readout (P(Yes) from the Yes/No logits) is a linear function of the last position's hidden
state. A logistic regression on that frozen state, fit on the LLM's training subset and its L2
strength chosen on the validation subset, measures how much of the label the prompt's encoding
already carries before any tuning; a tuned LoRA that ends below the probe is an optimization
problem, not a missing signal. Prompts, subsets and seeds are the trainer's (--history recent:
lora's prompt; semantic: rella's and reclora's).

  python -m reclora.analysis.probe --data-dir ../shared/data/ml-100k --train-size 2000 --valid-size 500 \\
      --eval-size 1000 --bf16 --json docs/results/ml100k-probe.json
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from reclora.files import write_json
from reclora.llm import last_hidden_state
from reclora.metrics import auc
from reclora.progress import progress_bar
from reclora.retriever import STRATEGIES
from reclora.train import make_config
from reclora.train.pipeline import build_model, load_run_dataset, subsets

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def last_hidden_states(model, samples, batch_size=32, bf16=False, desc="") -> np.ndarray:
    """(N, d) float32: the untuned LLM's last hidden state of each sample's prompt."""
    rows = []
    for begin in progress_bar(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        batch = model.prepare(samples[begin : begin + batch_size])
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = last_hidden_state(model.llm, batch["input_ids"], batch["attention_mask"])
        rows.append(hidden.float().cpu().numpy())
    return np.concatenate(rows)


def fit_logistic(features, labels, l2, steps=200) -> torch.nn.Linear:
    """L2-regularized logistic regression (full-batch L-BFGS) on standardized features."""
    x, y = torch.from_numpy(features), torch.from_numpy(labels.astype(np.float32))
    linear = torch.nn.Linear(x.shape[1], 1, dtype=torch.float32)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(1), y)
        loss = loss + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def probe(config, bf16=False) -> dict:
    dataset = load_run_dataset(config)
    parts = subsets(dataclasses.replace(config, method="lora"), dataset)  # lora's training subset, by seed
    model = build_model(config, dataset, None, None, torch.device("cpu")).eval()
    features = {
        split: last_hidden_states(model, parts[split], bf16=bf16, desc=f"encoding {split} prompts")
        for split in ("train", "valid", "test")
    }
    labels = {split: dataset.samples.label[parts[split]] for split in features}
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    scaled = {split: (f - mean) / std for split, f in features.items()}
    rows = []
    for l2 in L2_GRID:
        linear = fit_logistic(scaled["train"], labels["train"], l2)
        with torch.no_grad():
            scores = {s: linear(torch.from_numpy(scaled[s])).squeeze(1).numpy() for s in scaled}
        rows.append({"l2": l2, **{f"{s}_auc": auc(labels[s], scores[s]) for s in scaled}})
    best = max(rows, key=lambda row: row["valid_auc"])  # chosen on validation, never on test
    return {
        "prompt_history": config.history_strategy,
        "sizes": {split: len(parts[split]) for split in parts},
        "seed": config.seed,
        "eval_seed": config.eval_seed,
        "bf16": bf16,
        "grid": rows,
        "chosen_l2": best["l2"],
        "test_auc": best["test_auc"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--history", default="recent", choices=STRATEGIES, help="the prompt's history (lora: recent)")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--valid-size", type=int, default=500)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="encode under bf16 autocast, as the trainer's --bf16")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "bf16", "history")}
    # zero-shot: the untuned LLM, with the history of the method whose prompt is probed
    config = make_config({**settings, "method": "zero-shot", "prompt_history": args.history})
    result = probe(config, bf16=args.bf16)
    for row in result["grid"]:
        print(
            f"l2 {row['l2']:g}: AUC train {row['train_auc']:.4f}  valid {row['valid_auc']:.4f}  test {row['test_auc']:.4f}"
        )
    print(f"chosen on validation: l2 {result['chosen_l2']:g}, test AUC {result['test_auc']:.4f}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
