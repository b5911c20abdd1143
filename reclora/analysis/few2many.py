"""The Few2Many curve of the runs on disk: test AUC against the LLM's training-subset size.

Each curve (--curve LABEL PATTERN...) is a family of runs picked by name patterns (shell globs) under
the runs folder, one run a (size, seed), all on the same test samples; at each size, the mean and
standard deviation over the seeds. For --crm-fusion runs it reports the LLM alone (its margin without
the CRM: RecLoRA's own readout, the curve drawn), the fused readout and the CRM inside the runs (trained
on the whole training split, so it does not move with the size: drawn as a line at its mean over the
seeds). A run without the fusion gives its P(Yes) as its LLM alone. --published adds the seed-0 curves
of an earlier study summary (reclora.analysis.study --json), drawn in gray, whose runs need not be on
disk any more. --readout LABEL also draws that curve's fused readout, dashed in the curve's colour (for
`lora` under --crm-fusion the readout, not the LLM alone, is what rises above the CRM). Folders without
results.json (runs still training) are listed as unfinished.

  python -m reclora.analysis.few2many runs/ml100k \\
      --curve "reclora, all seven" "fusion-allproj-reclora-seed*" "recipe-curve-allproj-reclora-[0-9]*" \\
      --published docs/results/ml100k.json --json few2many.json --plot few2many.png
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from reclora.analysis.paired_seeds import load
from reclora.files import write_json
from reclora.metrics import auc
from reclora.train.outputs import RunDirectory

# The scores a run may hold (predictions' columns) and their names here; "llm" falls back to "prob".
SCORES = {"llm": "llm_prob", "readout": "prob", "crm": "crm_prob"}


def _run_point(directory: Path, name: str) -> dict:
    results, predictions = load(directory, name)
    config_file = RunDirectory(directory / name).config
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    aucs = {
        score: auc(predictions["label"], predictions[column])
        for score, column in SCORES.items()
        if column in predictions
    }
    aucs.setdefault("llm", aucs["readout"])
    return {
        "run": name,
        "size": int(results["train_size"]),
        "seed": int(results.get("seed", config.get("seed", 0))),
        "crm": config.get("crm") if "crm" in aucs else None,
        "auc": aucs,
        "samples": predictions["sample"],
    }


def family(directory: Path, patterns: list) -> tuple:
    """(finished runs' points, unfinished run names) of the folders matching any of the patterns; a
    ValueError when nothing matches, when two runs claim one (size, seed) or when test samples differ."""
    names = sorted({p.name for pattern in patterns for p in directory.glob(pattern) if p.is_dir()})
    finished = [n for n in names if (directory / n / "results.json").is_file()]
    if not finished:
        raise ValueError(f"no finished run under {directory} matches {' '.join(patterns)}")
    points, seen = [_run_point(directory, n) for n in finished], {}
    for point in points:
        key = (point["size"], point["seed"])
        if key in seen:
            raise ValueError(f"{seen[key]!r} and {point['run']!r} are both size {key[0]}, seed {key[1]}")
        seen[key] = point["run"]
        if not np.array_equal(point["samples"], points[0]["samples"]):
            raise ValueError(f"{point['run']!r} and {points[0]['run']!r} were scored on different test samples")
    return points, [n for n in names if n not in finished]


def _mean_std(values: list) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def curve(points: list) -> list:
    """One entry a size: its runs and seeds, and each score's mean and sd over the seeds."""
    by_size = defaultdict(list)
    for point in points:
        by_size[point["size"]].append(point)
    out = []
    for size, runs in sorted(by_size.items()):
        runs.sort(key=lambda p: p["seed"])
        entry = {"size": size, "seeds": [p["seed"] for p in runs], "runs": [p["run"] for p in runs]}
        for score in SCORES:
            if all(score in p["auc"] for p in runs):
                entry[score] = _mean_std([p["auc"][score] for p in runs])
        out.append(entry)
    return out


def summarize(directory: Path, curves: list) -> dict:
    """{label: {patterns, points, crm, crm_auc_over_seeds, unfinished}} for each (label, patterns) of `curves`."""
    out = {}
    for label, patterns in curves:
        points, unfinished = family(directory, patterns)
        kinds = sorted({p["crm"] or "CRM" for p in points if "crm" in p["auc"]})
        crm_by_seed = {p["seed"]: p["auc"]["crm"] for p in points if "crm" in p["auc"]}  # flat in the size
        out[label] = {
            "patterns": list(patterns),
            "points": curve(points),
            "crm": " / ".join(kinds) or None,
            "crm_auc_over_seeds": _mean_std(list(crm_by_seed.values())) if crm_by_seed else None,
            "unfinished": unfinished,
        }
    return out


def _cell(entry) -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:.4f}" + (f" ± {entry['std']:.4f}" if entry["std"] is not None else "")


