"""The on-disk cache: round trip, reuse, and a new entry whenever an input changes."""

import os

import numpy as np
import pytest

import reclora.data.loading as loading
from reclora.data import load_dataset
from tests.data.helpers import write_text

SMALL = dict(n_users=40, n_items=60, n_ratings=1500, seed=3)


def _assert_same(a, b):
    assert (a.name, a.split_sizes, a.config) == (b.name, b.split_sizes, b.config)
    for part in ("sequences", "samples"):
        for field, value in vars(getattr(a, part)).items():
            other = getattr(getattr(b, part), field)
            assert value.dtype == other.dtype and np.array_equal(value, other), f"{part}.{field}"
    for table in ("items", "users"):
        for field, value in vars(getattr(a, table)).items():
            other = getattr(getattr(b, table), field)
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and np.array_equal(value, other), f"{table}.{field}"
            else:
                assert list(value) == list(other), f"{table}.{field}"


def _forbid_preprocessing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again instead of reading the cache")

    monkeypatch.setattr(loading, "preprocess", fail)


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    first = load_dataset("synthetic", cache_dir=tmp_path, **SMALL)
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("synthetic-")
    assert {path.name for path in entries[0].iterdir()} == {"arrays.npz", "metadata.json"}
    _forbid_preprocessing(monkeypatch)
    _assert_same(first, load_dataset("synthetic", cache_dir=tmp_path, **SMALL))


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLORA_CACHE_DIR", str(tmp_path))
    load_dataset("synthetic", **SMALL)
    assert len(list((tmp_path / "datasets").iterdir())) == 1


def test_any_parameter_change_makes_a_new_entry(tmp_path):
    load_dataset("synthetic", cache_dir=tmp_path, **SMALL)
    load_dataset("synthetic", cache_dir=tmp_path, min_history=3, **SMALL)
    load_dataset("synthetic", cache_dir=tmp_path, **{**SMALL, "seed": 4})
    assert len(list(tmp_path.iterdir())) == 3


def test_changed_source_file_makes_a_new_entry(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_text(data / "items.csv", "item,title\na,A\nb,B\n")
    ratings = write_text(data / "interactions.csv", "user,item,rating,timestamp\n1,a,5,1\n1,b,2,2\n")
    options = dict(min_history=0, cache_dir=cache, genres_column=None)
    first = load_dataset("csv", data, **options)
    _assert_same(first, load_dataset("csv", data, **options))
    write_text(ratings, "user,item,rating,timestamp\n1,a,5,1\n1,b,4,2\n")
    stat = ratings.stat()
    os.utime(ratings, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_dataset("csv", data, **options).samples.label.tolist() == [1, 1]
    assert len(list(cache.iterdir())) == 2


def test_unreadable_entry_is_rebuilt(tmp_path):
    first = load_dataset("synthetic", cache_dir=tmp_path, **SMALL)
    (entry,) = tmp_path.iterdir()
    (entry / "arrays.npz").write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="rebuilding"):
        _assert_same(first, load_dataset("synthetic", cache_dir=tmp_path, **SMALL))
    _assert_same(first, load_dataset("synthetic", cache_dir=tmp_path, **SMALL))


def test_a_full_disk_names_the_entry_and_leaves_no_half_entry(tmp_path, monkeypatch):
    import errno

    import reclora.data.cache as cache
    from reclora.files import NoSpaceLeft

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", full)
    with pytest.raises(NoSpaceLeft, match=f"no space left on device while writing {tmp_path}/synthetic-"):
        load_dataset("synthetic", cache_dir=tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []
