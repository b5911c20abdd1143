"""Summarizes a directory of reclora.train runs (scripts/reproduce_ml100k.sh's layout).

For each run: test AUC with a bootstrap 95% interval (resampling the test samples). For each
method run over several seeds: mean and spread (sample standard deviation) of AUC and LogLoss.
For reclora against each other method: the mean AUC difference, its paired bootstrap interval
(the methods share the test subset) and whether it exceeds both the seed spread and the interval.
Each attempt-* run over seeds (attempt-NAME-seedS) against the CRMs, the same way; each recipe-*
run over seeds (recipe-METHOD-seedS, issue 16's training recipe) against the published recipe's
METHOD-seedS, seed by seed, and against the CRMs; each residual-* run (residual-METHOD-seedS: the
recipe with --crm-residual) against recipe-METHOD-seedS and the CRMs.
For each ablation-* and attempt-* run: its AUC minus reclora's at the same seed (its -seedS suffix,
else seed 0: the same training and test samples), paired bootstrap interval. For each run with a
gates.json (python -m reclora.analysis.gates): the trained gates' statistics. For each run, the rank
correlation of its predictions with SIM's.
The Few2Many curve (table and plot): test AUC against the training-subset size for lora and reclora
at seed 0 (the curve-* runs and METHOD-seed0), with the mean and spread over seeds at the main
runs' size, the CRMs as lines.

  python -m reclora.analysis.study runs/ml100k --json docs/results/ml100k.json --plot docs/results/ml100k-few2many.png
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from reclora.analysis.gates import STATISTICS as GATE_STATISTICS
from reclora.crm import KINDS
from reclora.files import write_json
from reclora.metrics import auc
from reclora.train.outputs import CSV_COLUMNS

# A run's row: results.csv's columns but those the study shares (dataset, LLM) or names (out).
RUN_COLUMNS = tuple(c for c in CSV_COLUMNS if c not in ("dataset", "llm", "out"))
BOOTSTRAP = 1000
VERDICT = {True: "yes", False: "no", None: "n/a (one seed)"}
CRMS = KINDS  # the CRMs alone: one deterministic run each, on the whole training split
# A run family's prefix -> the prefix of the runs it is paired with, seed by seed (and with the CRMs):
# recipe-METHOD-seedS is METHOD-seedS under issue 16's training recipe; residual-METHOD-seedS is
# recipe-METHOD-seedS with --crm-residual; steps-METHOD-seedS is recipe-METHOD-seedS at batch 8 (twice
# the optimizer steps).
PAIRED_FAMILIES = {"recipe-": "", "residual-": "recipe-", "steps-": "recipe-"}


def load_runs(directory: Path) -> dict:
    runs = {}
    for results_file in sorted(directory.glob("*/results.json")):
        predictions = np.load(results_file.parent / "predictions.npz")
        runs[results_file.parent.name] = (json.loads(results_file.read_text()), predictions)
    return runs


def bootstrap_draws(n, seed=0) -> np.ndarray:
    """(BOOTSTRAP, n) indices: resamples of n test samples with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))


def bootstrap_aucs(labels, probs, seed=0) -> np.ndarray:
    return np.array([auc(labels[d], probs[d]) for d in bootstrap_draws(len(labels), seed)])