def markdown(summary: dict) -> str:
    lines = [
        "| curve | training samples | seeds | LLM alone | readout | CRM inside |",
        "|---|---|---|---|---|---|",
    ]
    for label, c in summary.items():
        for point in c["points"]:
            seeds = ", ".join(map(str, point["seeds"]))
            cells = [_cell(point.get(score)) for score in SCORES]
            lines.append(f"| {label} | {point['size']} | {seeds} | " + " | ".join(cells) + " |")
        if c["unfinished"]:
            lines.append(f"| {label}: unfinished | | | {', '.join(c['unfinished'])} | | |")
    return "\n".join(lines)


def _draw_score(axis, points: list, score: str, label: str, **style):
    """One score's mean ± sd over the seeds against the size, as error bars."""
    sizes = [p["size"] for p in points]
    means = [p[score]["mean"] for p in points]
    sds = [p[score]["std"] or 0 for p in points]
    return axis.errorbar(sizes, means, yerr=sds, capsize=3, label=f"{label}, mean ± sd over seeds", **style)


def _draw_curves(axis, summary: dict, readouts: tuple = ()) -> None:
    crm_lines = {}
    for label, c in summary.items():
        llm = _draw_score(axis, c["points"], "llm", f"{label}: LLM alone", fmt="o-")
        if label in readouts:
            _draw_score(
                axis, c["points"], "readout", f"{label}: fused readout", fmt="s--", color=llm.lines[0].get_color()
            )
        if c["crm_auc_over_seeds"]:
            crm_lines.setdefault(c["crm"], c["crm_auc_over_seeds"]["mean"])
    for (kind, value), style in zip(sorted(crm_lines.items()), (":", "--", "-.")):
        axis.axhline(value, color="black", linestyle=style, label=f"{kind} inside the runs (CRM, mean over seeds)")
    axis.set_xscale("log")
    axis.set_xlabel("LLM training samples (Few2Many subset)")
    axis.grid(alpha=0.3)


def plot(summary: dict, path: Path, published: dict | None = None, readouts: tuple = ()) -> None:
    """The curves with the CRM lines (and the fused readout of the curves named in `readouts`); with
    `published`, a first panel adds the published recipe's curves (whose scale would flatten the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if published else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), squeeze=False)
    if published:
        for method, points in sorted(published.items()):
            sizes, aucs = zip(*points)
            marker = "x--" if method == "lora" else "+--"
            axes[0, 0].plot(sizes, aucs, marker, color="gray", label=f"{method}, published recipe, seed 0")
        axes[0, 0].set_title("with the published recipe's curves", fontsize=9)
        axes[0, 1].set_title("the runs' curves", fontsize=9)
    for axis in axes[0]:
        _draw_curves(axis, summary, readouts)
        axis.legend(fontsize=7)
    axes[0, 0].set_ylabel("test AUC")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def published_curves(path: Path) -> dict:
    """The seed-0 curves ({method: [[size, AUC], ...]}) of a reclora.analysis.study summary."""
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict) or "seed0" not in summary.get("few2many", {}):
        raise ValueError(f"{path} is not a reclora.analysis.study summary (no few2many.seed0)")
    return summary["few2many"]["seed0"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the folder holding the runs (each a reclora.train --out)")
    parser.add_argument(
        "--curve", nargs="+", action="append", required=True, metavar="LABEL PATTERN", help="a label, then globs"
    )
    parser.add_argument("--published", type=Path, help="an earlier reclora.analysis.study summary (JSON)")
    parser.add_argument(
        "--readout", action="append", default=[], metavar="LABEL", help="also draw this curve's fused readout"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    args = parser.parse_args(argv)
    if any(len(c) < 2 for c in args.curve):
        parser.error("each --curve takes a label and at least one pattern")
    unknown = sorted(set(args.readout) - {c[0] for c in args.curve})
    if unknown:
        parser.error(f"--readout names no --curve: {', '.join(unknown)}")
    try:
        summary = summarize(args.directory, [(c[0], c[1:]) for c in args.curve])
        published = published_curves(args.published) if args.published else None
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(summary))
    if args.json:
        write_json(args.json, {"curves": summary, "published_seed0": published})
    if args.plot:
        plot(summary, args.plot, published, tuple(args.readout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
