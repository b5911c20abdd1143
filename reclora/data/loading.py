"""`load_dataset`: the one entry point from a dataset's name to a processed, cached `RecDataset`."""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Optional

from reclora.data.cache import cache_entry_name, load_cached_dataset, save_dataset
from reclora.data.dataset import RecDataset
from reclora.data.generic import CsvSource
from reclora.data.movielens import MovieLens1M, MovieLens100K, MovieLensCsv, MovieLensLatest
from reclora.data.preprocess import PreprocessConfig, preprocess
from reclora.data.source import DataSource, DirectorySource
from reclora.data.synthetic import SyntheticSource
from reclora.files import cache_folder

SOURCES = {
    source.name: source
    for source in (SyntheticSource, MovieLens100K, MovieLens1M, MovieLensCsv, MovieLensLatest, CsvSource)
}


def load_dataset(
    name: str = "synthetic",
    data_dir: Optional[os.PathLike] = None,
    *,
    label_threshold: float = 3.0,
    min_history: int = 5,
    train_fraction: float = 0.8,
    valid_fraction: float = 0.1,
    cache: bool = True,
    cache_dir: Optional[os.PathLike] = None,
    progress: bool = True,
    **options,
) -> RecDataset:
    """Loads, preprocesses and caches a dataset.

    name: "synthetic" (generated, the default), "ml-100k", "ml-1m", "ml-25m", "ml-latest"
        (a MovieLens directory as GroupLens distributes it) or "csv" (see `CsvSource`).
    data_dir: the directory holding the files; default $RECLORA_DATA_DIR/<name>.
    label_threshold, min_history, train_fraction, valid_fraction: see preprocess.py.
    cache, cache_dir: reuse processed arrays from `cache_dir` (default: the `datasets` folder of
        reclora.files.default_cache_dir()); the key covers the source files and every parameter.
    options: the source's own options, e.g. n_users / seed for synthetic, column names for csv.
    """
    source = make_source(name, data_dir, **options)
    config = PreprocessConfig(label_threshold, min_history, train_fraction, valid_fraction)
    files = source.files()  # raises first, naming every missing file
    if not cache:
        return preprocess(source.read(progress), config)
    folder = Path(cache_dir) if cache_dir is not None else cache_folder("datasets")
    entry = folder / cache_entry_name(source, files, config)
    if entry.exists():
        try:
            return load_cached_dataset(entry)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            warnings.warn(f"rebuilding the unreadable cache entry {entry}: {error}", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    dataset = preprocess(source.read(progress), config)
    save_dataset(dataset, entry)
    return dataset


def make_source(name: str, data_dir: Optional[os.PathLike] = None, **options) -> DataSource:
    """The `DataSource` for a dataset name (see `load_dataset`)."""
    directory = data_directory(name, data_dir)
    source = SOURCES[name]
    return source(**options) if directory is None else source(directory, **options)


def data_directory(name: str, data_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    """Where a dataset's files lie: data_dir, else $RECLORA_DATA_DIR/<name>; None for generated data.

    Raises ValueError when the dataset reads files and neither says where, or when generated
    data is given a directory.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(SOURCES)}")
    if not issubclass(SOURCES[name], DirectorySource):
        if data_dir is not None:
            raise ValueError(f"the {name} dataset is generated: it takes no data_dir")
        return None
    if data_dir is not None:
        return Path(data_dir)
    root = os.environ.get("RECLORA_DATA_DIR")
    if not root:
        raise ValueError(f"{name}: pass data_dir (--data-dir: the directory with its files) or set RECLORA_DATA_DIR")
    return Path(root) / name
