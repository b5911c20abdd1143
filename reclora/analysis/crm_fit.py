"""How differently does a run's CRM score the LLM's training samples and new ones?

Few2Many trains the CRM on the whole training split, the LLM's training subset included, so on
those samples the CRM's outputs (the gates' input, and the readout's offset under --crm-residual)
are those of a model fitted to them. This prints the run's CRM's AUC and LogLoss on the LLM's
training subset, on the run's validation subset and on the whole validation split. A large gap
means the LLM learns from a CRM better than the one it meets at test time (--crm-holdout narrows it;
--crm-holdout-users, which keeps the subset's users out of the CRM's training, should close it).

  python -m reclora.analysis.crm_fit runs/ml100k/recipe-reclora-seed0 --json docs/results/ml100k-crm-fit.json
"""

import argparse
import sys
from pathlib import Path

from reclora.crm.train import CrmTrainConfig, predict
from reclora.files import write_json
from reclora.inference.run_folder import RunFolder
from reclora.metrics import auc, logloss
from reclora.train.pipeline import load_run_dataset, subsets


def crm_fit(run_dir: Path, data_dir=None) -> dict:
    run = RunFolder(run_dir)
    config = run.settings
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if not config.needs_crm or not config.method_row.tuned:
        raise ValueError(f"{run_dir} is a {config.method!r} run without a CRM and an LLM training subset")
    dataset = load_run_dataset(config)
    run.check_dataset(dataset)
    crm, inputs = run.load_crm(dataset, "cpu")
    parts = subsets(config, dataset)
    labels = dataset.samples.label
    out = {
        "run": str(run_dir),
        "crm": config.crm,
        "crm_holdout": config.crm_holdout,
        "crm_holdout_users": config.crm_holdout_users,
    }
    for name, samples in (
        ("llm_training_subset", parts["train"]),
        ("validation_subset", parts["valid"]),
        ("validation_split", dataset.split("valid")),
    ):
        probs = predict(crm, inputs, samples, CrmTrainConfig(progress=False))
        out[name] = {
            "samples": len(samples),
            "auc": auc(labels[samples], probs),
            "logloss": logloss(labels[samples], probs),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder of an LLM method with a CRM (reclora, or --crm-residual)")
    parser.add_argument("--data-dir", type=Path, help="where the run's data is now, if it moved")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    try:
        result = crm_fit(args.run, args.data_dir)
    except (OSError, ValueError) as error:
        parser.exit(2, f"crm_fit: {error}\n")
    for name in ("llm_training_subset", "validation_subset", "validation_split"):
        row = result[name]
        print(
            f"{result['crm']} on the {name.replace('_', ' ')} ({row['samples']:,}): AUC {row['auc']:.4f}, LogLoss {row['logloss']:.4f}"
        )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
