"""One reader for every delimited data file: MovieLens `::`/`|`/tab files and quoted CSV.

It reads a file in chunks of lines, converts the requested columns to numpy arrays per chunk
(so 25M-line files neither hold millions of Python objects nor parse field by field in Python),
and reports any malformed line as `DataFormatError` naming the file and its 1-based line.
"""

from __future__ import annotations

import csv
import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from reclora.progress import progress_bar

ColumnRef = Union[int, str]  # a field position, or a header name for files with a header
ColumnKind = Union[type, np.dtype]  # `str` (a list of strings) or a numpy dtype

_CHUNK_LINES = 1 << 20
_PROGRESS_MIN_BYTES = 16 << 20


class DataFormatError(ValueError):
    """A malformed line in a data file. `path` and `line` (1-based) say where."""

    def __init__(self, path: Path, line: int, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        super().__init__(f"{path}, line {line}: {reason}")


@dataclass
class Table:
    """Columns read from one file. Row r came from line `line_numbers[r]` of `path`.

    columns: name -> (R,) numpy array for numeric kinds, or a list of R strings for `str`.
    """

    path: Path
    columns: dict
    line_numbers: np.ndarray  # (R,) int64

    def __getitem__(self, name: str):
        return self.columns[name]

    def __len__(self) -> int:
        return len(self.line_numbers)

    def error(self, row: int, reason: str) -> DataFormatError:
        """The error for a row whose content is wrong (unknown id, duplicate, bad value)."""
        return DataFormatError(self.path, int(self.line_numbers[row]), reason)


def read_table(
    path: Path,
    columns: Mapping[str, tuple[ColumnRef, ColumnKind]],
    *,
    separator: str,
    encoding: str = "utf-8",
    n_fields: int | None = None,
    header: bool = False,
    quoted: bool = False,
    progress: bool = True,
) -> Table:
    """Reads the named columns of a delimited text file.

    columns: output name -> (field position or header name, kind); kind is `str` or a numpy dtype
        such as np.int64 / np.float32 (parsed strictly: "4.0" is not an int64).
    separator: the field separator, any length ("::" for MovieLens 1M).
    n_fields: the exact field count of every line (default: the header's, or no check).
    header: the first line names the fields. quoted: CSV quoting rules (quoted fields may hold
        the separator, quotes and newlines).
    Blank lines are skipped; CRLF and LF endings both work.
    """
    path = Path(path)
    with _open_lines(path, separator, encoding, quoted, progress) as lines, _gc_paused():
        positions, n_fields = _resolve_columns(path, lines, columns, n_fields, header)
        chunks = [
            _convert_chunk(path, rows, line_numbers, columns, positions)
            for rows, line_numbers in _chunks(path, lines, n_fields)
        ]
    return Table(
        path,
        {name: _concatenate([chunk[name] for chunk, _ in chunks], kind) for name, (_, kind) in columns.items()},
        np.concatenate([lines for _, lines in chunks]) if chunks else np.zeros(0, np.int64),
    )


@contextmanager
def _open_lines(path: Path, separator: str, encoding: str, quoted: bool, progress: bool):
    """Yields an iterator of (line number, fields) over the file's non-blank lines."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if quoted and len(separator) != 1:
        raise ValueError(f"CSV files need a one-character separator, got {separator!r}")
    size = path.stat().st_size
    # newline="" lets the csv module see quoted newlines; universal newlines strip CRLF otherwise.
    with (
        open(path, encoding=encoding, newline="" if quoted else None) as file,
        progress_bar(
            total=size,
            desc=f"reading {path.name}",
            unit="B",
            unit_scale=True,
            disable=not progress or size < _PROGRESS_MIN_BYTES,
            leave=False,
        ) as bar,
    ):
        try:
            yield _records(path, file, separator, quoted, bar)
        except UnicodeDecodeError:
            line, reason = _first_undecodable_line(path, encoding)
            raise DataFormatError(path, line, f"not valid {encoding} text ({reason})") from None


def _records(path: Path, file, separator: str, quoted: bool, bar) -> Iterator[tuple[int, list[str]]]:
    if quoted:
        reader = csv.reader(file, delimiter=separator, strict=True)
        numbered = ((reader.line_num, fields) for fields in reader)
    else:
        numbered = ((number, line.rstrip("\n").split(separator)) for number, line in enumerate(file, 1))
    try:
        for count, (line, fields) in enumerate(numbered, 1):
            if count % 65536 == 0:
                bar.update(file.buffer.tell() - bar.n)
            if fields and fields != [""]:
                yield line, fields
    except csv.Error as error:  # only the CSV reader raises it
        raise DataFormatError(path, reader.line_num, f"malformed CSV: {error}") from None


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, str]:
    # Text files decode in blocks, so the failing line is found again line by line in bytes.
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as error:
                return number, error.reason
    return number, "undecodable bytes"


def _resolve_columns(path, lines, columns, n_fields, header) -> tuple[dict[str, int], int | None]:
    """Field positions of the requested columns, reading the header line when there is one."""
    if not header:
        return {name: ref for name, (ref, _) in columns.items()}, n_fields
    first = next(lines, None)
    if first is None:
        raise DataFormatError(path, 1, "empty file: expected a header line")
    line, names = first
    # A byte-order mark (spreadsheet exports) must not hide the first column's name.
    names = [name.strip().lstrip("\ufeff") for name in names]
    missing = [ref for ref, _ in columns.values() if isinstance(ref, str) and ref not in names]
    if missing:
        raise DataFormatError(path, line, f"header {names} has no column {', '.join(map(repr, missing))}")
    positions = {name: names.index(ref) if isinstance(ref, str) else ref for name, (ref, _) in columns.items()}
    return positions, n_fields if n_fields is not None else len(names)


@contextmanager
def _gc_paused():
    # Millions of short-lived lists would trigger the cycle collector over and over (3-5x slower).
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _chunks(path, lines, n_fields) -> Iterator[tuple[list[list[str]], list[int]]]:
    """Groups lines into chunks of rows, checking each line's field count."""
    rows, line_numbers = [], []
    for line, fields in lines:
        if n_fields is not None and len(fields) != n_fields:
            raise DataFormatError(path, line, f"expected {n_fields} fields, found {len(fields)}")
        rows.append(fields)
        line_numbers.append(line)
        if len(rows) == _CHUNK_LINES:
            yield rows, line_numbers
            rows, line_numbers = [], []
    if rows:
        yield rows, line_numbers


def _convert_chunk(path, rows, line_numbers, columns, positions) -> tuple[dict, np.ndarray]:
    """The chunk's requested columns, and its line numbers as (R,) int64."""
    width = min(map(len, rows))
    chunk = {}
    for name, (_, kind) in columns.items():
        position = positions[name]
        if position >= width:
            row = next(r for r, fields in enumerate(rows) if len(fields) <= position)
            raise DataFormatError(path, line_numbers[row], f"no field {position + 1} ({name!r})")
        values = [fields[position] for fields in rows]
        chunk[name] = values if kind is str else _parse_numbers(path, values, line_numbers, kind, name)
    return chunk, np.asarray(line_numbers, dtype=np.int64)


def _parse_numbers(path, values: list[str], line_numbers: list[int], kind, name: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # an overflow to inf is reported below, with its line
            numbers = np.asarray(values).astype(kind)
    except ValueError:
        # Only on failure: find the first value numpy rejects, to name its line.
        for value, line in zip(values, line_numbers):
            try:
                np.asarray([value]).astype(kind)
            except ValueError:
                raise DataFormatError(
                    path, line, f"field {name!r}: {value!r} is not a valid {np.dtype(kind).name}"
                ) from None
        raise
    # numpy reads "nan" and "inf" as floats; no rating, timestamp or other data value may be one
    not_finite = np.flatnonzero(~np.isfinite(numbers)) if numbers.dtype.kind == "f" else ()
    if len(not_finite):
        row = not_finite[0]
        raise DataFormatError(path, line_numbers[row], f"field {name!r}: {values[row]!r} is not a finite number")
    return numbers


def _concatenate(parts: Sequence, kind):
    if kind is str:
        return [value for part in parts for value in part]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=kind)
