"""How much does the prompt give away without any model? The AUC of its mean star rating.

The prompt lists K_short history items with their ratings. Scoring a test sample by the mean
rating of those items (and by their share rated >= 4) needs no training; it is the bar an LLM
reading the prompt should clear. Both prompt histories are scored: "recent" (lora) and
"semantic" (rella, reclora), on the same seeded test subset as the trainer's runs.

  python -m reclora.analysis.prompt_baseline --data-dir ../shared/data/ml-100k --eval-size 3000 --json docs/results/ml100k-prompt-baseline.json

--against RUN_DIR (repeatable) also gives each finished run's test AUC minus the mean rating's, with
a paired bootstrap interval over the shared test samples (the run's --eval-size and --eval-seed
must be these); for a --crm-fusion run, its LLM alone's too.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from reclora.analysis.study import interval, paired_bootstrap, scored
from reclora.files import cache_folder, write_json
from reclora.item_embeddings import item_embeddings
from reclora.llm import load_llm
from reclora.metrics import auc
from reclora.retriever import STRATEGIES, LongShortRetriever
from reclora.train import make_config
from reclora.train.outputs import RunDirectory
from reclora.train.pipeline import load_run_dataset, subsets


def prompt_baseline(config, against=()) -> dict:
    dataset = load_run_dataset(config)
    test = subsets(config, dataset)["test"]
    llm = tokenizer = None
    if config.embedder == "llm":
        llm, tokenizer = load_llm(config.llm, device="cpu", cache_dir=config.cache_dir)
    embeddings = item_embeddings(
        dataset,
        config.embedder,
        model=llm,
        tokenizer=tokenizer,
        model_name=config.llm,
        cache_dir=cache_folder("embeddings", config.cache_dir),
        progress=False,
    )
    labels = dataset.samples.label[test]
    out = {"test_size": len(test), "eval_seed": config.eval_seed, "k_short": config.k_short}
    for strategy in STRATEGIES:
        short = LongShortRetriever(dataset, embeddings, config.k_long, config.k_short, strategy).retrieve(test).short
        ratings, lengths = short.ratings.numpy(), np.maximum(short.lengths.numpy(), 1)
        mean_rating = ratings.sum(1) / lengths
        out[strategy] = {
            "mean_rating_auc": auc(labels, mean_rating),
            "positive_share_auc": auc(labels, (ratings >= 4).sum(1) / lengths),
        }
        if against:
            reference = {"sample": np.asarray(test), "label": labels, "prob": mean_rating}
            out[strategy]["runs"] = {str(run): run_minus_mean_rating(run, reference) for run in against}
    return out


def run_minus_mean_rating(run_dir: Path, reference: dict) -> dict:
    """A finished run's test AUC minus the mean rating's, paired over the same test samples; for a
    --crm-fusion run also its LLM alone's (llm_alone): does the LLM read its prompt?"""
    predictions = RunDirectory(run_dir).read_predictions()
    if not np.array_equal(predictions["sample"], reference["sample"]):
        raise ValueError(f"{run_dir} was tested on other samples than these (its --eval-size, --eval-seed)")
    out = _minus_reference(predictions, "prob", reference)
    if "llm_prob" in predictions:
        out["llm_alone"] = _minus_reference(predictions, "llm_prob", reference)
    return out


def _minus_reference(predictions, score: str, reference: dict) -> dict:
    mine = scored(predictions, score)
    draws = paired_bootstrap(mine, reference)
    return {"auc": auc(mine["label"], mine["prob"]), "difference": float(np.mean(draws)), "interval": interval(draws)}


def _minus_line(paired: dict) -> str:
    low, high = paired["interval"]
    return f"AUC {paired['auc']:.4f}, minus the mean rating {paired['difference']:+.4f} [{low:+.4f}, {high:+.4f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--llm", default="smollm2-135m", help="the model whose embeddings rank the semantic history")
    parser.add_argument("--eval-size", type=int, default=3000)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--embedder", default="llm")
    parser.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a finished run to pair with the mean rating (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    config = make_config(
        dict(
            method="lora",
            dataset=args.dataset,
            data_dir=args.data_dir,
            llm=args.llm,
            eval_size=args.eval_size,
            eval_seed=args.eval_seed,
            embedder=args.embedder,
        )
    )
    try:
        result = prompt_baseline(config, args.against)
    except (OSError, ValueError) as error:
        parser.exit(2, f"prompt_baseline: {error}\n")
    for strategy in STRATEGIES:
        print(
            f"{strategy:>8} prompt: AUC of the mean rating {result[strategy]['mean_rating_auc']:.4f}, "
            f"of the share rated >= 4 {result[strategy]['positive_share_auc']:.4f} ({result['test_size']:,} test samples)"
        )
        for run, paired in result[strategy].get("runs", {}).items():
            print(f"{'':>10}{run}: {_minus_line(paired)}")
            if "llm_alone" in paired:
                print(f"{'':>12}its LLM alone: {_minus_line(paired['llm_alone'])}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
