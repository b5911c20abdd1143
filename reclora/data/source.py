"""The common shape of a dataset's origin: the files it reads and the options that shape it.

`load_dataset` uses `files()` and `options()` to key the cache before anything is read.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import ClassVar

from reclora.data.tables import RawDataset


@dataclasses.dataclass(frozen=True)
class DataSource(abc.ABC):
    name: ClassVar[str]

    def files(self) -> list:
        """The source files (their sizes and mtimes key the cache); raises if one is missing."""
        return []

    def options(self) -> dict:
        """Everything besides the files that decides what `read` returns."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "data_dir"}

    @abc.abstractmethod
    def read(self, progress: bool = True) -> RawDataset:
        """Reads (or generates) the raw dataset."""


@dataclasses.dataclass(frozen=True)
class DirectorySource(DataSource):
    """A dataset stored as fixed file names in one directory."""

    data_dir: Path
    file_names: ClassVar[tuple] = ()

    def path(self, file_name: str) -> Path:
        return Path(self.data_dir) / file_name

    def files(self) -> list:
        paths = [self.path(name) for name in self.file_names]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.name}: {Path(self.data_dir)} lacks {', '.join(missing)} (expected {', '.join(self.file_names)})"
            )
        return paths
