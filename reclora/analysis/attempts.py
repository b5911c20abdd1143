"""Screening attempts against a base run: what each changed, where it ended, and its learning curve.

For each finished run of a directory (each a reclora.train --out), or the runs --runs names: the
settings in which its config.json differs from the base run's, its test AUC with the paired
bootstrap interval of its difference from the base (the runs must share their test samples), and its
validation AUC and training loss at each validation (metrics.jsonl). For --crm-fusion runs also the
LLM alone (against the base, and the base's LLM alone when it is fused too), the readout and the LLM
alone against the CRM inside it, and how alike the LLM ranks the test samples with that CRM and with
the base's LLM (Spearman). The plot overlays the curves, so a reader sees whether an attempt was
still learning when it stopped.

  python -m reclora.analysis.attempts runs/screen --base lora-s1-base --json docs/results/screen.json \\
      --plot docs/results/screen-curves.png
  python -m reclora.analysis.attempts runs/ml100k --base fusion-reclora-seed0 --runs fusion-epochs3-reclora-seed0
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from reclora.analysis.study import interval, load_runs, paired_bootstrap, rank_correlation, scored
from reclora.files import write_json
from reclora.metrics import auc
from reclora.train.config import TrainConfig, as_stored, completed_settings
from reclora.train.outputs import RunDirectory

# Settings that name or place a run rather than change what it learns.
NOT_A_SETTING = {"out", "resume", "overwrite", "progress", "cache_dir", "checkpoint_every", "device"}


def changed_settings(config: dict, base: dict) -> dict:
    """{setting: value} where config differs from base. A setting added after one of the runs was
    written counts as it was then (completed_settings)."""
    defaults = as_stored(TrainConfig().to_dict())
    config, base = completed_settings(config, defaults), completed_settings(base, defaults)
    keys = (set(config) | set(base)) - NOT_A_SETTING
    return {key: config.get(key) for key in sorted(keys) if config.get(key) != base.get(key)}


def curve(run_dir: Path) -> list:
    """[(step, train_loss, valid_auc)] at each validation of the run."""
    rows = RunDirectory(run_dir).read_metrics()
    return [(row["step"], row.get("train_loss"), row.get("valid_auc")) for row in rows if "step" in row]


def summarize(directory: Path, base: str, only: list | None = None) -> dict:
    """Every finished run of directory against base, or only the runs named (and the base)."""
    runs = load_runs(directory)
    for name in [base, *(only or [])]:
        if name not in runs:
            raise ValueError(f"{name!r} is not a finished run under {directory} (found: {sorted(runs)})")
    if only:
        runs = {name: runs[name] for name in runs if name == base or name in only}
    base_results, base_predictions = runs[base]
    out = {"base": base, "runs": {}}
    for name, (results, predictions) in sorted(runs.items()):
        row = {
            "changed": changed_settings(results["config"], base_results["config"]),
            "auc": results["auc"],
            "logloss": results["logloss"],
            "valid_auc": results.get("valid_auc"),
            "best_step": results.get("best_step"),
            "test_samples": len(predictions["label"]),
            "curve": curve(directory / name),
        }
        if name != base:
            row.update(_against_base(predictions, "prob", base_predictions))
            if "llm_prob" in predictions:  # --crm-fusion: the LLM's margin alone, against the base too
                row["llm_alone"] = _against_base(predictions, "llm_prob", base_predictions)
                if "llm_prob" in base_predictions:  # both fused: their LLMs alone, paired
                    row["llm_against_base_llm"] = _against_base(predictions, "llm_prob", base_predictions, "llm_prob")
            if np.array_equal(predictions["sample"], base_predictions["sample"]):  # do the two LLMs rank alike?
                row["llm_rank_correlation_with_base"] = rank_correlation(
                    _llm_score(predictions), _llm_score(base_predictions)
                )
        if "crm_prob" in predictions:  # --crm-fusion: the readout against the CRM inside it, paired in-run
            row["against_own_crm"] = _against_base(predictions, "prob", predictions, "crm_prob")
            row["llm_against_own_crm"] = _against_base(predictions, "llm_prob", predictions, "crm_prob")
            row["llm_rank_correlation_with_crm"] = rank_correlation(predictions["llm_prob"], predictions["crm_prob"])
        out["runs"][name] = row
    return out


def _llm_score(predictions) -> np.ndarray:
    """The LLM's own score: its margin alone in a --crm-fusion run, else the run's P(Yes)."""
    return predictions["llm_prob"] if "llm_prob" in predictions else predictions["prob"]


def _against_base(predictions, score: str, base_predictions, base_score: str = "prob") -> dict:
    """The AUC of predictions[score], its difference from base_predictions[base_score]'s and the paired
    bootstrap interval."""
    mine, base = scored(predictions, score), scored(base_predictions, base_score)
    draws = paired_bootstrap(mine, base)
    mine_auc, base_auc = auc(mine["label"], mine["prob"]), auc(base["label"], base["prob"])
    return {
        "auc_difference": mine_auc - base_auc,
        "paired_bootstrap_95": None if draws is None else interval(np.array(draws, dtype=float)),
        **({"auc": mine_auc} if score != "prob" else {}),
    }


def _paired(entry: dict) -> str:
    """An AUC difference and its paired interval: +0.0031 [+0.0016, +0.0048]."""
    lo, hi = entry["paired_bootstrap_95"]
    return f"{entry['auc_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def markdown(summary: dict) -> str:
    lines = [
        f"| run | changed from {summary['base']} | test AUC | minus base [paired 95%] | LogLoss | "
        "valid AUC per validation | train loss per validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["runs"].items():
        changed = ", ".join(f"{k}={v}" for k, v in row["changed"].items()) or "-"
        if "auc_difference" not in row:
            difference = "(base)"
        elif row["paired_bootstrap_95"] is None:
            difference = f"{row['auc_difference']:+.4f} (test samples differ)"
        else:
            difference = _paired(row)
        if row.get("llm_alone", {}).get("paired_bootstrap_95"):
            difference += f"; its LLM alone {row['llm_alone']['auc']:.4f}: {_paired(row['llm_alone'])}"
        if row.get("llm_against_base_llm", {}).get("paired_bootstrap_95"):
            difference += f" ({_paired(row['llm_against_base_llm'])} against the base's LLM alone)"
        if row.get("against_own_crm", {}).get("paired_bootstrap_95"):
            difference += f"; minus its own CRM {_paired(row['against_own_crm'])}"
            difference += f" (its LLM alone {_paired(row['llm_against_own_crm'])})"
        if "llm_rank_correlation_with_crm" in row:
            difference += f"; its LLM's rank correlation with the CRM {row['llm_rank_correlation_with_crm']:.2f}"
        if "llm_rank_correlation_with_base" in row:
            difference += f", with the base's LLM {row['llm_rank_correlation_with_base']:.2f}"
        valid = " / ".join("-" if v is None else f"{v:.3f}" for _, _, v in row["curve"])
        loss = " / ".join("-" if v is None else f"{v:.3f}" for _, v, _ in row["curve"])
        lines.append(
            f"| {name} | {changed} | {row['auc']:.4f} | {difference} | {row['logloss']:.4f} | {valid} | {loss} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in summary["runs"].items():
        points = [(s, loss, v) for s, loss, v in row["curve"] if loss is not None and v is not None]
        if not points:
            continue
        steps, losses, aucs = zip(*points)
        loss_axis.plot(steps, losses, "o-", label=name)
        auc_axis.plot(steps, aucs, "o-", label=name)
    loss_axis.set(xlabel="optimizer step", ylabel="training loss (mean since the last validation)")
    auc_axis.set(xlabel="optimizer step", ylabel="validation AUC")
    auc_axis.axhline(0.5, color="gray", linestyle=":")
    for axis in (loss_axis, auc_axis):
        axis.grid(alpha=0.3)
    auc_axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--base", required=True, help="the run the others are compared with")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="only these runs against the base (default: all)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="write the curves here (PNG)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.directory, args.base, args.runs)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(summary))
    if args.json:
        write_json(args.json, summary)
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
