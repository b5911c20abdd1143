"""The synthetic default: deterministic by seed, MovieLens-like, and learnable."""

import re

import numpy as np
import pytest

from reclora.data import SyntheticSource, dataset_statistics, load_dataset
from reclora.data.synthetic import GENRE_WORDS
from tests.data.helpers import roc_auc

SMALL = dict(n_users=150, n_items=200, n_ratings=8000)


@pytest.fixture(scope="module")
def default():
    return load_dataset("synthetic", cache=False)


def test_deterministic_by_seed():
    a, b = SyntheticSource(seed=5, **SMALL).read(), SyntheticSource(seed=5, **SMALL).read()
    c = SyntheticSource(seed=6, **SMALL).read()
    for field in ("user", "item", "rating", "timestamp"):
        assert np.array_equal(getattr(a.interactions, field), getattr(b.interactions, field))
    assert a.items.titles == b.items.titles and np.array_equal(a.users.codes, b.users.codes)
    assert not np.array_equal(a.interactions.item, c.interactions.item)
    assert a.items.titles != c.items.titles


def test_sizes_and_movielens_shape(default):
    statistics = dataset_statistics(default)
    assert (default.n_users, default.n_items, statistics["interactions"]) == (1000, 1500, 100_000)
    ratings = default.sequences.rating
    assert set(np.unique(ratings)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.5 < statistics["interaction_positive_rate"] < 0.6
    assert default.sequences.lengths().min() >= 20
    assert default.users.attribute_names == ("gender", "age", "occupation", "zip")
    assert set(default.users.vocabularies[0]) == {"unknown", "male", "female"}
    # same-second ratings happen, within a user's sequence
    owner = np.repeat(np.arange(default.n_users), default.sequences.lengths())
    same_second = (np.diff(default.sequences.timestamp) == 0)[owner[1:] == owner[:-1]]
    assert same_second.mean() > 0.05


def test_titles_share_words_within_a_genre(default):
    items = default.items
    for item in range(0, len(items), 7):
        words = set(re.findall(r"[A-Z][\w']+", items.titles[item])) - {"The"}
        own = {word for genre in items.genres_of(item) for word in GENRE_WORDS[genre]}
        assert words and words <= own, (items.titles[item], items.genres_of(item))
        assert re.search(r"\(\d{4}\)$", items.titles[item])
        assert items.descriptions[item].startswith(items.titles[item] + ", ")


def test_learnable_from_simple_statistics(default):
    """An item's train positive rate and the user's history positive rate both rank the test set."""
    samples, train, test = default.samples, default.split("train"), default.split("test")
    count = np.bincount(samples.item[train], minlength=default.n_items)
    positives = np.bincount(samples.item[train], weights=samples.label[train], minlength=default.n_items)
    prior = samples.label[train].mean()
    item_rate = (positives + 5 * prior) / (count + 5)
    assert roc_auc(item_rate[samples.item[test]], samples.label[test]) > 0.6

    labels_so_far = np.concatenate([[0], np.cumsum(default.sequences.label)])
    start = default.sequences.offsets[samples.user[test]]
    length = samples.history_length[test]
    history_rate = (labels_so_far[start + length] - labels_so_far[start]) / length
    assert roc_auc(history_rate, samples.label[test]) > 0.6


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_ratings"):
        SyntheticSource(n_users=10, n_ratings=5)
    with pytest.raises(ValueError, match="no data_dir"):
        load_dataset("synthetic", "/tmp", cache=False)
