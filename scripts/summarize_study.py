"""Summarizes a directory of reclora.train runs (scripts/reproduce_ml100k.sh's layout).

For each run: test AUC with a bootstrap 95% interval (resampling the test samples). For each
method run over several seeds: mean and spread (sample standard deviation) of AUC and LogLoss.
For reclora against each other method: the mean AUC difference, its paired bootstrap interval
(the methods share the test subset) and whether it exceeds both the seed spread and the interval.
The Few2Many plot: test AUC against the training-subset size for lora and reclora.

  python scripts/summarize_study.py runs/ml100k --json docs/results/ml100k.json --plot docs/results/ml100k-few2many.png
"""
import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reclora.metrics import auc  # noqa: E402

BOOTSTRAP = 1000
VERDICT = {True: "yes", False: "no", None: "n/a (one seed)"}


def load_runs(directory: Path) -> dict:
    runs = {}
    for results_file in sorted(directory.glob("*/results.json")):
        predictions = np.load(results_file.parent / "predictions.npz")
        runs[results_file.parent.name] = (json.loads(results_file.read_text()), predictions)
    return runs


def bootstrap_aucs(labels, probs, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(BOOTSTRAP, len(labels)))
    return np.array([auc(labels[d], probs[d]) for d in draws])


def interval(values) -> list:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def summarize(runs: dict) -> dict:
    table = {}
    for name, (results, predictions) in runs.items():
        boot = bootstrap_aucs(predictions["label"], predictions["prob"])
        table[name] = {k: results.get(k) for k in ("method", "seed", "train_size", "test_size", "auc", "logloss",
                                                    "accuracy", "gauc", "train_seconds", "eval_seconds",
                                                    "train_samples_per_second", "eval_samples_per_second", "device")}
        table[name]["auc_95"] = interval(boot)
    seeds = defaultdict(list)
    for name in runs:
        match = re.fullmatch(r"(.+)-seed(\d+)", name)
        if match:
            seeds[match.group(1)].append(name)
    over_seeds = {}
    for method, names in seeds.items():
        aucs = np.array([table[n]["auc"] for n in names])
        losses = np.array([table[n]["logloss"] for n in names])
        over_seeds[method] = {"runs": names, "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else None,
                              "logloss_mean": float(losses.mean()), "logloss_std": float(losses.std(ddof=1)) if len(losses) > 1 else None}
    return {"runs": table, "over_seeds": over_seeds, "reclora_vs": compare(runs, seeds, over_seeds),
            "few2many": curve(runs)}


def compare(runs, seeds, over_seeds) -> dict:
    """reclora minus each other method: paired over the shared test samples, seed by seed."""
    if "reclora" not in seeds:
        return {}
    out = {}
    others = [m for m in seeds if m != "reclora"] + [n for n in ("din", "sim", "zero-shot") if n in runs]
    for other in others:
        differences, boots = [], []
        for name in seeds["reclora"]:
            seed = name.rsplit("seed", 1)[1]
            partner = f"{other}-seed{seed}" if other in seeds else other
            if partner not in runs:
                continue
            mine, theirs = runs[name][1], runs[partner][1]
            if not np.array_equal(mine["sample"], theirs["sample"]):
                continue  # not the same test samples: no paired comparison
            rng = np.random.default_rng(int(seed))
            draws = rng.integers(0, len(mine["label"]), size=(BOOTSTRAP, len(mine["label"])))
            boots.append([auc(mine["label"][d], mine["prob"][d]) - auc(theirs["label"][d], theirs["prob"][d]) for d in draws])
            differences.append(runs[name][0]["auc"] - runs[partner][0]["auc"])
        if not differences:
            continue
        mean = float(np.mean(differences))
        ci = interval(np.mean(boots, axis=0))
        spread = max(filter(None, [over_seeds["reclora"]["auc_std"], over_seeds.get(other, {}).get("auc_std")]), default=None)
        # with one seed the spread is unknown, and so is the verdict
        verdict = None if spread is None else bool((ci[0] > 0 or ci[1] < 0) and abs(mean) > spread)
        out[other] = {"auc_difference": mean, "paired_bootstrap_95": ci, "seed_spread": spread,
                      "larger_than_both": verdict}
    return out


def curve(runs) -> dict:
    points = defaultdict(list)
    for name, (results, _) in runs.items():
        match = re.fullmatch(r"curve-(\w+)-(\d+)", name)
        if match:
            points[match.group(1)].append((int(match.group(2)), results["auc"]))
        elif name in ("lora-seed0", "reclora-seed0"):
            points[name.split("-")[0]].append((results["train_size"], results["auc"]))
    return {method: sorted(p) for method, p in points.items()}


def plot(few2many: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    for method, points in sorted(few2many.items()):
        sizes, aucs = zip(*points)
        axis.plot(sizes, aucs, "o-", label=method)
    axis.set_xscale("log")
    axis.set_xlabel("LLM training samples (Few2Many subset)")
    axis.set_ylabel("test AUC")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def markdown(summary: dict) -> str:
    lines = ["| run | train | test | AUC [95% bootstrap] | LogLoss | accuracy | train s | eval s | device |", "|" + "---|" * 9]
    for name, r in summary["runs"].items():
        lo, hi = r["auc_95"]
        lines.append(f"| {name} | {r['train_size']} | {r['test_size']} | {r['auc']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{r['logloss']:.4f} | {r['accuracy']:.4f} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} | {r['device']} |")
    lines += ["", "| method | seeds | AUC mean ± sd | LogLoss mean ± sd |", "|---|---|---|---|"]
    for method, s in summary["over_seeds"].items():
        sd = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {method} | {len(s['runs'])} | {s['auc_mean']:.4f} ± {sd(s['auc_std'])} | "
                     f"{s['logloss_mean']:.4f} ± {sd(s['logloss_std'])} |")
    lines += ["", "| reclora vs | AUC difference | paired 95% interval | seed spread | larger than both |", "|---|---|---|---|---|"]
    for other, c in summary["reclora_vs"].items():
        spread = "n/a" if c["seed_spread"] is None else f"{c['seed_spread']:.4f}"
        lines.append(f"| {other} | {c['auc_difference']:+.4f} | [{c['paired_bootstrap_95'][0]:+.4f}, "
                     f"{c['paired_bootstrap_95'][1]:+.4f}] | {spread} | {VERDICT[c['larger_than_both']]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="write the Few2Many plot here (PNG)")
    args = parser.parse_args(argv)
    runs = load_runs(args.directory)
    if not runs:
        print(f"error: no finished run (results.json) under {args.directory}", file=sys.stderr)
        return 2
    summary = summarize(runs)
    print(markdown(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot and summary["few2many"]:
        plot(summary["few2many"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
