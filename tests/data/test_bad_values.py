"""Values that parse as numbers but are no data: NaN and infinite ratings, timestamps that are not integers."""

import pytest

from reclora.data import DataFormatError, load_dataset
from tests.data.helpers import write_text
from tests.data.test_movielens import _write_ml_100k

ITEMS = "item,title,genres\n1,One,Drama\n2,Two,Comedy\n"


@pytest.mark.parametrize("rating", ["nan", "NaN", "inf", "-inf", "1e39"])
def test_a_non_finite_rating_names_file_and_line(tmp_path, rating):
    write_text(tmp_path / "items.csv", ITEMS)
    write_text(tmp_path / "interactions.csv", f"user,item,rating,timestamp\nu1,1,4,1\nu1,2,{rating},2\n")
    with pytest.raises(DataFormatError, match=rf"interactions.csv, line 3: field 'rating': '{rating}' is not a finite"):
        load_dataset("csv", tmp_path, min_history=0, cache=False)


@pytest.mark.parametrize("timestamp", ["nan", "inf", "1.5"])
def test_a_timestamp_that_is_no_integer_names_file_and_line(tmp_path, timestamp):
    write_text(tmp_path / "items.csv", ITEMS)
    write_text(tmp_path / "interactions.csv", f"user,item,rating,timestamp\nu1,1,4,1\nu1,2,3,{timestamp}\n")
    with pytest.raises(DataFormatError, match=r"interactions.csv, line 3: field 'timestamp'"):
        load_dataset("csv", tmp_path, min_history=0, cache=False)


def test_a_nan_rating_in_movielens_names_file_and_line(tmp_path):
    directory = _write_ml_100k(tmp_path, ratings="1\t1\t5\t100\n1\t2\tnan\t101\n")
    with pytest.raises(DataFormatError, match=r"u.data, line 2: field 'rating': 'nan' is not a finite number"):
        load_dataset("ml-100k", directory, min_history=0, cache=False)
