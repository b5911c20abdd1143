"""How much does the prompt give away without any model? The AUC of its mean star rating.

The prompt lists K_short history items with their ratings. Scoring a test sample by the mean
rating of those items (and by their share rated >= 4) needs no training; it is the bar an LLM
reading the prompt should clear. Both prompt histories are scored: "recent" (lora) and
"semantic" (rella, reclora), on the same seeded test subset as the trainer's runs.

  python -m reclora.analysis.prompt_baseline --data-dir ../shared/data/ml-100k --eval-size 3000 --json docs/results/ml100k-prompt-baseline.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from reclora.files import cache_folder, write_json
from reclora.item_embeddings import item_embeddings
from reclora.llm import load_llm
from reclora.metrics import auc
from reclora.retriever import STRATEGIES, LongShortRetriever
from reclora.train import make_config
from reclora.train.pipeline import load_run_dataset, subsets


def prompt_baseline(config) -> dict:
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
        out[strategy] = {
            "mean_rating_auc": auc(labels, ratings.sum(1) / lengths),
            "positive_share_auc": auc(labels, (ratings >= 4).sum(1) / lengths),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--llm", default="smollm2-135m", help="the model whose embeddings rank the semantic history")
    parser.add_argument("--eval-size", type=int, default=3000)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--embedder", default="llm")
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
    result = prompt_baseline(config)
    for strategy in STRATEGIES:
        print(
            f"{strategy:>8} prompt: AUC of the mean rating {result[strategy]['mean_rating_auc']:.4f}, "
            f"of the share rated >= 4 {result[strategy]['positive_share_auc']:.4f} ({result['test_size']:,} test samples)"
        )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
