"""The request and score files of `python -m reclora.predict`: CSV with a header, checked line by line.

Input: columns user, item and optionally timestamp (others are carried through); an empty
timestamp cell means none. Every problem names the file and the line (the header is line 1).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reclora.train.outputs import atomic_write

REQUIRED = ("user", "item")


class RequestFileError(ValueError):
    def __init__(self, path, line, problem):
        super().__init__(f"{path}, line {line}: {problem}" if line else f"{path}: {problem}")


@dataclass
class RequestFile:
    path: Path
    columns: list
    rows: list  # one list of cells per request, in file order
    lines: list  # each request's line number
    timestamps: np.ndarray  # (n,) float64, NaN where none

    def column(self, name) -> list:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def check_ids(self, name: str, integer: bool) -> list:
        """The column's ids; with integer, each must be one (the dataset's ids are)."""
        values = self.column(name)
        for value, line in zip(values, self.lines):
            if value == "":
                raise RequestFileError(self.path, line, f"empty {name} id")
            if integer and not _is_integer(value):
                raise RequestFileError(self.path, line, f"{name} id {value!r} is not an integer, as this run's ids are")
        return [int(value) for value in values] if integer else values


def read_requests(path) -> RequestFile:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.reader(f))
    except OSError as error:
        raise RequestFileError(path, 0, f"cannot read it ({error.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise RequestFileError(path, 0, f"not a UTF-8 CSV file ({error})") from None
    if not records:
        raise RequestFileError(path, 0, "empty file: expected a header with the columns user,item[,timestamp]")
    columns = [name.strip() for name in records[0]]
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        raise RequestFileError(
            path,
            1,
            f"missing column(s) {missing}: the header must name user, item and optionally timestamp (found {columns})",
        )
    rows, lines = [], []
    for line, record in enumerate(records[1:], start=2):
        if not record:
            continue  # a blank line
        if len(record) != len(columns):
            raise RequestFileError(path, line, f"{len(record)} fields, the header has {len(columns)}")
        rows.append([cell.strip() for cell in record])
        lines.append(line)
    if not rows:
        raise RequestFileError(path, 0, "no requests: the file has a header and nothing else")
    requests = RequestFile(path, columns, rows, lines, np.full(len(rows), np.nan))
    if "timestamp" in columns:
        requests.timestamps = _timestamps(requests)
    return requests


def _timestamps(requests: RequestFile) -> np.ndarray:
    out = np.full(len(requests.rows), np.nan)
    for index, (value, line) in enumerate(zip(requests.column("timestamp"), requests.lines)):
        if value == "":
            continue
        try:
            out[index] = float(value)
        except ValueError:
            raise RequestFileError(requests.path, line, f"timestamp {value!r} is not a number") from None
        if not math.isfinite(out[index]):
            raise RequestFileError(requests.path, line, f"timestamp {value!r} is not a finite number")
    return out


def _is_integer(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def write_csv(path, columns, rows) -> None:
    """columns, rows (sequences of cells) into path, atomically."""

    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)

    atomic_write(path, write)
