"""Processed datasets on disk: arrays in one .npz, texts and parameters in one .json.

A cache entry is a directory `<cache_dir>/<dataset>-<key>/`; the key hashes the dataset's name,
its source files' names, sizes and modification times, the loader's options and the
preprocessing parameters, so changing any of them builds a new entry. Entries are written to a
temporary directory and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from reclora.data.dataset import RecDataset, Samples, UserSequences
from reclora.data.preprocess import PreprocessConfig
from reclora.data.source import DataSource
from reclora.data.tables import ItemTable, UserTable
from reclora.files import atomic_directory

FORMAT_VERSION = 1
ARRAYS = "arrays.npz"
METADATA = "metadata.json"


def cache_entry_name(source: DataSource, files: list, config: PreprocessConfig) -> str:
    """`<dataset>-<key>`, the key hashing the name, `files`' sizes and mtimes, and every option."""
    stats = [(path, path.stat()) for path in files]
    key = {
        "format": FORMAT_VERSION,
        "dataset": source.name,
        "files": [{"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns} for path, stat in stats],
        "options": source.options(),
        "preprocess": dataclasses.asdict(config),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return f"{source.name}-{digest[:16]}"


def save_dataset(dataset: RecDataset, directory: Path) -> None:
    """Writes `dataset` to `directory` (created; left as is if another process made it first)."""
    with atomic_directory(directory, overwrite=False) as staging:
        _write_entry(dataset, staging)


def _write_entry(dataset: RecDataset, staging: Path) -> None:
    sequences, samples = dataset.sequences, dataset.samples
    np.savez(
        staging / ARRAYS,
        sequence_offsets=sequences.offsets,
        sequence_item=sequences.item,
        sequence_rating=sequences.rating,
        sequence_label=sequences.label,
        sequence_timestamp=sequences.timestamp,
        sample_user=samples.user,
        sample_history_length=samples.history_length,
        item_raw_ids=dataset.items.raw_ids,
        item_genres=dataset.items.genres,
        user_raw_ids=dataset.users.raw_ids,
        user_codes=dataset.users.codes,
    )
    metadata = {
        "format": FORMAT_VERSION,
        "name": dataset.name,
        "config": dataset.config,
        "split_sizes": dataset.split_sizes,
        "item_titles": dataset.items.titles,
        "item_genre_names": dataset.items.genre_names,
        "item_descriptions": dataset.items.descriptions,
        "user_attribute_names": list(dataset.users.attribute_names),
        "user_vocabularies": [list(vocabulary) for vocabulary in dataset.users.vocabularies],
    }
    (staging / METADATA).write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")


def load_cached_dataset(directory: Path) -> RecDataset:
    """Reads a dataset written by `save_dataset`."""
    directory = Path(directory)
    metadata = json.loads((directory / METADATA).read_text(encoding="utf-8"))
    if metadata.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory}: cache format {metadata.get('format')}, expected {FORMAT_VERSION}")
    with np.load(directory / ARRAYS, allow_pickle=False) as arrays:
        arrays = dict(arrays)
    sequences = UserSequences(
        arrays["sequence_offsets"],
        arrays["sequence_item"],
        arrays["sequence_rating"],
        arrays["sequence_label"],
        arrays["sequence_timestamp"],
    )
    items = ItemTable(
        arrays["item_raw_ids"],
        metadata["item_titles"],
        metadata["item_genre_names"],
        arrays["item_genres"],
        metadata["item_descriptions"],
    )
    users = UserTable(
        arrays["user_raw_ids"],
        tuple(metadata["user_attribute_names"]),
        arrays["user_codes"],
        tuple(tuple(vocabulary) for vocabulary in metadata["user_vocabularies"]),
    )
    samples = Samples.at(sequences, arrays["sample_user"], arrays["sample_history_length"])
    return RecDataset(metadata["name"], items, users, sequences, samples, metadata["split_sizes"], metadata["config"])
