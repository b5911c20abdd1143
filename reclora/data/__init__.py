"""Recommendation data for RecLoRA: loaders, preprocessing, compact histories, a synthetic default.

    from reclora.data import load_dataset, print_statistics
    dataset = load_dataset("ml-100k", "/path/to/ml-100k")   # or load_dataset() for synthetic data
    train = dataset.split("train")                           # (n,) int64 sample indices
    batch = dataset.histories(train[:256], max_length=60)    # padded item ids, ratings, lengths
    labels = dataset.samples.label[train[:256]]

See dataset.py for the layout of the arrays and preprocess.py for the sample and split rules.
"""

from reclora.data.cache import load_cached_dataset, save_dataset
from reclora.data.dataset import SPLITS, History, HistoryBatch, RecDataset, Samples, UserSequences
from reclora.data.generic import CsvSource
from reclora.data.loading import SOURCES, data_directory, load_dataset, make_source
from reclora.data.movielens import MovieLens1M, MovieLens100K, MovieLensCsv, MovieLensLatest
from reclora.data.parsing import DataFormatError, read_table
from reclora.data.preprocess import PreprocessConfig, preprocess
from reclora.data.statistics import dataset_statistics, format_statistics
from reclora.data.synthetic import SyntheticSource
from reclora.data.tables import Interactions, ItemTable, RawDataset, UserTable


def print_statistics(dataset: RecDataset) -> None:
    """Prints `dataset_statistics(dataset)` as a table."""
    print(format_statistics(dataset_statistics(dataset)))


__all__ = [
    "SOURCES",
    "SPLITS",
    "CsvSource",
    "DataFormatError",
    "History",
    "HistoryBatch",
    "Interactions",
    "ItemTable",
    "MovieLens100K",
    "MovieLens1M",
    "MovieLensCsv",
    "MovieLensLatest",
    "PreprocessConfig",
    "RawDataset",
    "RecDataset",
    "Samples",
    "SyntheticSource",
    "UserSequences",
    "UserTable",
    "data_directory",
    "dataset_statistics",
    "format_statistics",
    "load_cached_dataset",
    "load_dataset",
    "make_source",
    "preprocess",
    "print_statistics",
    "read_table",
    "save_dataset",
]