def rank_correlation(a, b) -> float:
    """Spearman's correlation (ties broken by position): how far a run only relays the CRM's ranking."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def interval(values) -> list:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def summarize(runs: dict) -> dict:
    table = {}
    for name, (results, predictions) in runs.items():
        boot = bootstrap_aucs(predictions["label"], predictions["prob"])
        table[name] = {k: results.get(k) for k in RUN_COLUMNS}
        table[name]["auc_95"] = interval(boot)
        if "sim" in runs and np.array_equal(predictions["sample"], runs["sim"][1]["sample"]):
            table[name]["rank_correlation_with_sim"] = rank_correlation(predictions["prob"], runs["sim"][1]["prob"])
    seeds = defaultdict(list)
    for name in runs:
        method, seed = split_seed(name)
        if seed is not None:
            seeds[method].append(name)
    over_seeds = {}
    for method, names in seeds.items():
        aucs = np.array([table[n]["auc"] for n in names])
        losses = np.array([table[n]["logloss"] for n in names])
        over_seeds[method] = {
            "runs": names,
            "auc_mean": float(aucs.mean()),
            "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else None,
            "logloss_mean": float(losses.mean()),
            "logloss_std": float(losses.std(ddof=1)) if len(losses) > 1 else None,
        }
    crms = [n for n in CRMS if n in runs]
    attempts_vs_crms = {m: compare(runs, seeds, over_seeds, m, crms) for m in seeds if m.startswith("attempt-")}
    recipe_vs = {
        m: compare(runs, seeds, over_seeds, m, [partner + m.removeprefix(prefix), *crms])
        for prefix, partner in PAIRED_FAMILIES.items()
        for m in seeds
        if m.startswith(prefix)
    }
    return {
        "runs": table,
        "over_seeds": over_seeds,
        "reclora_vs": compare(runs, seeds, over_seeds),
        "attempts_vs_crms": {m: c for m, c in attempts_vs_crms.items() if c},
        "recipe_vs": {m: c for m, c in recipe_vs.items() if c},
        "against_reclora": against_reclora(runs),
        "few2many": curve(runs, over_seeds),
    }


def split_seed(name: str) -> tuple:
    """'METHOD-seedS' -> (METHOD, S); a name without the suffix -> (name, None)."""
    match = re.fullmatch(r"(.+)-seed(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def compare(runs, seeds, over_seeds, method="reclora", others=None) -> dict:
    """`method` (run over seeds) minus each other method (default: every other one): paired over the
    shared test samples, seed by seed."""
    if method not in seeds:
        return {}
    out = {}
    if others is None:
        others = [m for m in seeds if m != method] + [n for n in (*CRMS, "zero-shot") if n in runs]
    for other in others:
        differences, boots = [], []
        for name in seeds[method]:
            seed = split_seed(name)[1]
            partner = f"{other}-seed{seed}" if other in seeds else other
            if partner not in runs:
                continue
            boot = paired_bootstrap(runs[name][1], runs[partner][1], seed=seed)
            if boot is None:
                continue  # not the same test samples: no paired comparison
            boots.append(boot)
            differences.append(runs[name][0]["auc"] - runs[partner][0]["auc"])
        if not differences:
            continue
        mean = float(np.mean(differences))
        ci = interval(np.mean(boots, axis=0))
        # The CRMs are one deterministic run each: the method's spread is the spread. A method of the
        # seed sweep run with one seed has an unknown spread, and so is the verdict.
        spreads = [over_seeds[method]["auc_std"]] + ([over_seeds[other]["auc_std"]] if other in seeds else [])
        spread = None if None in spreads else max(spreads)
        verdict = None if spread is None else bool((ci[0] > 0 or ci[1] < 0) and abs(mean) > spread)
        out[other] = {
            "auc_difference": mean,
            "paired_bootstrap_95": ci,
            "seed_spread": spread,
            "larger_than_both": verdict,
        }
    return out


def scored(predictions, score: str) -> dict:
    """predictions with predictions[score] (llm_prob, crm_prob of a --crm-fusion run) as the "prob" that
    metrics and paired_bootstrap read."""
    return {"sample": predictions["sample"], "label": predictions["label"], "prob": predictions[score]}


def paired_bootstrap(mine, theirs, seed=0):
    """Bootstrap draws of AUC(mine) - AUC(theirs) resampling the shared test samples; None if not shared."""
    if not np.array_equal(mine["sample"], theirs["sample"]):
        return None
    return [
        auc(mine["label"][d], mine["prob"][d]) - auc(theirs["label"][d], theirs["prob"][d])
        for d in bootstrap_draws(len(mine["label"]), seed)
    ]


def against_reclora(runs) -> dict:
    """Each ablation-* / attempt-* run minus reclora at the same seed (its -seedS suffix, else 0):
    the same training samples, the same test samples."""
    out = {}
    for name, (results, predictions) in runs.items():
        if not name.startswith(("ablation-", "attempt-")):
            continue
        baseline = f"reclora-seed{split_seed(name)[1] or 0}"
        if baseline not in runs:
            continue
        boot = paired_bootstrap(predictions, runs[baseline][1])
        if boot is not None:
            out[name] = {
                "baseline": baseline,
                "auc_difference": results["auc"] - runs[baseline][0]["auc"],
                "paired_bootstrap_95": interval(boot),
            }
    return out


def gates(directory: Path, names) -> dict:
    """The trained gates' statistics of the runs with a gates.json."""
    out = {}
    for name in names:
        path = directory / name / "gates.json"
        if path.exists():
            report = json.loads(path.read_text())
            out[name] = {when: {k: report[when][k] for k in GATE_STATISTICS} for when in ("initial", "trained")}
            out[name]["num_loras"], out[name]["temperature"] = report["num_loras"], report["temperature"]
    return out


