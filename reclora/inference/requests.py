"""Requests in the dataset's own ids -> samples the model layer can read, with the training protocol's history.

The model, its retriever and the CRM inputs read a batch by sample index from one RecDataset's
`samples` table. A ServingTable is the run's dataset with one more user (the cold-start user: no
attributes, no history) whose `samples` table holds the requests being scored.

History rule (the protocol's, reclora.data.preprocess): a user's interactions are ordered by
(timestamp, item); a request (user, item, t) sees the interactions that come before (t, item) in
that order, i.e. everything strictly before t, and at t itself those with a smaller item id,
as the training samples did (so a request for an interaction of the data sees exactly that
sample's history). No timestamp: every known interaction of the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import numpy as np

from reclora.data import RecDataset, Samples, UserTable


class UnknownItemError(ValueError):
    """An item id the run has no text or embedding for."""

    def __init__(self, item, position: int):
        super().__init__(f"unknown item id {item!r}: the run's dataset has no such item (no title, no embedding)")
        self.item, self.position = item, position


class ServingTable:
    def __init__(self, dataset: RecDataset):
        """dataset: the run's dataset; it gains the cold-start user and its samples become the requests'."""
        self.dataset = dataset
        self.run_samples = dataset.samples
        self.n_known_users = dataset.n_users
        self.cold_start_user = dataset.n_users
        dataset.users = _with_unknown_user(dataset.users)
        sequences = dataset.sequences
        dataset.sequences = dataclasses.replace(sequences, offsets=np.append(sequences.offsets, sequences.offsets[-1]))

    def resolve(self, users, items, timestamps=None) -> tuple[Samples, int]:
        """The requests as samples (rows of this table) and how many came from unknown users.

        users, items: (n,) raw ids; timestamps: None or (n,) with None / NaN where a request has none.
        """
        users, items = np.asarray(users).reshape(-1), np.asarray(items).reshape(-1)
        if len(users) != len(items):
            raise ValueError(f"users and items must have the same length, got {len(users)} and {len(items)}")
        times = _timestamps(timestamps, len(users))
        item_rows = self._item_rows(items)
        user_rows, known = _rows(self.dataset.users.raw_ids[: self.n_known_users], users, "user")
        user_rows = np.where(known, user_rows, self.cold_start_user)
        lengths = np.array(
            [self._history_length(u, i, t) for u, i, t in zip(user_rows, item_rows, times)], dtype=np.int64
        )
        samples = Samples(
            user_rows,
            lengths,
            item_rows,
            np.zeros(len(users), np.float32),
            np.zeros(len(users), np.int8),
            np.where(np.isnan(times), -1, times).astype(np.int64),
        )
        return samples, int((~known).sum())

    def run_requests(self, samples: np.ndarray) -> Samples:
        """Samples of the run's own data (by index) as requests: the very histories the run used."""
        run = self.run_samples
        return Samples(
            run.user[samples],
            run.history_length[samples],
            run.item[samples],
            run.rating[samples],
            run.label[samples],
            run.timestamp[samples],
        )

    def serve(self, samples: Samples) -> None:
        """Makes the requests the samples the model reads (index i = request i)."""
        self.dataset.samples = samples

    def _item_rows(self, items) -> np.ndarray:
        rows, known = _rows(self.dataset.items.raw_ids, items, "item")
        if not known.all():
            position = int(np.argmin(known))
            raise UnknownItemError(items[position : position + 1].tolist()[0], position)
        return rows

    def _history_length(self, user: int, item: int, timestamp: float) -> int:
        sequences = self.dataset.sequences
        start, end = sequences.offsets[user], sequences.offsets[user + 1]
        if np.isnan(timestamp):
            return int(end - start)
        times = sequences.timestamp[start:end]
        before = int(np.searchsorted(times, timestamp, side="left"))
        tied = int(np.searchsorted(times, timestamp, side="right"))
        return before + int((sequences.item[start + before : start + tied] < item).sum())


def _with_unknown_user(users: UserTable) -> UserTable:
    """users plus one row whose attributes are all unknown (code 0)."""
    raw_ids = np.append(users.raw_ids, np.zeros(1, dtype=users.raw_ids.dtype))
    codes = np.concatenate([users.codes, np.zeros((1, users.codes.shape[1]), dtype=users.codes.dtype)])
    return dataclasses.replace(users, raw_ids=raw_ids, codes=codes)


def _rows(catalog: np.ndarray, ids: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids in catalog (ascending raw ids) and whether each was found."""
    ids = _as_id_type(ids, catalog.dtype, what)
    rows = np.searchsorted(catalog, ids).clip(max=max(len(catalog) - 1, 0))
    found = catalog[rows] == ids if len(catalog) else np.zeros(len(ids), dtype=bool)
    return rows.astype(np.int64), found


def _as_id_type(ids: np.ndarray, dtype, what: str) -> np.ndarray:
    if dtype.kind not in "iu":
        return ids.astype(str)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    converted = np.empty(len(ids), dtype=np.int64)
    for position, value in enumerate(ids.tolist()):
        try:
            converted[position] = int(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{what} id {value!r} (request {position}) is not an integer, as this dataset's ids are"
            ) from None
    return converted


def _timestamps(timestamps: Optional[Sequence], n: int) -> np.ndarray:
    """(n,) float64, NaN where a request has no timestamp."""
    if timestamps is None:
        return np.full(n, np.nan)
    values = [np.nan if value is None else value for value in np.asarray(timestamps, dtype=object).reshape(-1).tolist()]
    if len(values) != n:
        raise ValueError(f"timestamps must have one entry per request ({n}), got {len(values)}")
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("timestamps must be numbers (seconds, as in the dataset), or None for none") from None
