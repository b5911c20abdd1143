"""MovieLens loaders on the real files (skipped when absent) and on small files written here."""

import numpy as np
import pytest

from reclora.data import DataFormatError, dataset_statistics, format_statistics, load_dataset
from tests.data.helpers import shared_data_dir, write_text

ML100K_GENRES = ["unknown", "Action", "Comedy"]


def _write_ml_100k(directory, ratings="1\t1\t5\t100\n1\t2\t2\t101\n2\t2\t4\t100\n"):
    write_text(directory / "u.genre", "".join(f"{name}|{index}\n" for index, name in enumerate(ML100K_GENRES)) + "\n")
    write_text(
        directory / "u.item",
        "1|Misérables, Les (1995)|01-Jan-1995||http://x|0|0|1\n2|Heat (1995)|01-Jan-1995||http://y|0|1|1\n",
        encoding="latin-1",
    )
    write_text(directory / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    write_text(directory / "u.data", ratings)
    return directory


def test_ml_100k_small_files(tmp_path):
    dataset = load_dataset("ml-100k", _write_ml_100k(tmp_path), min_history=0, cache=False)
    items, users = dataset.items, dataset.users
    assert items.titles == ["Misérables, Les (1995)", "Heat (1995)"]
    assert items.genre_names == ML100K_GENRES
    assert items.genres_of(1) == ["Action", "Comedy"]
    assert items.descriptions[1] == "Heat (1995), Action, Comedy"
    assert users.attribute_names == ("gender", "age", "occupation", "zip")
    assert users.attributes_of(1) == {"gender": "female", "age": "53", "occupation": "other", "zip": "94043"}
    assert users.codes.dtype == np.int64 and (users.codes > 0).all()
    # label = rating >= 4; global order (timestamp, user, item)
    assert dataset.samples.item.tolist() == [0, 1, 1]
    assert dataset.samples.user.tolist() == [0, 1, 0]
    assert dataset.samples.label.tolist() == [1, 1, 0]


def test_ml_100k_malformed_line(tmp_path):
    directory = _write_ml_100k(tmp_path, ratings="1\t1\t5\t100\n1\t2\t2\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 2: expected 4 fields, found 3"):
        load_dataset("ml-100k", directory, cache=False)


def test_ml_100k_rating_of_unknown_movie(tmp_path):
    directory = _write_ml_100k(tmp_path, ratings="1\t1\t5\t100\n1\t7\t2\t101\n")
    with pytest.raises(DataFormatError, match=r"u\.data, line 2: movie id 7 is not in the movie catalog"):
        load_dataset("ml-100k", directory, cache=False)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        load_dataset("ml-1m", tmp_path, cache=False)


def test_real_ml_100k_matches_the_published_split():
    dataset = load_dataset("ml-100k", shared_data_dir("ml-100k", "u.data"), cache=False, progress=False)
    statistics = dataset_statistics(dataset)
    assert (statistics["users"], statistics["items"], statistics["interactions"]) == (943, 1682, 100_000)
    assert statistics["samples"] == 95_285
    splits = statistics["splits"]
    assert [splits[name]["samples"] for name in ("train", "valid", "test")] == [76_228, 9_528, 9_529]
    rates = [round(splits[name]["positive_rate"], 3) for name in ("train", "valid", "test")]
    assert rates == [0.549, 0.566, 0.562]
    assert len(dataset.items.genre_names) == 19
    assert "Misérables, Les (1995)" in dataset.items.titles
    assert "95,285" in format_statistics(statistics)


def test_real_ml_1m_metadata_with_written_ratings(tmp_path):
    real = shared_data_dir("ml-1m", "movies.dat", "users.dat")
    directory = tmp_path / "ml-1m"
    for name in ("movies.dat", "users.dat"):
        write_text(directory / name, (real / name).read_text(encoding="latin-1"), encoding="latin-1")
    # Movie 3 is "Grumpier Old Men (1995)"; user 1 is F, age code 1, occupation 10.
    write_text(directory / "ratings.dat", "1::1::5::978300760\n1::3::3::978300761\n6040::3952::4::978300762\n")
    dataset = load_dataset("ml-1m", directory, min_history=0, cache=False)
    assert (dataset.n_items, dataset.n_users) == (3883, 6040)
    assert len(dataset.items.genre_names) == 18
    assert dataset.items.titles[2] == "Grumpier Old Men (1995)"
    assert dataset.users.attributes_of(0) == {
        "gender": "female",
        "age": "under 18",
        "occupation": "K-12 student",
        "zip": "48067",
    }
    assert dataset.samples.label.tolist() == [1, 0, 1]
    assert dataset.items.raw_ids[dataset.samples.item].tolist() == [1, 3, 3952]
    accented = [title for title in dataset.items.titles if "é" in title]
    assert accented, "latin-1 titles decode to accented letters"


def test_ml_1m_malformed_ratings_line(tmp_path):
    write_text(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Comedy\n")
    write_text(tmp_path / "users.dat", "1::F::1::10::48067\n")
    write_text(tmp_path / "ratings.dat", "1::1::5::978300760\n1::1::x::978300761\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat, line 2: field 'rating': 'x'"):
        load_dataset("ml-1m", tmp_path, cache=False)


@pytest.mark.parametrize("name", ["ml-25m", "ml-latest"])
def test_ml_25m_format(tmp_path, name):
    write_text(
        tmp_path / "movies.csv",
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Amélie (2001),Comedy|Romance\n"
        '5,"Untitled ""Thing"" (2019)",(no genres listed)\n',
        newline="\r\n",
    )
    write_text(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n7,11,3.5,20\n7,2,3.0,10\n3,5,5.0,10\n",
        newline="\r\n",
    )
    dataset = load_dataset(name, tmp_path, min_history=0, cache=False)
    assert dataset.items.raw_ids.tolist() == [2, 5, 11]
    assert dataset.items.titles == ["Amélie (2001)", 'Untitled "Thing" (2019)', "American President, The (1995)"]
    assert dataset.items.genres_of(1) == []
    assert dataset.items.descriptions[2] == "American President, The (1995), Comedy, Drama, Romance"
    assert dataset.users.attribute_names == () and dataset.users.codes.shape == (2, 0)
    # order (timestamp, user, item); label = rating > 3.0
    assert dataset.users.raw_ids[dataset.samples.user].tolist() == [3, 7, 7]
    assert dataset.samples.rating.tolist() == [5.0, 3.0, 3.5]
    assert dataset.samples.label.tolist() == [1, 0, 1]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _write_ml_100k(tmp_path / "ml-100k")
    monkeypatch.setenv("RECLORA_DATA_DIR", str(tmp_path))
    assert len(load_dataset("ml-100k", min_history=0, cache=False)) == 3
    monkeypatch.delenv("RECLORA_DATA_DIR")
    with pytest.raises(ValueError, match="RECLORA_DATA_DIR"):
        load_dataset("ml-100k", cache=False)
