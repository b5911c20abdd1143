"""Samples, histories and splits: against a plain-Python reference, and their invariants."""

import numpy as np
import pytest
import torch

from reclora.data import (
    Interactions,
    ItemTable,
    PreprocessConfig,
    RawDataset,
    UserTable,
    load_dataset,
    preprocess,
)


def _random_raw(seed: int, n_users=7, n_items=9, n=120, label=False) -> RawDataset:
    """Few distinct timestamps, so same-second ratings (even duplicates) are common."""
    rng = np.random.default_rng(seed)
    interactions = Interactions(
        user=rng.integers(0, n_users, n),
        item=rng.integers(0, n_items, n),
        rating=rng.integers(1, 6, n).astype(np.float32),
        timestamp=rng.integers(0, 15, n),
        label=rng.integers(0, 2, n).astype(np.int8) if label else None,
    )
    titles = [f"t{i}" for i in range(n_items)]
    items = ItemTable(np.arange(n_items), titles, [], np.zeros((n_items, 0), bool), titles)
    return RawDataset("random", interactions, items, UserTable.without_attributes(np.arange(n_users)))


def _reference(raw: RawDataset, config: PreprocessConfig):
    """Samples as (user, item, rating, label, timestamp, history items, history ratings) tuples."""
    i = raw.interactions
    labels = i.label if i.label is not None else (i.rating > config.label_threshold).astype(np.int8)
    rows = sorted(range(len(i)), key=lambda r: (i.timestamp[r], i.user[r], i.item[r]))  # stable
    seen = {}
    samples = []
    for r in rows:
        history = seen.setdefault(i.user[r], [])
        if len(history) >= config.min_history:
            target = (i.user[r], i.item[r], i.rating[r], labels[r], i.timestamp[r])
            samples.append((*target, [i.item[h] for h in history], [i.rating[h] for h in history]))
        history.append(r)
    return samples


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_history", [0, 5])
@pytest.mark.parametrize("given_labels", [False, True])
def test_matches_reference(seed, min_history, given_labels):
    raw = _random_raw(seed, label=given_labels)
    config = PreprocessConfig(min_history=min_history)
    dataset = preprocess(raw, config)
    expected = _reference(raw, config)
    samples = dataset.samples
    assert len(dataset) == len(expected)
    for s, (user, item, rating, label, timestamp, history_items, history_ratings) in enumerate(expected):
        assert (samples.user[s], samples.item[s], samples.rating[s], samples.label[s], samples.timestamp[s]) == (
            user,
            item,
            rating,
            label,
            timestamp,
        )
        history = dataset.history(s)
        assert history.item_ids.tolist() == history_items
        assert history.ratings.tolist() == history_ratings
    n = len(expected)
    n_train, n_valid = int(0.8 * n), int(0.1 * n)
    assert dataset.split_sizes == {"train": n_train, "valid": n_valid, "test": n - n_train - n_valid}


def test_label_rule_and_threshold():
    raw = _random_raw(0)
    for threshold in (3.0, 4.0):
        samples = preprocess(raw, PreprocessConfig(label_threshold=threshold, min_history=0)).samples
        assert np.array_equal(samples.label, (samples.rating > threshold).astype(np.int8))
        assert samples.label.dtype == np.int8


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", n_users=300, n_items=400, n_ratings=20_000, cache=False)


def test_no_future_leakage(synthetic):
    sequences, samples = synthetic.sequences, synthetic.samples
    users = np.repeat(np.arange(synthetic.n_users), sequences.lengths())
    # each user's sequence follows the global (timestamp, user, item) order...
    key = np.lexsort((sequences.item, sequences.timestamp, users))
    assert np.array_equal(key, np.arange(len(sequences)))
    # ...and a history is the prefix of its user's sequence before the target
    target = sequences.offsets[samples.user] + samples.history_length
    assert np.array_equal(sequences.item[target], samples.item)
    assert np.array_equal(sequences.timestamp[target], samples.timestamp)
    assert (samples.history_length <= sequences.lengths()[samples.user] - 1).all()
    for s in np.random.default_rng(0).choice(len(samples), 200, replace=False):
        assert (synthetic.history(s).timestamps <= samples.timestamp[s]).all()


def test_samples_and_splits_in_global_order(synthetic):
    samples = synthetic.samples
    order = np.lexsort((samples.item, samples.user, samples.timestamp))
    assert np.array_equal(order, np.arange(len(samples)))
    train, valid, test = (synthetic.split(name) for name in ("train", "valid", "test"))
    assert np.array_equal(np.concatenate([train, valid, test]), np.arange(len(samples)))
    assert samples.timestamp[train].max() <= samples.timestamp[valid].min()
    assert samples.timestamp[valid].max() <= samples.timestamp[test].min()
    assert len(train) == int(0.8 * len(samples)) and len(valid) == int(0.1 * len(samples))


def test_drop_rule(synthetic):
    samples, lengths = synthetic.samples, synthetic.sequences.lengths()
    assert samples.history_length.min() == 5
    assert len(samples) == (lengths - np.minimum(lengths, 5)).sum()
    assert np.array_equal(np.bincount(samples.user, minlength=synthetic.n_users), np.maximum(lengths - 5, 0))


def test_history_is_a_view(synthetic):
    history = synthetic.history(123)
    assert np.shares_memory(history.item_ids, synthetic.sequences.item)
    assert len(history.item_ids) == synthetic.samples.history_length[123]


@pytest.mark.parametrize("align", ["left", "right"])
@pytest.mark.parametrize("max_length", [None, 0, 3, 8, 400])
def test_padded_histories(synthetic, align, max_length):
    indices = np.array([0, 17, len(synthetic) - 1, 17])
    batch = synthetic.histories(indices, max_length=max_length, align=align, pad_id=-1)
    width = max(len(synthetic.history(s).item_ids) for s in indices) if max_length is None else max_length
    assert batch.item_ids.shape == batch.ratings.shape == (4, width)
    assert batch.item_ids.dtype == np.int64 and batch.ratings.dtype == np.float32 and batch.lengths.dtype == np.int64
    for row, s in enumerate(indices):
        full = synthetic.history(s)
        length = len(full.item_ids) if max_length is None else min(max_length, len(full.item_ids))
        assert batch.lengths[row] == length
        valid = slice(0, length) if align == "left" else slice(width - length, width)
        padding = np.ones(width, bool)
        padding[valid] = False
        assert np.array_equal(batch.item_ids[row, valid], full.item_ids[len(full.item_ids) - length :])
        assert np.array_equal(batch.ratings[row, valid], full.ratings[len(full.ratings) - length :])
        assert (batch.item_ids[row, padding] == -1).all() and (batch.ratings[row, padding] == 0).all()


def test_padded_histories_as_tensors(synthetic):
    batch = synthetic.histories(torch.tensor([3, 4]), max_length=6, as_tensor=True)
    assert all(isinstance(part, torch.Tensor) for part in batch)
    assert batch.item_ids.dtype == torch.int64 and batch.lengths.tolist() == [6, 6]
    empty = synthetic.histories(np.zeros(0, dtype=np.int64))
    assert empty.item_ids.shape == (0, 0)


def test_bad_arguments(synthetic):
    with pytest.raises(ValueError, match="align"):
        synthetic.histories([0], align="middle")
    with pytest.raises(ValueError, match="split"):
        synthetic.split("validation")
    with pytest.raises(ValueError, match="train_fraction"):
        PreprocessConfig(train_fraction=0.95, valid_fraction=0.1)