def curve(runs, over_seeds) -> dict:
    """The Few2Many curve. seed0: method -> [(training samples, AUC)] of the seed-0 runs (curve-* and
    METHOD-seed0: the curve at one seed); seed_mean: method -> (training samples, AUC mean, sd) of the
    main runs, the seed spread at that size. Issue 16's recipe has its own curves, "recipe-lora" and
    "recipe-reclora" (recipe-curve-METHOD-SIZE and recipe-METHOD-seed0)."""
    points, means = defaultdict(list), {}
    for name, (results, _) in runs.items():
        match = re.fullmatch(r"(recipe-)?curve-(\w+)-(\d+)", name)
        if match:
            points[(match.group(1) or "") + match.group(2)].append((int(match.group(3)), results["auc"]))
    for method in ("lora", "reclora", "recipe-lora", "recipe-reclora"):
        if f"{method}-seed0" in runs:
            results = runs[f"{method}-seed0"][0]
            points[method].append((results["train_size"], results["auc"]))
        if method in over_seeds:
            s = over_seeds[method]
            means[method] = (runs[s["runs"][0]][0]["train_size"], s["auc_mean"], s["auc_std"])
    crms = {name: runs[name][0]["auc"] for name in CRMS if name in runs}
    return {"seed0": {method: sorted(p) for method, p in points.items()}, "seed_mean": means, "crm": crms}


