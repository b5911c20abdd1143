"""The generic format: an interactions CSV and an items CSV with configurable columns."""

import pytest

from reclora.data import DataFormatError, load_dataset
from tests.data.helpers import write_text

ITEMS = 'item,title,genres,plot\nb7,"Night, Again",Horror|Thriller,a scary one\na1,Calm,,quiet\n'


def test_ratings_with_default_columns(tmp_path):
    write_text(tmp_path / "items.csv", ITEMS)
    write_text(tmp_path / "interactions.csv", "user,item,rating,timestamp\nu2,a1,4,5\nu1,b7,2,5\nu1,a1,5,9\n")
    dataset = load_dataset("csv", tmp_path, min_history=0, cache=False, text_columns=["plot"])
    assert dataset.items.raw_ids.tolist() == ["a1", "b7"]
    assert dataset.items.titles == ["Calm", "Night, Again"]
    assert dataset.items.genre_names == ["Horror", "Thriller"]
    assert dataset.items.descriptions == ["Calm, quiet", "Night, Again, Horror, Thriller, a scary one"]
    assert dataset.users.raw_ids.tolist() == ["u1", "u2"]
    assert dataset.users.raw_ids[dataset.samples.user].tolist() == ["u1", "u2", "u1"]
    assert dataset.samples.label.tolist() == [0, 1, 1]


def test_labels_and_renamed_columns(tmp_path):
    write_text(tmp_path / "catalog.tsv", "id\tname\n1\tOne\n2\tTwo\n")
    write_text(tmp_path / "clicks.tsv", "who\twhat\tclicked\twhen\n9\t1\t1\t3\n9\t2\t0\t4\n")
    dataset = load_dataset(
        "csv",
        tmp_path,
        min_history=0,
        cache=False,
        interactions_file="clicks.tsv",
        items_file="catalog.tsv",
        user_column="who",
        item_column="what",
        rating_column=None,
        label_column="clicked",
        timestamp_column="when",
        item_id_column="id",
        title_column="name",
        genres_column=None,
        delimiter="\t",
    )
    assert dataset.samples.label.tolist() == [1, 0]
    assert dataset.samples.rating.tolist() == [1.0, 0.0]
    assert dataset.items.titles == ["One", "Two"] and dataset.items.genres.shape == (2, 0)


def test_bad_label_names_line(tmp_path):
    write_text(tmp_path / "items.csv", "item,title\n1,One\n")
    write_text(tmp_path / "interactions.csv", "user,item,label,timestamp\n1,1,1,3\n1,1,2,4\n")
    with pytest.raises(DataFormatError, match=r"interactions\.csv, line 3: label 2 is not 0 or 1"):
        load_dataset("csv", tmp_path, rating_column=None, label_column="label", genres_column=None, cache=False)


def test_unknown_item_and_duplicate_item_name_lines(tmp_path):
    write_text(tmp_path / "items.csv", "item,title\n1,One\n")
    write_text(tmp_path / "interactions.csv", "user,item,rating,timestamp\n1,1,4,3\n\n1,2,5,4\n")
    with pytest.raises(DataFormatError, match=r"interactions\.csv, line 4: item id '2' is not in the item catalog"):
        load_dataset("csv", tmp_path, genres_column=None, cache=False)
    write_text(tmp_path / "items.csv", "item,title\n1,One\n1,Again\n")
    with pytest.raises(DataFormatError, match=r"items\.csv, line 3: item id '1' appears twice"):
        load_dataset("csv", tmp_path, genres_column=None, cache=False)


def test_needs_a_rating_or_label_column(tmp_path):
    with pytest.raises(ValueError, match="rating_column or a label_column"):
        load_dataset("csv", tmp_path, rating_column=None, cache=False)
