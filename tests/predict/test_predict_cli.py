"""python -m reclora.predict: scores, rankings, the run's own split, exit codes, atomic output."""

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from reclora import Recommender
from reclora.predict import main
from tests.train.helpers import ROOT, cli_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reclora_run(runs):
    return runs["reclora"]


@pytest.fixture(scope="module")
def raw_ids(reclora_run):
    dataset = Recommender.load(reclora_run).table.dataset
    return dataset.users.raw_ids[:3].tolist(), dataset.items.raw_ids[:4].tolist()


def write(path, text):
    path.write_text(text)
    return path


def test_scores_with_the_input_columns(tmp_path, reclora_run, raw_ids, capsys):
    (u0, u1, _), (i0, i1, i2, _) = raw_ids
    requests = write(tmp_path / "r.csv", f"user,item,timestamp,note\n{u0},{i0},,a\n{u0},{i1},5,b\n{u1},{i2},,c\n")
    assert main([str(reclora_run), "--input", str(requests), "--output", str(tmp_path / "s.csv")]) == 0
    rows = read_csv(tmp_path / "s.csv")
    assert [(r["user"], r["item"], r["timestamp"], r["note"]) for r in rows] == [
        (str(u0), str(i0), "", "a"),
        (str(u0), str(i1), "5", "b"),
        (str(u1), str(i2), "", "c"),
    ]
    expected = Recommender.load(reclora_run).score([u0, u0, u1], [i0, i1, i2], [None, 5, None])
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, atol=1e-6)
    out = capsys.readouterr().out
    assert "3 requests in" in out and "requests/s" in out


def test_top_k_per_user(tmp_path, reclora_run, raw_ids):
    (u0, u1, _), items = raw_ids
    lines = [f"{user},{item}" for user in (u0, u1) for item in items]
    requests = write(tmp_path / "c.csv", "user,item\n" + "\n".join(lines) + "\n")
    assert main([str(reclora_run), "--input", str(requests), "--output", str(tmp_path / "top.csv"), "--top", "2"]) == 0
    rows = read_csv(tmp_path / "top.csv")
    assert [(r["user"], r["rank"]) for r in rows] == [(str(u0), "1"), (str(u0), "2"), (str(u1), "1"), (str(u1), "2")]
    recommender = Recommender.load(reclora_run)
    for user in (u0, u1):
        best = recommender.rank(user, items, k=2)
        assert [r["item"] for r in rows if r["user"] == str(user)] == [str(item) for item, _ in best]


@pytest.mark.parametrize("name", ["reclora", "sim"])
def test_split_test_equals_predictions_npz(tmp_path, runs, name):
    assert main([str(runs[name]), "--split", "test", "--output", str(tmp_path / "t.csv")]) == 0
    rows = read_csv(tmp_path / "t.csv")
    saved = np.load(runs[name] / "predictions.npz")
    assert list(rows[0]) == ["sample", "user", "item", "label", "score"]
    np.testing.assert_array_equal([int(r["sample"]) for r in rows], saved["sample"])
    np.testing.assert_array_equal([int(r["label"]) for r in rows], saved["label"])
    np.testing.assert_allclose([float(r["score"]) for r in rows], saved["prob"], atol=1e-5)


@pytest.mark.parametrize(
    "content, line, problem",
    [
        ("", None, "empty file"),
        ("user,item\n", None, "no requests"),
        ("user,timestamp\n1,2\n", 1, r"missing column\(s\) \['item'\]"),
        ("user,item\n{u},{i}\nabc,{i}\n", 3, "user id 'abc' is not an integer"),
        ("user,item\n{u},x1\n", 2, "item id 'x1' is not an integer"),
        ("user,item,timestamp\n{u},{i},12\n{u},{i},noon\n", 3, "timestamp 'noon' is not a number"),
        ("user,item\n{u},{i}\n{u},987654\n", 3, "unknown item id 987654"),
        ("user,item\n{u},{i},7\n", 2, "3 fields, the header has 2"),
        ("user,item\n,{i}\n", 2, "empty user id"),
    ],
)
def test_bad_input_exits_2_naming_file_and_line_and_writes_nothing(
    tmp_path, reclora_run, raw_ids, capsys, content, line, problem
):
    (u0, _, _), (i0, _, _, _) = raw_ids
    requests = write(tmp_path / "bad.csv", content.format(u=u0, i=i0))
    output = write(tmp_path / "out.csv", "an earlier result\n")
    assert main([str(reclora_run), "--input", str(requests), "--output", str(output)]) == 2
    message = capsys.readouterr().err
    where = f"bad.csv, line {line}: " if line else "bad.csv: "
    assert where in message
    assert re.search(problem, message), message
    assert output.read_text() == "an earlier result\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out.csv"]  # no temporary file left


def test_a_bad_run_folder_exits_2(tmp_path, capsys):
    requests = write(tmp_path / "r.csv", "user,item\n1,1\n")
    assert main([str(tmp_path / "no-run"), "--input", str(requests), "--output", str(tmp_path / "o.csv")]) == 2
    assert "no such run folder" in capsys.readouterr().err and not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ["--input", "r.csv", "--top", "0"],
        ["--input", "r.csv", "--batch-size", "0"],
        ["--split", "test", "--top", "3"],
        [],
        ["--input", "r.csv", "--split", "test"],
    ],
)
def test_bad_options_exit_2(tmp_path, reclora_run, arguments):
    with pytest.raises(SystemExit) as exit_:
        main([str(reclora_run), "--output", str(tmp_path / "o.csv"), *arguments])
    assert exit_.value.code == 2 and not (tmp_path / "o.csv").exists()


def test_command_line_process(tmp_path, reclora_run, raw_ids):
    (u0, _, _), (i0, i1, _, _) = raw_ids
    requests = write(tmp_path / "r.csv", f"user,item\n{u0},{i0}\n{u0},{i1}\n")
    command = [
        sys.executable,
        "-m",
        "reclora.predict",
        str(reclora_run),
        "--input",
        str(requests),
        "--output",
        str(tmp_path / "s.csv"),
        "--batch-size",
        "1",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 requests in" in done.stdout and "requests/s" in done.stdout
    assert len(read_csv(tmp_path / "s.csv")) == 2
    bad = write(tmp_path / "bad.csv", f"user,item\n{u0},987654\n")
    done = subprocess.run(
        command[:5] + [str(bad)] + command[6:], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2 and "bad.csv, line 2: unknown item id 987654" in done.stderr
