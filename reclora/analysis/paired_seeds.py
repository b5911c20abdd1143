"""A change measured over seeds: one pair of runs a seed (the run with the change, its base), each
pair on the same test samples.

For each pair: each run's validation AUC (what a decision reads: at each validation, the one kept
and, for --crm-fusion runs, the fused readout's), the test AUC of the readout of each run and the
difference; for --crm-fusion runs also the LLM alone (its margin without the CRM: RecLoRA's own
readout), and each run's LLM alone and readout against the CRM inside it. Over the pairs: the mean
of the differences and the 95% interval of the mean of their paired bootstrap draws (each pair drawn
with its run's seed), and each run family's mean AUC with its standard deviation over the seeds:
what RESULTS.md's over-seed tables report.

  python -m reclora.analysis.paired_seeds runs/ml100k \\
      --pair fusion-allproj-reclora-seed0 fusion-reclora-seed0 \\
      --pair fusion-allproj-reclora-seed1 fusion-reclora-seed1 --json docs/results/over-seeds.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from reclora.analysis.study import interval, paired_bootstrap, scored
from reclora.files import write_json
from reclora.metrics import auc
from reclora.train.outputs import RunDirectory

# (name, first score, second score, whose): "base" compares the changed run's first score with the
# base's second, "own" both scores within the changed run, "base_own" both within the base. "llm" is
# the LLM's own score (see _score).
COMPARISONS = (
    ("readout minus base", "prob", "prob", "base"),
    ("LLM alone minus base's LLM alone", "llm", "llm", "base"),
    ("LLM alone minus its own CRM", "llm_prob", "crm_prob", "own"),
    ("base's LLM alone minus its own CRM", "llm_prob", "crm_prob", "base_own"),
    ("readout minus its own CRM", "prob", "crm_prob", "own"),
)


def load(directory: Path, name: str) -> tuple:
    """(results.json, predictions) of a finished run; a ValueError names what is missing or damaged."""
    if not (directory / name / "results.json").is_file():
        raise ValueError(f"{name!r} is not a finished run under {directory} (no results.json)")
    run = RunDirectory(directory / name)
    return run.load_results(), run.read_predictions()  # damaged files: UnreadableFile, a ValueError


def _score(predictions: dict, score: str):
    """predictions' column `score`; "llm" is the LLM's own score (its margin alone in a --crm-fusion
    run, else the run's P(Yes)); None when the run has no such column."""
    if score == "llm":
        score = "llm_prob" if "llm_prob" in predictions else "prob"
    return scored(predictions, score) if score in predictions else None


def pair_differences(changed: dict, base: dict, seed: int) -> dict:
    """{comparison: (AUC difference, bootstrap draws)} for one pair, the comparisons both runs allow."""
    out = {}
    runs = {"base": (changed, base), "own": (changed, changed), "base_own": (base, base)}
    for name, mine, theirs, whose in COMPARISONS:
        if name == "LLM alone minus base's LLM alone" and "llm_prob" not in changed and "llm_prob" not in base:
            continue  # neither is fused: the readout row says it already
        first, second = runs[whose]
        a, b = _score(first, mine), _score(second, theirs)
        if a is None or b is None:
            continue
        draws = paired_bootstrap(a, b, seed=seed)
        if draws is None:
            raise ValueError("the two runs of a pair must share their test samples")
        out[name] = (auc(a["label"], a["prob"]) - auc(b["label"], b["prob"]), np.asarray(draws, dtype=float))
    return out


def validation(results: dict) -> dict:
    """A run's validation AUC: at each validation (of the LLM alone), the kept one, and under
    --crm-fusion the fused readout's at the weight it chose."""
    out = {
        "per_validation": [entry.get("valid_auc") for entry in results.get("epochs", [])],
        "kept": results.get("valid_auc"),
    }
    if "crm_fusion" in results:
        out["fused"] = results["crm_fusion"]["auc"]
    return out


def summarize(directory: Path, pairs: list) -> dict:
    """Each pair's differences and, over the pairs, their mean with the interval of the mean draws."""
    per_pair, draws = [], {}
    family_aucs = {"changed": {}, "base": {}}
    for changed_name, base_name in pairs:
        changed_results, changed = load(directory, changed_name)
        base_results, base = load(directory, base_name)
        seed = int(changed_results.get("config", {}).get("seed", changed_results.get("seed", 0)))
        differences = pair_differences(changed, base, seed)
        row = {"changed": changed_name, "base": base_name, "seed": seed}
        row["changed_valid"], row["base_valid"] = validation(changed_results), validation(base_results)
        for role, predictions in (("changed", changed), ("base", base)):
            aucs = {"readout": auc(predictions["label"], predictions["prob"])}
            for column in ("llm_prob", "crm_prob"):
                if column in predictions:
                    aucs[column.removesuffix("_prob")] = auc(predictions["label"], predictions[column])
            row[f"{role}_auc"] = aucs
            for key, value in aucs.items():
                family_aucs[role].setdefault(key, []).append(value)
        for name, (difference, boot) in differences.items():
            row[name] = {"auc_difference": difference, "paired_bootstrap_95": interval(boot)}
            draws.setdefault(name, []).append((difference, boot))
        per_pair.append(row)
    over = {
        name: {
            "pairs": len(entries),
            "mean_auc_difference": float(np.mean([d for d, _ in entries])),
            "paired_bootstrap_95": interval(np.mean([boot for _, boot in entries], axis=0)),
        }
        for name, entries in draws.items()
        if len(entries) == len(pairs)  # a comparison some pair cannot make is left out of the summary
    }
    means = {
        role: {
            key: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
            for key, v in aucs.items()
        }
        for role, aucs in family_aucs.items()
    }
    return {"pairs": per_pair, "over_pairs": over, "auc_over_seeds": means}


def _paired(entry: dict, key: str = "auc_difference") -> str:
    lo, hi = entry["paired_bootstrap_95"]
    return f"{entry[key]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _valid(entry: dict) -> str:
    """A run's validation: 0.695, 0.705, 0.706 (kept 0.706; fused 0.750)."""
    text = ", ".join("-" if v is None else f"{v:.3f}" for v in entry["per_validation"])
    kept = "-" if entry["kept"] is None else f"{entry['kept']:.3f}"
    if len(entry["per_validation"]) != 1:
        text += f" (kept {kept})" if text else kept
    return text + (f"; fused {entry['fused']:.3f}" if "fused" in entry else "")


def markdown(summary: dict) -> str:
    names = [name for name, *_ in COMPARISONS if any(name in row for row in summary["pairs"])]
    header = ["pair (seed)", "valid AUC, changed / base", *names]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in summary["pairs"]:
        valid = f"{_valid(row['changed_valid'])} / {_valid(row['base_valid'])}"
        cells = [valid, *(_paired(row[name]) if name in row else "-" for name in names)]
        lines.append(f"| {row['changed']} - {row['base']} ({row['seed']}) | " + " | ".join(cells) + " |")
    over = summary["over_pairs"]
    cells = ["", *(_paired(over[name], "mean_auc_difference") if name in over else "-" for name in names)]
    lines.append(f"| **over {len(summary['pairs'])} pairs** | " + " | ".join(cells) + " |")
    for role, aucs in summary["auc_over_seeds"].items():
        text = ", ".join(
            f"{key} {v['mean']:.4f}" + (f" ± {v['std']:.4f}" if v["std"] is not None else "") for key, v in aucs.items()
        )
        lines.append(f"\n{role} runs, test AUC over seeds: {text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the folder holding the runs (each a reclora.train --out)")
    parser.add_argument(
        "--pair", nargs=2, action="append", required=True, metavar=("CHANGED", "BASE"), help="one pair a seed"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.directory, args.pair)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(summary))
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
