"""Progress bars: tqdm on a terminal; in a log file or a pipe, one plain line every tenth of the way.

tqdm redraws its bar with carriage returns several times a second: a terminal shows one line,
a log (CI, nohup, a job scheduler) keeps every redraw, megabytes of them for a long epoch.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_EVERY = 0.1  # of the total, between two lines of a LineProgress


def progress_bar(
    iterable=None, *, desc="", total=None, initial=0, unit="it", unit_scale=False, leave=True, disable=False, file=None
):
    """tqdm(...) with these options when file (default stderr) is a terminal, else a LineProgress."""
    file = file or sys.stderr
    if disable or _is_terminal(file):
        return tqdm(
            iterable,
            desc=desc,
            total=total,
            initial=initial,
            unit=unit,
            unit_scale=unit_scale,
            leave=leave,
            disable=disable,
            file=file,
        )
    return LineProgress(iterable, desc=desc, total=total, initial=initial, unit=unit, unit_scale=unit_scale, file=file)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LineProgress:
    """tqdm's interface as the package uses it, writing a line of tqdm's text at each tenth and at the end."""

    def __init__(self, iterable=None, *, desc="", total=None, initial=0, unit="it", unit_scale=False, file=None):
        self.iterable = iterable
        self.total = len(iterable) if total is None and iterable is not None else total
        self.n = self.initial = initial
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.file = file or sys.stderr
        self.postfix = None
        self.start = time.monotonic()
        self.printed_tenth, self.printed_n = self._tenth(), initial
        self.closed = False

    def _tenth(self) -> int:
        return int(self.n / self.total / LINE_EVERY) if self.total else 0

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1) -> None:
        self.n += n
        if self._tenth() > self.printed_tenth:
            self.printed_tenth = self._tenth()
            self._write()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._write()
        self.closed = True

    def _write(self) -> None:
        self.printed_n = self.n
        line = tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self.start,
            prefix=self.desc,
            unit=self.unit,
            unit_scale=self.unit_scale,
            postfix=self.postfix,
            initial=self.initial,
        )
        self.file.write(line + "\n")
        self.file.flush()
