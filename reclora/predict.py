"""`python -m reclora.predict RUN_DIR`: score or rank requests with a finished training run.

  python -m reclora.predict runs/ml100k/reclora-seed0 --input requests.csv --output scores.csv
  python -m reclora.predict RUN_DIR --input candidates.csv --output top.csv --top 10
  python -m reclora.predict RUN_DIR --split test --output test-scores.csv

Exit codes: 0 done; 2 bad input or run folder (the message names the file and the line; nothing
is written); 130 interrupted. The output is written atomically, once everything is scored.
"""

import argparse
import sys
import time
import warnings

import numpy as np

from reclora.data import DataFormatError
from reclora.inference.recommender import Recommender
from reclora.inference.request_file import RequestFileError, read_requests, write_csv
from reclora.inference.requests import UnknownItemError
from reclora.inference.run_folder import RunFolderError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reclora.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished python -m reclora.train run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        metavar="FILE.csv",
        help="requests: a CSV with columns user,item[,timestamp] (raw "
        "ids as in the dataset's files; timestamps in its unit; an empty timestamp: after the user's "
        "last known interaction); other columns are copied to the output",
    )
    source.add_argument(
        "--split",
        choices=("test", "valid"),
        help="score the run's own evaluated samples instead "
        "(test: those of predictions.npz); writes sample,user,item,label,score",
    )
    parser.add_argument("--output", required=True, metavar="FILE.csv", help="the input's columns and a score column")
    parser.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="rank: the input rows are candidates grouped by user; keep each user's K best, with a rank column",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="requests per batch (default: the run's --eval-batch-size)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for the LLM (default: as the run was trained)",
    )
    parser.add_argument("--data-dir", help="where the run's data lies now, if it moved since training")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the LLM's decoder layers: faster batches after the first ones wait for the compiler",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("top", "batch_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.top is not None and args.split:
        parser.error("--top ranks the candidates of an --input file, not a --split")
    try:
        requests = read_requests(args.input) if args.input else None
        recommender = Recommender.load(
            args.run_dir,
            device=args.device,
            bf16=args.bf16,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            progress=sys.stderr.isatty(),
            compile=args.compile,
        )
        start = time.perf_counter()
        if requests is None:
            columns, rows, count = _score_split(recommender, args.split)
        else:
            columns, rows, count = _score_file(recommender, requests, args.top)
        seconds = time.perf_counter() - start
    except (RunFolderError, RequestFileError, DataFormatError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    try:
        write_csv(args.output, columns, rows)
    except OSError as error:
        print(f"error: cannot write {args.output} ({error.strerror}); nothing was written", file=sys.stderr)
        return 2
    print(
        f"{count:,} requests in {seconds:.2f} s: {count / max(seconds, 1e-9):.2f} requests/s "
        f"({recommender.method}, {recommender.device}); wrote {args.output}",
        flush=True,
    )
    return 0


def _score_split(recommender, split):
    samples = recommender.split_samples(split)
    scores = recommender.score_samples(samples)
    described = recommender.describe_samples(samples)
    rows = zip(
        samples.tolist(),
        described["user"].tolist(),
        described["item"].tolist(),
        described["label"].tolist(),
        _cells(scores),
    )
    return ["sample", "user", "item", "label", "score"], list(rows), len(samples)


def _score_file(recommender, requests, top):
    integer = recommender.table.dataset.items.raw_ids.dtype.kind in "iu"
    users, items = requests.check_ids("user", integer), requests.check_ids("item", integer)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = recommender.score(users, items, requests.timestamps)
    except UnknownItemError as error:
        raise RequestFileError(requests.path, requests.lines[error.position], str(error)) from None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    cells = _cells(scores)
    if top is None:
        return requests.columns + ["score"], [row + [cell] for row, cell in zip(requests.rows, cells)], len(scores)
    by_user = {}
    for index, user in enumerate(users):
        by_user.setdefault(user, []).append(index)
    rows = []
    for indices in by_user.values():
        best = sorted(indices, key=lambda i: -scores[i])[:top]  # sorted is stable: ties keep input order
        rows += [requests.rows[i] + [cells[i], rank] for rank, i in enumerate(best, start=1)]
    return requests.columns + ["score", "rank"], rows, len(scores)


def _cells(scores: np.ndarray) -> list:
    return [f"{score:.8g}" for score in scores.tolist()]


if __name__ == "__main__":
    sys.exit(main())
