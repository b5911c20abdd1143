"""`python -m reclora.analysis.gates RUN_DIR`: do a reclora run's gates give each sample its own mix?

Reads RUN_DIR's settings, CRM and checkpoint's best adapters (those the results were computed
with; the last step's before the first validation), runs the gate inputs (CRM or user embedding)
and the gate bank over the run's test subset (the LLM is loaded but never run), and reports,
for the gates at initialization (seeded as the run was) and after training, averaged over the
adapted slots:
  entropy  mean H(alpha) / log K: 1 is the uniform mix, 0 a single meta-LoRA per sample;
  top      mean of the largest alpha_k;
  spread   mean total-variation distance between a sample's alpha and the mean alpha over the
           samples: 0 means every sample gets the same mix (the gate collapsed to a constant,
           and the model is one LoRA); 1 - 1/K is the most it can be;
  usage    normalized entropy of the mean alpha: below 1 when some meta-LoRAs are used less.
Writes RUN_DIR/gates.json as well.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from reclora.files import write_json
from reclora.train import distributed
from reclora.train.config import completed_settings, make_config
from reclora.train.crm_stage import prepare_crm
from reclora.train.loop import load_trainable_state
from reclora.train.outputs import RunDirectory
from reclora.train.pipeline import build_model, crm_held_out, load_run_dataset, subsets

STATISTICS = ("entropy", "top", "spread", "usage")


def gate_statistics(alpha: torch.Tensor) -> dict:
    """alpha: (S, N, K) rows summing to 1 -> the statistics above, means over slots, plus per slot."""
    alpha = alpha.double()
    k = alpha.shape[-1]
    log_k = math.log(k) if k > 1 else 1.0
    entropy = -(alpha * alpha.clamp_min(1e-30).log()).sum(-1) / log_k  # (S, N)
    mean = alpha.mean(1)  # (S, K)
    spread = 0.5 * (alpha - mean[:, None, :]).abs().sum(-1)  # (S, N)
    usage = -(mean * mean.clamp_min(1e-30).log()).sum(-1) / log_k  # (S,)
    per_slot = {
        "entropy": entropy.mean(1),
        "top": alpha.max(-1).values.mean(1),
        "spread": spread.mean(1),
        "usage": usage,
    }
    out = {name: float(values.mean()) for name, values in per_slot.items()}
    out["per_slot"] = {name: [round(float(v), 6) for v in values] for name, values in per_slot.items()}
    return out


@torch.no_grad()
def run_alpha(model, samples: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """The gates' alpha over samples: (S, N, K), float32 on the CPU."""
    bank = model.llm.gate_bank
    out = []
    for start in range(0, len(samples), batch_size):
        batch = model.gate_batch(samples[start : start + batch_size])
        out.append(bank(model.gate_features(batch)).float().cpu())
    return torch.cat(out, dim=1)


def analyze(run_dir: str | Path, max_samples: int | None = None) -> dict:
    run = RunDirectory(run_dir)
    if not run.config.exists():
        raise FileNotFoundError(f"{run.config} does not exist: RUN_DIR must be a run's --out directory")
    config = make_config(completed_settings(json.loads(run.config.read_text())))
    if not config.method_row.gated:
        raise ValueError(f"{run_dir} is a {config.method!r} run: only gated methods (reclora) have gates")
    if not run.checkpoint.exists():
        raise FileNotFoundError(
            f"{run.checkpoint} does not exist: the run has not trained (or its checkpoint was removed)"
        )
    processes = distributed.start("cpu")
    try:
        dataset = load_run_dataset(config)
        samples = subsets(config, dataset)["test"][:max_samples]
        crm = inputs = None
        if config.needs_crm:
            held_out = crm_held_out(config, dataset)
            crm, inputs, _ = prepare_crm(config, dataset, run.crm, processes, log=lambda line: None, held_out=held_out)
        model = build_model(config, dataset, crm, inputs, processes.device).eval()
        initial = gate_statistics(run_alpha(model, samples))
        checkpoint = run.load_checkpoint()
        state = checkpoint["state"]
        best = state["best_adapters"] is not None  # the adapters the run's results were computed with
        load_trainable_state(model, state["best_adapters"] if best else checkpoint["adapters"])
        trained = gate_statistics(run_alpha(model, samples))
    finally:
        distributed.stop()
    return {
        "run": str(run_dir),
        "samples": len(samples),
        "num_loras": config.num_loras,
        "temperature": config.temperature,
        "gate_input": config.gate_input,
        "optimizer_step": state["best_step"] if best else state["step"],
        "initial": initial,
        "trained": trained,
    }


def format_report(report: dict) -> str:
    lines = [
        f"{report['run']}: gates of K={report['num_loras']} (T={report['temperature']}, input "
        f"{report['gate_input']}) over {report['samples']:,} test samples, step {report['optimizer_step']}",
        "           " + "".join(f"{name:>10}" for name in STATISTICS),
    ]
    for when in ("initial", "trained"):
        lines.append(f"{when:>10} " + "".join(f"{report[when][name]:>10.4f}" for name in STATISTICS))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a reclora run's --out directory")
    parser.add_argument("--samples", type=int, default=None, help="at most this many test samples (default: all)")
    args = parser.parse_args(argv)
    try:
        report = analyze(args.run_dir, args.samples)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_json(Path(args.run_dir) / "gates.json", report)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
