"""The processed dataset the models consume: per-user sequences, samples, splits.

Layout (N interactions, U users, S samples, I items):
- `sequences`: every user's interactions in the global order (timestamp, user, item) as CSR
  arrays, so any history is a slice (a view, no copy).
- `samples`: one row per kept interaction, in the global order; sample s predicts
  `samples.item[s]` for `samples.user[s]` from the `samples.history_length[s]` interactions that
  precede it in that user's sequence.
- splits: contiguous ranges of samples in the global order (train, then valid, then test).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from reclora.data.tables import ItemTable, UserTable

SPLITS = ("train", "valid", "test")


@dataclass
class UserSequences:
    """Each user's interactions in the global order, as CSR arrays.

    offsets: (U + 1,) int64; user u's interactions are rows offsets[u]:offsets[u + 1].
    item: (N,) int64. rating: (N,) float32. label: (N,) int8 in {0, 1}. timestamp: (N,) int64.
    """

    offsets: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return len(self.item)

    def lengths(self) -> np.ndarray:
        """(U,) int64: how many interactions each user has."""
        return np.diff(self.offsets)


@dataclass
class Samples:
    """S samples in the global order; each is one interaction of one user.

    user: (S,) int64. history_length: (S,) int64, how many of the user's interactions precede
    the target (its position in the user's sequence). item, rating, label, timestamp: (S,) the
    target's, with the dtypes of `UserSequences`.
    """

    user: np.ndarray
    history_length: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray

    @classmethod
    def at(cls, sequences: UserSequences, user: np.ndarray, history_length: np.ndarray) -> Samples:
        """The samples whose targets are interaction `history_length` of each `user`'s sequence."""
        target = sequences.offsets[user] + history_length
        return cls(
            user,
            history_length,
            sequences.item[target],
            sequences.rating[target],
            sequences.label[target],
            sequences.timestamp[target],
        )

    def __len__(self) -> int:
        return len(self.user)


class History(NamedTuple):
    """One sample's full history, oldest first: views into `UserSequences`, (H,) each."""

    item_ids: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray


class HistoryBatch(NamedTuple):
    """Padded histories of B samples, chronological, L positions each.

    item_ids: (B, L) int64; padding holds `pad_id`. ratings: (B, L) float32; padding holds 0.
    lengths: (B,) int64 valid positions per row. With align="left" row b's valid positions
    are [0, lengths[b]) (the `lengths` convention of reclora_kernels' retrieval ops); with
    align="right" they are [L - lengths[b], L), the most recent item always in column L - 1.
    numpy arrays, or torch tensors with as_tensor=True.
    """

    item_ids: Any
    ratings: Any
    lengths: Any


@dataclass
class RecDataset:
    """A dataset after preprocessing (see the module docstring for the layout).

    name: the dataset's name. items, users: metadata tables (item / user ids are their rows).
    split_sizes: {"train": n, "valid": n, "test": n} samples, in this order.
    config: the preprocessing parameters that produced it.
    """

    name: str
    items: ItemTable
    users: UserTable
    sequences: UserSequences
    samples: Samples
    split_sizes: dict
    config: dict

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.samples)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of everything in the dataset: every array, table, split size and parameter.

        What is trained on it (the CRM, a checkpoint) is keyed by it, so that a change to any
        of its data, even one that keeps the sizes, is never met with a model trained before.
        """
        digest = hashlib.sha256()
        _hash_into(digest, self)
        return digest.hexdigest()[:16]

    def split_range(self, split: str) -> range:
        """The sample indices of a split: "train", "valid" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        start = sum(self.split_sizes[name] for name in SPLITS[: SPLITS.index(split)])
        return range(start, start + self.split_sizes[split])

    def split(self, split: str) -> np.ndarray:
        """(n,) int64 sample indices of a split, in the global order."""
        indices = self.split_range(split)
        return np.arange(indices.start, indices.stop, dtype=np.int64)

    def rating_levels(self) -> np.ndarray:
        """(R,) float32 ascending distinct ratings: `np.searchsorted(levels, r)` gives rating codes."""
        return np.unique(self.sequences.rating)

    def history(self, sample: int) -> History:
        """Sample `sample`'s whole history, oldest first, as views (no copy)."""
        start = self.sequences.offsets[self.samples.user[sample]]
        rows = slice(start, start + self.samples.history_length[sample])
        return History(self.sequences.item[rows], self.sequences.rating[rows], self.sequences.timestamp[rows])

    def histories(
        self, samples, max_length: int | None = None, align: str = "left", pad_id: int = 0, as_tensor: bool = False
    ) -> HistoryBatch:
        """The last `max_length` history items (all of them if None) of a batch of samples.

        samples: (B,) sample indices (numpy, torch or a sequence). L is `max_length`, or the
        longest history in the batch when None. See `HistoryBatch` for the layout.
        """
        if align not in ("left", "right"):
            raise ValueError(f"align must be 'left' or 'right', got {align!r}")
        if max_length is not None and max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        full_length = self.samples.history_length[samples]
        end = self.sequences.offsets[self.samples.user[samples]] + full_length
        lengths = full_length if max_length is None else np.minimum(full_length, max_length)
        width = int(lengths.max(initial=0)) if max_length is None else max_length
        columns = np.arange(width)
        if align == "left":
            rows = (end - lengths)[:, None] + columns
            valid = columns < lengths[:, None]
        else:
            rows = (end - width)[:, None] + columns
            valid = columns >= (width - lengths)[:, None]
        rows = np.where(valid, rows, 0)
        batch = HistoryBatch(
            np.where(valid, self.sequences.item[rows], pad_id).astype(np.int64, copy=False),
            np.where(valid, self.sequences.rating[rows], 0).astype(np.float32, copy=False),
            lengths.astype(np.int64, copy=False),
        )
        if as_tensor:
            # Imported here so that data preparation never pays for loading torch.
            import torch

            batch = HistoryBatch(*map(torch.from_numpy, batch))
        return batch


def _hash_into(digest, value) -> None:
    """Feeds value's content to digest: dataclasses field by field, arrays with dtype and shape."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            digest.update(field.name.encode())
            _hash_into(digest, getattr(value, field.name))
    elif isinstance(value, np.ndarray) and value.dtype != object:
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    else:
        value = value.tolist() if isinstance(value, np.ndarray) else value
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
