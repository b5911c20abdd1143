"""What does a run know that its CRM does not? The AUC of the two fused late.

For each finished run that shares the CRM run's test samples: the AUC of the weighted mean of their
logits, (1 - w) logit(p_crm) + w logit(p_run), at fixed weights (WEIGHTS; nothing is fitted, so
nothing is chosen on the test samples), minus the CRM's own AUC, with a paired bootstrap interval.
A run whose fusion beats the CRM ranks by something the CRM lacks; a run whose fusion does not
only relays the CRM (docs/RESULTS.md, issue 16 part 5).

  python -m reclora.analysis.late_fusion --crm runs/ml100k/sim runs/ml100k/recipe-*-seed* --json docs/results/ml100k-late-fusion.json

With --valid DIR, each run's weight is also chosen on the validation split (reclora.fusion's grid and
choice, which `--crm-fusion` makes part of a training run) and applied to the test samples: a fusion a user can
deploy, with nothing chosen on test. DIR holds each run's and the CRM's validation scores as NAME.csv,
written by `python -m reclora.predict runs/ml100k/NAME --split valid --output DIR/NAME.csv`.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from reclora.analysis.study import interval, paired_bootstrap
from reclora.files import write_json
from reclora.fusion import WEIGHT_GRID, fused_logit
from reclora.fusion import choose_weight as choose_logit_weight
from reclora.metrics import auc

WEIGHTS = (0.25, 0.5)
EPS = 1e-6


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def load_predictions(run_dir: Path) -> dict:
    path = Path(run_dir) / "predictions.npz"
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no predictions.npz: is it a finished run?")
    with np.load(path) as predictions:
        return {key: predictions[key] for key in ("sample", "label", "prob")}


def fuse(crm: dict, run: dict, weight: float) -> dict:
    """The run's predictions with P = sigmoid((1 - weight) logit(p_crm) + weight logit(p_run))."""
    mixed = fused_logit(logit(run["prob"]), logit(crm["prob"]), weight)
    return dict(run, prob=1 / (1 + np.exp(-mixed)))


def load_valid_scores(valid_dir: Path, name: str) -> dict:
    """NAME.csv of reclora.predict --split valid, as load_predictions' arrays."""
    path = Path(valid_dir) / f"{name}.csv"
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: write it with python -m reclora.predict RUN_DIR --split valid --output {path}"
        )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"sample", "label", "score"} <= set(rows[0]):
        raise ValueError(f"{path}: expected reclora.predict's columns sample,label,score")
    return {
        "sample": np.array([int(r["sample"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
        "prob": np.array([float(r["score"]) for r in rows]),
    }


def choose_weight(crm: dict, run: dict, grid=WEIGHT_GRID) -> tuple:
    """(weight, AUC) of the grid's weight whose fusion has the best AUC on these (validation) samples;
    ties go to the smaller weight, the one closer to the CRM alone."""
    if not np.array_equal(run["sample"], crm["sample"]):
        raise ValueError("the run and the CRM were scored on other validation samples: nothing to pair")
    choice = choose_logit_weight(run["label"], logit(run["prob"]), logit(crm["prob"]), grid)
    return choice["weight"], choice["auc"]


def _fused_row(crm: dict, crm_auc: float, run: dict, weight: float) -> dict:
    fused = fuse(crm, run, weight)
    fused_auc = auc(fused["label"], fused["prob"])
    return {"auc": fused_auc, "minus_crm": fused_auc - crm_auc, "interval": interval(paired_bootstrap(fused, crm))}


def late_fusion(crm_dir: Path, run_dirs, weights=WEIGHTS, valid_dir=None) -> dict:
    crm = load_predictions(crm_dir)
    out = {"crm": str(crm_dir), "crm_auc": auc(crm["label"], crm["prob"]), "weights": list(weights), "runs": {}}
    if valid_dir:
        crm_valid = load_valid_scores(valid_dir, Path(crm_dir).name)
        crm_valid_auc = auc(crm_valid["label"], crm_valid["prob"])
    for run_dir in run_dirs:
        run = load_predictions(run_dir)
        if not np.array_equal(run["sample"], crm["sample"]):
            raise ValueError(f"{run_dir} was scored on other test samples than {crm_dir}: nothing to pair")
        row = {"auc": auc(run["label"], run["prob"]), "fused": {}}
        for weight in weights:
            row["fused"][str(weight)] = _fused_row(crm, out["crm_auc"], run, weight)
        if valid_dir:
            weight, valid_auc = choose_weight(crm_valid, load_valid_scores(valid_dir, Path(run_dir).name))
            row["chosen_on_valid"] = {
                "weight": weight,
                "valid_auc": valid_auc,
                "valid_crm_auc": crm_valid_auc,
                **_fused_row(crm, out["crm_auc"], run, weight),
            }
        out["runs"][Path(run_dir).name] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crm", type=Path, required=True, help="the CRM's finished run (e.g. runs/ml100k/sim)")
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="finished runs to fuse with it")
    parser.add_argument(
        "--valid", type=Path, metavar="DIR", help="choose each run's weight on the validation scores in DIR (above)"
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    try:
        result = late_fusion(args.crm, args.runs, valid_dir=args.valid)
    except (OSError, ValueError) as error:
        parser.exit(2, f"late_fusion: {error}\n")
    print(f"{args.crm.name}: AUC {result['crm_auc']:.4f}")
    for name, row in result["runs"].items():
        fused = ", ".join(
            f"w {w}: {f['auc']:.4f} ({f['minus_crm']:+.4f} [{f['interval'][0]:+.4f}, {f['interval'][1]:+.4f}])"
            for w, f in row["fused"].items()
        )
        print(f"{name}: AUC {row['auc']:.4f}; fused with {args.crm.name} {fused}")
        if "chosen_on_valid" in row:
            c = row["chosen_on_valid"]
            print(
                f"  weight chosen on validation: {c['weight']} (valid AUC {c['valid_auc']:.4f}, the CRM's "
                f"{c['valid_crm_auc']:.4f}); test {c['auc']:.4f} ({c['minus_crm']:+.4f} "
                f"[{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}])"
            )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