def plot(few2many: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for method, points in sorted(few2many["seed0"].items()):
        sizes, aucs = zip(*points)
        (line,) = axis.plot(sizes, aucs, "o-", label=f"{method}, seed 0")
        if method in few2many["seed_mean"]:
            size, mean, sd = few2many["seed_mean"][method]
            axis.errorbar(
                [size * 1.04],
                [mean],
                yerr=[sd or 0],
                fmt="s",
                color=line.get_color(),
                capsize=3,
                label=f"{method}, mean ± sd over seeds",
            )
    for (name, value), style in zip(sorted(few2many["crm"].items()), (":", "--")):
        axis.axhline(value, color="gray", linestyle=style, label=f"{name} (CRM, whole training split)")
    axis.set_xscale("log")
    axis.set_xlabel("LLM training samples (Few2Many subset)")
    axis.set_ylabel("test AUC")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def comparison_row(name: str, c: dict) -> str:
    spread = "n/a" if c["seed_spread"] is None else f"{c['seed_spread']:.4f}"
    lo, hi = c["paired_bootstrap_95"]
    return f"| {name} | {c['auc_difference']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {spread} | {VERDICT[c['larger_than_both']]} |"


def markdown(summary: dict) -> str:
    lines = [
        "| run | train | test | AUC [95% bootstrap] | LogLoss | accuracy | train s | train samples/s | eval s | "
        "eval samples/s | rank corr. with sim | device |",
        "|" + "---|" * 12,
    ]
    rate = lambda v: "" if v is None else f"{v:.1f}"
    corr = lambda v: "" if v is None else f"{v:.3f}"
    for name, r in summary["runs"].items():
        lo, hi = r["auc_95"]
        lines.append(
            f"| {name} | {r['train_size']} | {r['test_size']} | {r['auc']:.4f} [{lo:.4f}, {hi:.4f}] | "
            f"{r['logloss']:.4f} | {r['accuracy']:.4f} | {r['train_seconds']:.0f} | "
            f"{rate(r['train_samples_per_second'])} | {r['eval_seconds']:.0f} | "
            f"{rate(r['eval_samples_per_second'])} | {corr(r.get('rank_correlation_with_sim'))} | {r['device']} |"
        )
    lines += ["", "| method | seeds | AUC mean ± sd | LogLoss mean ± sd |", "|---|---|---|---|"]
    for method, s in summary["over_seeds"].items():
        sd = lambda v: "n/a" if v is None else f"{v:.4f}"
        lines.append(
            f"| {method} | {len(s['runs'])} | {s['auc_mean']:.4f} ± {sd(s['auc_std'])} | "
            f"{s['logloss_mean']:.4f} ± {sd(s['logloss_std'])} |"
        )
    if summary["reclora_vs"]:
        lines += [
            "",
            "| reclora vs | AUC difference | paired 95% interval | seed spread | larger than both |",
            "|---|---|---|---|---|",
        ]
        lines += [comparison_row(other, c) for other, c in summary["reclora_vs"].items()]
    for key, title in (("attempts_vs_crms", "attempt"), ("recipe_vs", "recipe")):
        if summary.get(key):
            lines += [
                "",
                f"| {title} (over seeds) vs | AUC difference | paired 95% interval | seed spread | larger than both |",
                "|---|---|---|---|---|",
            ]
            lines += [
                comparison_row(f"{run} vs {other}", c)
                for run, versus in summary[key].items()
                for other, c in versus.items()
            ]
    if summary["against_reclora"]:
        lines += ["", "| run | AUC minus reclora, same seed | paired 95% interval |", "|---|---|---|"]
        for name, c in summary["against_reclora"].items():
            lo, hi = c["paired_bootstrap_95"]
            lines.append(f"| {name} | {c['auc_difference']:+.4f} (vs {c['baseline']}) | [{lo:+.4f}, {hi:+.4f}] |")
    if summary.get("gates"):
        lines += ["", "| run | K | T | entropy | top alpha | spread | usage |", "|---|---|---|---|---|---|---|"]
        for name, g in summary["gates"].items():
            t = g["trained"]
            lines.append(
                f"| {name} | {g['num_loras']} | {g['temperature']:g} | {t['entropy']:.4f} | {t['top']:.4f} | "
                f"{t['spread']:.4f} | {t['usage']:.4f} |"
            )
    few2many = summary["few2many"]
    if few2many["seed0"]:
        lines += ["", "| method | training samples | AUC, seed 0 | AUC mean ± sd over seeds |", "|---|---|---|---|"]
        for method, points in few2many["seed0"].items():
            mean = few2many["seed_mean"].get(method)
            for size, auc in points:
                over = f"{mean[1]:.4f} ± {mean[2]:.4f}" if mean and mean[0] == size and mean[2] is not None else ""
                lines.append(f"| {method} | {size} | {auc:.4f} | {over} |")
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
    summary["gates"] = gates(args.directory, runs)
    print(markdown(summary))
    if args.json:
        write_json(args.json, summary)
    if args.plot and summary["few2many"]["seed0"]:
        plot(summary["few2many"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
