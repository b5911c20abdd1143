"""`python -m benchmarks.item_embeddings`: the item text embeddings of a catalogue, before and after.

  python -m benchmarks.item_embeddings [--catalogues ml-100k ml-1m] [--sample ml-1m=N] [--parts 4]
                                       [--data-root DIR] [--llm smollm2-135m] [--batch-size 64] [--json OUT.json]

Both compute what the retriever uses (the LLM's mean-pooled last hidden state over ReLLa's item
sentence, float32, batches of 64, at most 64 tokens), once each on the same machine. The catalogue
is cut into --parts contiguous parts and each part is embedded by the baseline, then by ours, so
that a shared machine's changing load falls on both alike:
  baseline  the causal LM's full forward with output_hidden_states=True (every layer's hidden
            states kept, the vocabulary projection of every token computed), batches in catalogue
            order: what reclora.item_embeddings did before.
  ours      reclora.item_embeddings.llm_embeddings: the transformer body only, batches sorted by length.
Reported: seconds, items per second, the speed-up, and the largest difference between the two.
Catalogues: MovieLens 100K (1,682 movies: the dataset's own items, as the trainer embeds them) and
MovieLens 1M (3,883 movies from movies.dat alone: its ratings are not needed), under --data-root;
--sample NAME=N times a seeded random N of a catalogue's items instead (kept in catalogue order).
"""

import argparse
import os
import time
import types

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.environment import describe
from reclora.data import load_dataset, read_table
from reclora.data.tables import item_table
from reclora.files import write_json
from reclora.item_embeddings import item_sentences, llm_embeddings
from reclora.llm import SMOLLM2, load_llm, position_ids

DATA_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
CATALOGUES = ("ml-100k", "ml-1m")


@torch.no_grad()
def baseline_embeddings(model, tokenizer, texts, batch_size=64, max_length=64, progress=True) -> np.ndarray:
    """The previous way: full causal-LM forward, every hidden state returned, batches in input order."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="baseline", disable=not progress):
        encoded = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        mask = encoded["attention_mask"]
        hidden = model(**encoded, position_ids=position_ids(mask), output_hidden_states=True).hidden_states[-1].float()
        mask = mask[:, :, None].float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out)


def catalogue_sentences(name: str, data_root: str) -> list:
    """ReLLa's item sentences for every movie of a catalogue."""
    if name == "ml-100k":
        return item_sentences(load_dataset("ml-100k", os.path.join(data_root, "ml-100k"), progress=False))
    path = os.path.join(data_root, "ml-1m", "movies.dat")
    movies = read_table(
        path,
        {"id": (0, np.int64), "title": (1, str), "genres": (2, str)},
        separator="::",
        n_fields=3,
        encoding="latin-1",
    )
    order = np.argsort(movies["id"], kind="stable")
    table = item_table(
        movies["id"][order],
        [movies["title"][row].strip() for row in order],
        [movies["genres"][row].split("|") for row in order],
    )
    return item_sentences(types.SimpleNamespace(items=table))


def _timed_pair(model, tokenizer, texts, batch_size, parts):
    """(baseline seconds, ours seconds, largest difference), part by part."""
    baseline_s = ours_s = difference = 0.0
    for part in np.array_split(np.arange(len(texts)), parts):
        part_texts = [texts[i] for i in part]
        start = time.perf_counter()
        before = baseline_embeddings(model, tokenizer, part_texts, batch_size)
        baseline_s += time.perf_counter() - start
        start = time.perf_counter()
        after = llm_embeddings(model, tokenizer, part_texts, batch_size)
        ours_s += time.perf_counter() - start
        difference = max(difference, float(np.abs(before - after).max()))
    return baseline_s, ours_s, difference


def run(args) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_llm(args.llm)
    result = {
        "environment": describe(),
        "llm": args.llm,
        "dtype": "float32",
        "batch_size": args.batch_size,
        "max_length": 64,
        "catalogues": {},
    }
    for name in args.catalogues:
        texts = catalogue_sentences(name, args.data_root)
        if name in args.sample:
            keep = np.sort(np.random.default_rng(0).choice(len(texts), args.sample[name], replace=False))
            row = {"catalogue_items": len(texts), "sampled": True}
            texts = [texts[i] for i in keep]
        else:
            row = {"catalogue_items": len(texts), "sampled": False}
        baseline_s, ours_s, difference = _timed_pair(model, tokenizer, texts, args.batch_size, args.parts)
        row.update(
            items=len(texts),
            baseline_s=baseline_s,
            ours_s=ours_s,
            speedup=baseline_s / ours_s,
            baseline_items_per_s=len(texts) / baseline_s,
            ours_items_per_s=len(texts) / ours_s,
            max_abs_difference=difference,
            load_average_after=os.getloadavg(),
        )
        result["catalogues"][name] = row
        print(
            f"{name}: {len(texts):,} of {row['catalogue_items']:,} items; baseline {baseline_s:.1f} s, ours "
            f"{ours_s:.1f} s ({row['speedup']:.2f}x); max |difference| {difference:.2e}",
            flush=True,
        )
    return result


def _sample(text):
    name, _, count = text.partition("=")
    if name not in CATALOGUES or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=N with NAME in {CATALOGUES} and N >= 1, got {text!r}")
    return name, int(count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalogues", nargs="+", choices=CATALOGUES, default=list(CATALOGUES))
    parser.add_argument(
        "--sample",
        type=_sample,
        nargs="*",
        default=[],
        metavar="NAME=N",
        help="time a seeded random N items of a catalogue instead of all of them",
    )
    parser.add_argument("--parts", type=int, default=4, help="parts the baseline and ours alternate on")
    parser.add_argument("--data-root", default=DATA_ROOT, help="the folder holding ml-100k/ and ml-1m/")
    parser.add_argument("--llm", default=SMOLLM2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.sample = dict(args.sample)
    result = run(args)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
