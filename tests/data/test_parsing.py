"""The one delimited-file reader: separators, quoting, line endings, encodings, errors."""

import numpy as np
import pytest

from reclora.data import DataFormatError, read_table
from tests.data.helpers import write_text

RATINGS = {"user": (0, np.int64), "item": (1, np.int64), "rating": (2, np.float32), "timestamp": (3, np.int64)}


def test_reads_multi_character_separator_and_skips_blank_lines(tmp_path):
    path = write_text(tmp_path / "ratings.dat", "1::10::5::978300760\n\n2::20::3.5::978302109\n\n")
    table = read_table(path, RATINGS, separator="::", n_fields=4)
    assert table["user"].tolist() == [1, 2]
    assert table["rating"].dtype == np.float32 and table["rating"].tolist() == [5.0, 3.5]
    assert table["timestamp"].dtype == np.int64
    assert table.line_numbers.tolist() == [1, 3]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_quoted_csv_with_commas_quotes_and_newlines(tmp_path, newline):
    text = (
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Say ""Hi"" (2001)",(no genres listed)\n'
        '13,"Two\nLines (1999)",Drama\n'
    )
    path = write_text(tmp_path / "movies.csv", text, newline=newline)
    table = read_table(
        path,
        {"id": ("movieId", np.int64), "title": ("title", str), "genres": ("genres", str)},
        separator=",",
        quoted=True,
        header=True,
    )
    assert table["id"].tolist() == [11, 12, 13]
    assert table["title"][0] == "American President, The (1995)"
    assert table["title"][1] == 'Say "Hi" (2001)'
    assert table["title"][2] == f"Two{newline}Lines (1999)"
    assert table["genres"][0] == "Comedy|Drama|Romance"


def test_crlf_in_unquoted_files(tmp_path):
    path = write_text(tmp_path / "u.data", "1\t2\t3\t4\n5\t6\t7\t8\n", newline="\r\n")
    assert read_table(path, RATINGS, separator="\t", n_fields=4)["timestamp"].tolist() == [4, 8]


def test_latin1(tmp_path):
    path = write_text(tmp_path / "u.item", "1|Misérables, Les (1995)\n", encoding="latin-1")
    table = read_table(path, {"id": (0, np.int64), "title": (1, str)}, separator="|", encoding="latin-1")
    assert table["title"] == ["Misérables, Les (1995)"]


def test_header_with_byte_order_mark(tmp_path):
    path = write_text(tmp_path / "items.csv", "\ufeffitem,title\na,Alpha\n")
    table = read_table(path, {"id": ("item", str)}, separator=",", quoted=True, header=True)
    assert table["id"] == ["a"]


def _assert_names(error: DataFormatError, path, line: int, *words: str):
    message = str(error)
    assert error.path == path and error.line == line
    assert str(path) in message and f"line {line}" in message
    for word in words:
        assert word in message


def test_wrong_field_count_names_file_and_line(tmp_path):
    path = write_text(tmp_path / "ratings.dat", "1::10::5::978300760\n\n2::20::978302109\n")
    with pytest.raises(DataFormatError) as caught:
        read_table(path, RATINGS, separator="::", n_fields=4)
    _assert_names(caught.value, path, 3, "expected 4 fields, found 3")


def test_unparsable_number_names_file_line_and_value(tmp_path):
    path = write_text(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\tfour\t4\n")
    with pytest.raises(DataFormatError) as caught:
        read_table(path, RATINGS, separator="\t", n_fields=4)
    _assert_names(caught.value, path, 2, "'rating'", "'four'")


def test_malformed_csv_quoting_names_file_and_line(tmp_path):
    path = write_text(tmp_path / "movies.csv", 'movieId,title\n1,"ok"\n2,"bad"x\n')
    with pytest.raises(DataFormatError) as caught:
        read_table(path, {"id": ("movieId", np.int64)}, separator=",", quoted=True, header=True)
    _assert_names(caught.value, path, 3, "malformed CSV")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "movies.csv"
    path.write_bytes(b"movieId,title\n1,fine\n2,Mis\xe9rables\n")
    with pytest.raises(DataFormatError) as caught:
        read_table(path, {"title": ("title", str)}, separator=",", quoted=True, header=True)
    _assert_names(caught.value, path, 3, "utf-8")


def test_missing_header_column(tmp_path):
    path = write_text(tmp_path / "ratings.csv", "userId,movieId\n1,2\n")
    with pytest.raises(DataFormatError) as caught:
        read_table(path, {"rating": ("rating", np.float32)}, separator=",", quoted=True, header=True)
    _assert_names(caught.value, path, 1, "'rating'")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.dat"):
        read_table(tmp_path / "nothing.dat", RATINGS, separator="::")
