"""Do the prompts' answers move together? Per-prompt gradients of the Yes/No margin at the start.

For n prompts of a method's training subset, g_i is the gradient of prompt i's margin (logit_Yes -
logit_No, the logit of the scored P(Yes)) with respect to the trainable parameters as initialized,
i.e. what the first optimizer step sees. Reported: the pairwise cosines of the g_i; the norm of
their mean (the shared part) against the mean norm of what is left (g_i minus the mean); and the
norm of the positives' mean gradient minus the negatives' (what a step on the labels can use to
tell them apart) against the shared part. Cosines near 1 mean that any step moves every margin by
about the same amount, so a batch's label noise, through the shared part, outweighs what differs
between prompts (the reason for `--loss yes-no-centered`, reclora.readout).

  python -m reclora.analysis.margin_gradients --data-dir ../shared/data/ml-100k --samples 16 \\
      --json docs/results/ml100k-margin-gradients.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reclora.files import write_json
from reclora.progress import progress_bar
from reclora.train import make_config
from reclora.train.pipeline import build_model, load_run_dataset, subsets


def margin_gradients(model, samples, bf16=False) -> torch.Tensor:
    """(n, P) float32: each sample's margin gradient over the model's P trainable parameters (eval mode)."""
    params = model.trainable_parameters()
    model.eval()
    rows = []
    for sample in progress_bar(samples, desc="margin gradients", unit="prompt"):
        batch = model.prepare([sample])
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)
        margin = (logits[0, model.readout.yes_id] - logits[0, model.readout.no_id]).float()
        grads = torch.autograd.grad(margin, params, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
            )
        )
    return torch.stack(rows)


def alignment(grads: torch.Tensor, labels: np.ndarray) -> dict:
    """How much of the per-sample gradients (n, P) is shared, and how much tells the labels apart."""
    n = grads.shape[0]
    unit = F.normalize(grads, dim=1)
    cosines = (unit @ unit.T)[~torch.eye(n, dtype=torch.bool)]
    shared = grads.mean(0)
    rest = (grads - shared).norm(dim=1).mean()
    positive = torch.from_numpy(np.asarray(labels).astype(bool))
    result = {
        "samples": n,
        "positives": int(positive.sum()),
        "cosine": {"mean": cosines.mean().item(), "min": cosines.min().item(), "max": cosines.max().item()},
        "shared_norm": shared.norm().item(),
        "remainder_norm_mean": rest.item(),
        "remainder_over_shared": (rest / shared.norm()).item(),
    }
    if positive.any() and (~positive).any():
        contrast = grads[positive].mean(0) - grads[~positive].mean(0)
        result["label_contrast_over_shared"] = (contrast.norm() / shared.norm()).item()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--method", default="lora", choices=("lora", "rella"), help="whose adapters and prompt")
    parser.add_argument("--samples", type=int, default=16, help="the first n of the method's training subset")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast, as the trainer's --bf16")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    if args.samples < 2:
        parser.error(f"--samples must be at least 2, got {args.samples}")
    config = make_config(
        {
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "llm": args.llm,
            "method": args.method,
            "train_size": args.samples,
            "seed": args.seed,
        }
    )
    dataset = load_run_dataset(config)
    samples = subsets(config, dataset)["train"]
    model = build_model(config, dataset, None, None, torch.device("cpu"))
    result = alignment(margin_gradients(model, samples, args.bf16), dataset.samples.label[samples])
    result.update(method=args.method, seed=args.seed, bf16=args.bf16)
    cos = result["cosine"]
    print(
        f"{result['samples']} prompts ({result['positives']} positive): pairwise cosine mean {cos['mean']:.3f} "
        f"(min {cos['min']:.3f}, max {cos['max']:.3f}); remainder / shared {result['remainder_over_shared']:.3f}; "
        f"label contrast / shared {result.get('label_contrast_over_shared', float('nan')):.3f}"
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
