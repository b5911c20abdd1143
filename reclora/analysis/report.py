"""`python -m reclora.analysis.report DIR`: the comparison table of the runs whose rows are in DIR/results.csv.

The latest row of each output directory is shown (a rerun replaces its earlier row).
"""

import argparse
import csv
import sys
from pathlib import Path

COLUMNS = (
    ("method", "method", "{}"),
    ("train_size", "train", "{}"),
    ("test_size", "test", "{}"),
    ("auc", "AUC", "{:.4f}"),
    ("logloss", "LogLoss", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("gauc", "gAUC", "{:.4f}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("eval_seconds", "eval s", "{:.0f}"),
    ("train_samples_per_second", "train samples/s", "{:.2f}"),
    ("device", "device", "{}"),
)


def latest_rows(csv_path) -> list:
    with open(csv_path, newline="") as f:
        rows = {row["out"]: row for row in csv.DictReader(f)}
    return list(rows.values())


def _cell(row, key, fmt):
    value = row.get(key, "")
    try:
        return fmt.format(float(value)) if "f}" in fmt else fmt.format(value)
    except ValueError:
        return value


def format_table(rows) -> str:
    """A Markdown table, one line per run."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="the parent directory of the runs (holding results.csv)")
    args = parser.parse_args(argv)
    path = Path(args.directory) / "results.csv"
    if not path.exists():
        print(f"error: {path} does not exist: no run in {args.directory} has finished", file=sys.stderr)
        return 2
    print(format_table(latest_rows(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
