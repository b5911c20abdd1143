"""Dataset statistics as a dict, and a printer for them."""

from __future__ import annotations

import datetime
import math

import numpy as np

from reclora.data.dataset import SPLITS, RecDataset

HISTORY_PERCENTILES = (5, 25, 50, 75, 95, 99)


def dataset_statistics(dataset: RecDataset) -> dict:
    """Sizes, positive rates and history lengths of a processed dataset (plain Python values)."""
    sequences, samples = dataset.sequences, dataset.samples
    splits = {}
    for split in SPLITS:
        indices = dataset.split_range(split)
        labels = samples.label[indices.start : indices.stop]
        times = samples.timestamp[indices.start : indices.stop]
        splits[split] = {
            "samples": len(labels),
            "positive_rate": _reduce(np.mean, labels),
            "first_timestamp": int(times[0]) if len(times) else None,
            "last_timestamp": int(times[-1]) if len(times) else None,
        }
    history = samples.history_length
    return {
        "name": dataset.name,
        "users": int(np.count_nonzero(sequences.lengths())),
        "items": int(np.count_nonzero(np.bincount(sequences.item, minlength=dataset.n_items))),
        "catalog_users": dataset.n_users,
        "catalog_items": dataset.n_items,
        "interactions": len(sequences),
        "interaction_positive_rate": _reduce(np.mean, sequences.label),
        "samples": len(samples),
        "splits": splits,
        "history_length": {
            "mean": _reduce(np.mean, history),
            "min": _reduce(np.min, history),
            **{f"p{q}": _reduce(np.percentile, history, q) for q in HISTORY_PERCENTILES},
            "max": _reduce(np.max, history),
        },
        "config": dict(dataset.config),
    }


def _reduce(function, values: np.ndarray, *args) -> float:
    """function(values, *args) as a float; NaN for no values (an empty split)."""
    return float(function(values, *args)) if len(values) else math.nan


def format_statistics(statistics: dict) -> str:
    """The statistics from `dataset_statistics` as an aligned text block."""
    s = statistics
    lines = [
        f"dataset {s['name']}",
        f"  users        {s['users']:,} with interactions ({s['catalog_users']:,} in the catalog)",
        f"  items        {s['items']:,} rated ({s['catalog_items']:,} in the catalog)",
        f"  interactions {s['interactions']:,}, positive rate {s['interaction_positive_rate']:.3f}",
        f"  samples      {s['samples']:,} (history >= {s['config']['min_history']})",
    ]
    for split, row in s["splits"].items():
        span = f"{_time(row['first_timestamp'])} .. {_time(row['last_timestamp'])}"
        lines.append(f"    {split:<6} {row['samples']:>10,}  positive rate {row['positive_rate']:.3f}  {span}")
    history = "  ".join(f"{key} {value:g}" for key, value in s["history_length"].items())
    lines.append(f"  history length  {history}")
    return "\n".join(lines)


def _time(timestamp) -> str:
    # MovieLens timestamps are Unix seconds; other units (or none) are shown as they are.
    if timestamp is None:
        return "-"
    if 0 <= timestamp < 10**10:
        return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return str(timestamp)
