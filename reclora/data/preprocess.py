"""From raw interactions to samples and splits, as in the RecLoRA / ReLLa papers.

1. label = rating > label_threshold (3.0 gives MovieLens 100K/1M's "4 or 5 stars" and
   25M's "> 3.0"), unless the source gives labels itself.
2. All interactions are ordered by (timestamp, user, item), stably: same-second ratings keep
   this order and none is dropped.
3. Every interaction is a sample whose history is all of its user's interactions before it in
   that order; samples with fewer than `min_history` history items are dropped.
4. The remaining samples are split in the global order: train = the first
   int(train_fraction * S), valid = the next int(valid_fraction * S), test = the rest.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reclora.data.dataset import RecDataset, Samples, UserSequences
from reclora.data.tables import RawDataset


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    label_threshold: float = 3.0
    min_history: int = 5
    train_fraction: float = 0.8
    valid_fraction: float = 0.1

    def __post_init__(self):
        if self.min_history < 0:
            raise ValueError(f"min_history must be >= 0, got {self.min_history}")
        train, valid = self.train_fraction, self.valid_fraction
        if not (train >= 0 and valid >= 0 and train + valid <= 1):
            raise ValueError(
                f"train_fraction and valid_fraction must be >= 0 and sum to at most 1, "
                f"got {self.train_fraction} and {self.valid_fraction}"
            )


def preprocess(raw: RawDataset, config: PreprocessConfig = PreprocessConfig()) -> RecDataset:
    """Labels, global order, per-user sequences, samples and splits (see the module docstring)."""
    interactions = raw.interactions
    labels = interactions.label
    if labels is None:
        labels = (interactions.rating > config.label_threshold).astype(np.int8)
    # lexsort is stable and sorts by its last key first.
    global_order = np.lexsort((interactions.item, interactions.user, interactions.timestamp))
    user = interactions.user[global_order]
    # Grouping by user keeps the global order inside each user's sequence.
    by_user = np.argsort(user, kind="stable")
    offsets = np.zeros(len(raw.users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=len(raw.users)), out=offsets[1:])
    sequence_rows = global_order[by_user]
    sequences = UserSequences(
        offsets,
        interactions.item[sequence_rows].astype(np.int64, copy=False),
        interactions.rating[sequence_rows].astype(np.float32, copy=False),
        labels[sequence_rows].astype(np.int8, copy=False),
        interactions.timestamp[sequence_rows].astype(np.int64, copy=False),
    )
    position = np.empty(len(user), dtype=np.int64)  # in its user's sequence, per global rank
    position[by_user] = np.arange(len(user)) - offsets[user[by_user]]
    kept = position >= config.min_history
    samples = Samples.at(sequences, user[kept].astype(np.int64, copy=False), position[kept])
    n_train = int(config.train_fraction * len(samples))
    n_valid = int(config.valid_fraction * len(samples))
    split_sizes = {"train": n_train, "valid": n_valid, "test": len(samples) - n_train - n_valid}
    return RecDataset(raw.name, raw.items, raw.users, sequences, samples, split_sizes, dataclasses.asdict(config))
