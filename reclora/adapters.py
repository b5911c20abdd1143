"""Personalized LoRA (RecLoRA) for Hugging Face causal LMs whose projections are nn.Linear.

Each adapted projection ("slot": one target module of one decoder layer, S in all) keeps its
frozen base weight and gains K meta-LoRAs A_k (r, d_in), B_k (d_out, r). Per sample b, a gate
fed by the CRM's representation h_b mixes them (see reclora_kernels.gated_lora):
    y = x W^T + bias + (lora_alpha / r) * delta(x; alpha_b[slot], A, B)
Vanilla LoRA (TALLRec/ReLLa baselines) is the same machinery with K = 1 and a constant gate 1.

  AdapterConfig     hyper-parameters
  GateBank          every slot's gate at once: h (B, h_dim) -> alpha (S, B, K)
  GateContext       hands each adapted layer its (B, K) slice of alpha during one forward
  GatedLoRALinear   replaces one nn.Linear, calls reclora_kernels.gated_lora_linear
  PersonalizedLLM   LLM + adapters + gate bank; forward -> next-token logits at the last position
  save_adapters / load_adapters   adapters and gates only (safetensors + JSON config)
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import reclora_kernels
from reclora.files import atomic_directory
from reclora.llm import last_token_logits
from reclora_kernels.gated_lora import MIX_MODES

# What each gate does to the CRM representation first: a LayerNorm (the published gate) or nothing.
GATE_INPUT_NORMS = ("layer", "none")
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What to adapt and how; defaults are the paper's (K = 16, r = 8, lora_alpha = 16, T = 5).

    gated=False is vanilla LoRA: num_loras must be 1 and no gate bank is built.
    backend picks the gated_lora kernel (None: fastest available for the tensors' device); it
    is how to run, not what was trained, so save_adapters does not record it.
    """

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    num_loras: int = 16
    rank: int = 8
    lora_alpha: float = 16.0  # scaling = lora_alpha / rank (alpha alone names the gate weights here)
    dropout: float = 0.0  # on the LoRA input only; the base projection always sees x
    mix: str = "weight"
    gated: bool = True
    gate_input_dim: int = 256  # the CRM representation's size
    gate_hidden_dim: int = 60
    gate_dropout: float = 0.1
    gate_input_norm: str = "layer"  # one of GATE_INPUT_NORMS
    temperature: float = 5.0
    share_gate: bool = False  # one gate for every slot instead of one per slot
    uniform_gate: bool = False  # every alpha = 1/K, no gate network: the meta-LoRAs averaged (an ablation)
    backend: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.num_loras < 1 or self.rank < 1:
            raise ValueError(f"num_loras and rank must be >= 1, got {self.num_loras} and {self.rank}")
        if not self.gated and self.num_loras != 1:
            raise ValueError(f"vanilla LoRA (gated=False) has one LoRA, got num_loras={self.num_loras}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(f"dropout rates must be in [0, 1), got {self.dropout} and {self.gate_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.gate_input_norm not in GATE_INPUT_NORMS:
            raise ValueError(f"gate_input_norm must be one of {GATE_INPUT_NORMS}, got {self.gate_input_norm!r}")
        if self.backend is not None and self.backend not in reclora_kernels.BACKENDS:
            raise ValueError(f"backend must be None or one of {reclora_kernels.BACKENDS}, got {self.backend!r}")

    @classmethod
    def vanilla(cls, **fields) -> "AdapterConfig":
        """A single shared LoRA (no gates), e.g. AdapterConfig.vanilla(rank=8, lora_alpha=16)."""
        return cls(num_loras=1, gated=False, **fields)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    def to_json_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        del fields["backend"]
        fields["target_modules"] = list(self.target_modules)
        return fields


def _init_like_nn_linear(tensor: torch.Tensor, fan_in: int) -> None:
    """Draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in place.

    It is what nn.Linear does to its weight (kaiming_uniform_ with a = sqrt(5)) and bias, and
    what LoRA does to A; written out because kaiming_uniform_ would take the fan-in of a
    stacked (S, out, in) tensor to be out * in.
    """
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class GateBank(nn.Module):
    """num_slots gates LayerNorm(h) -> Linear(h, H) -> ReLU -> Dropout -> Linear(H, K), then softmax(z / T).

    The parameters of all gates are stacked on a leading axis of G = num_slots (or 1 when
    shared), in nn.Linear's (out, in) layout: norm_weight, norm_bias (G, h); hidden_weight
    (G, H, h), hidden_bias (G, H); out_weight (G, K, H), out_bias (G, K). Every gate reads the
    same h, so the whole bank is one GEMM for the first layer and one batched GEMM for the second.
    input_norm="none" drops the LayerNorm (and its parameters): the gates read h as the CRM gives it.
    """

    def __init__(
        self,
        num_slots: int,
        input_dim: int,
        num_loras: int,
        hidden_dim: int = 60,
        dropout: float = 0.1,
        temperature: float = 5.0,
        shared: bool = False,
        eps: float = 1e-5,
        input_norm: str = "layer",
    ):
        super().__init__()
        if input_norm not in GATE_INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {GATE_INPUT_NORMS}, got {input_norm!r}")
        self.num_slots, self.temperature, self.eps = num_slots, temperature, eps
        gates = 1 if shared else num_slots
        self.normalized = input_norm == "layer"
        if self.normalized:
            self.norm_weight = nn.Parameter(torch.ones(gates, input_dim))
            self.norm_bias = nn.Parameter(torch.zeros(gates, input_dim))
        self.hidden_weight = nn.Parameter(torch.empty(gates, hidden_dim, input_dim))
        self.hidden_bias = nn.Parameter(torch.empty(gates, hidden_dim))
        self.out_weight = nn.Parameter(torch.empty(gates, num_loras, hidden_dim))
        self.out_bias = nn.Parameter(torch.empty(gates, num_loras))
        self.dropout = nn.Dropout(dropout)
        for tensor in (self.hidden_weight, self.hidden_bias):
            _init_like_nn_linear(tensor, input_dim)
        for tensor in (self.out_weight, self.out_bias):
            _init_like_nn_linear(tensor, hidden_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, h) -> alpha: (S, B, K), rows summing to 1 (a broadcast view when shared)."""
        features = features.to(self.hidden_weight.dtype)
        hidden_weight, hidden_bias = self.hidden_weight, self.hidden_bias
        if self.normalized:
            features = F.layer_norm(features, features.shape[-1:], eps=self.eps)  # the same for every gate
            # Each gate's LayerNorm affine folded into its first Linear:
            # W (gamma * n + beta) + b = (W diag gamma) n + (W beta + b).
            hidden_weight = self.hidden_weight * self.norm_weight[:, None, :]
            hidden_bias = self.hidden_bias + torch.einsum("ghi,gi->gh", self.hidden_weight, self.norm_bias)
        hidden = torch.einsum("bi,ghi->gbh", features, hidden_weight) + hidden_bias[:, None, :]
        hidden = self.dropout(F.relu(hidden))
        logits = torch.baddbmm(self.out_bias[:, None, :], hidden, self.out_weight.transpose(1, 2))
        alpha = torch.softmax(logits / self.temperature, dim=-1)
        return alpha.expand(self.num_slots, -1, -1)


class UniformGate(nn.Module):
    """alpha = 1/K for every slot and sample: no parameters, no personalization."""

    def __init__(self, num_slots: int, num_loras: int):
        super().__init__()
        self.num_slots, self.num_loras = num_slots, num_loras

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, anything), read for B only -> alpha: (S, B, K)."""
        return features.new_full((1, features.shape[0], self.num_loras), 1.0 / self.num_loras).expand(
            self.num_slots, -1, -1
        )


class GateContext:
    """The gates of the batch being run, alpha: (S, B, K), for one PersonalizedLLM.

    Adapted layers hold a reference and read their slot's (B, K) slice; PersonalizedLLM.forward
    sets alpha around the LLM call. One instance per model, so models never share gates.
    """

    def __init__(self):
        self.alpha: Optional[torch.Tensor] = None

    def slot(self, index: torch.Tensor) -> torch.Tensor:
        """The (B, K) gates of slot index, a one-element long tensor: a tensor, not an int, so that
        torch.compile traces every layer alike (an int attribute would specialize a graph per layer)."""
        if self.alpha is None:
            raise RuntimeError("a gated LoRA layer ran without gates: call the PersonalizedLLM, not the LLM inside it")
        return self.alpha.index_select(0, index).squeeze(0)


class GatedLoRALinear(nn.Module):
    """An nn.Linear with K gated meta-LoRAs; x: (B, T, d_in) -> (B, T, d_out).

    weight (d_out, d_in) and bias are the base layer's own frozen parameters, so the LLM's
    state-dict keys for them do not change. lora_a: (K, r, d_in), lora_b: (K, d_out, r), kept in
    float32 whatever the LLM's dtype (optimizer updates on low-precision weights lose the small
    steps); they are cast to x's dtype for the kernel. gate_context None means vanilla LoRA: K = 1
    with gate 1.
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig, gate_context: Optional[GateContext], slot: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(config.num_loras, config.rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(config.num_loras, self.out_features, config.rank, device=device))
        _init_like_nn_linear(self.lora_a, self.in_features)  # B = 0: the adapted model starts as the base
        self.lora_dropout = nn.Dropout(config.dropout)
        self.scaling, self.mix, self.backend = config.scaling, config.mix, config.backend
        self.gate_context, self.slot = gate_context, slot
        self.register_buffer("slot_index", torch.tensor([slot], device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_context is None:
            gate = x.new_ones(x.shape[0], 1)
        else:
            gate = self.gate_context.slot(self.slot_index)
        weight, bias = self.weight, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Custom ops get no autocast rule: cast as autocast would for the F.linear this replaces.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        lora_a, lora_b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        options = dict(scaling=self.scaling, mix=self.mix, backend=self.backend)
        if self.training and self.lora_dropout.p > 0:
            # The LoRA path reads a dropped-out x, so it cannot share the kernel's read of x.
            delta = reclora_kernels.gated_lora(self.lora_dropout(x), gate, lora_a, lora_b, **options)
            return F.linear(x, weight, bias) + delta
        return reclora_kernels.gated_lora_linear(x, weight, bias, gate, lora_a, lora_b, **options)

    def extra_repr(self) -> str:
        num_loras, rank, _ = self.lora_a.shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, K={num_loras}, r={rank}, "
            f"scaling={self.scaling}, mix={self.mix}, slot={self.slot}, gated={self.gate_context is not None}"
        )


class PersonalizedLLM(nn.Module):
    """A causal LM with personalized LoRA injected in place, and its gate bank.

    The LLM's own parameters are frozen; the trainable ones are named_adapter_parameters().
    slot_names: the adapted modules' names in the LLM, in slot order.
    """

    def __init__(self, llm: nn.Module, config: AdapterConfig):
        super().__init__()
        self.config = config
        llm.requires_grad_(False)
        self.llm = llm
        self.gate_context = GateContext() if config.gated else None
        self.slot_names = _inject(llm, config, self.gate_context)
        self.gate_bank = None
        if config.gated and config.uniform_gate:
            self.gate_bank = UniformGate(len(self.slot_names), config.num_loras)
        elif config.gated:
            self.gate_bank = GateBank(
                len(self.slot_names),
                config.gate_input_dim,
                config.num_loras,
                config.gate_hidden_dim,
                config.gate_dropout,
                config.temperature,
                config.share_gate,
                input_norm=config.gate_input_norm,
            ).to(llm.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        gate_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Next-token logits at the last position, (B, V), for left-padded prompts.

        input_ids, attention_mask: (B, T), padding on the left, so the last position is where
        every row's answer starts. gate_features: (B, gate_input_dim), the CRM representation of
        each sample (required when gated, refused for vanilla LoRA).
        """
        if (gate_features is None) == self.config.gated:
            raise ValueError(
                "gate_features (B, gate_input_dim) are required for gated adapters and refused for vanilla LoRA"
            )
        if self.gate_context is not None:
            self.gate_context.alpha = self.gate_bank(gate_features)
        try:
            return last_token_logits(self.llm, input_ids, attention_mask)
        finally:
            # The model does not keep the batch's graph alive, except under gradient
            # checkpointing: the backward pass reruns the layers, which read alpha again.
            if self.gate_context is not None and not (self.training and _recomputes_in_backward(self.llm)):
                self.gate_context.alpha = None

    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters: every slot's lora_a, lora_b, then the gate bank's."""
        for slot_name in self.slot_names:
            layer = self.llm.get_submodule(slot_name)
            yield f"llm.{slot_name}.lora_a", layer.lora_a
            yield f"llm.{slot_name}.lora_b", layer.lora_b
        if self.gate_bank is not None:
            for name, parameter in self.gate_bank.named_parameters():
                yield f"gate_bank.{name}", parameter

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach() for name, parameter in self.named_adapter_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies state (as from adapter_state_dict) into the adapters; keys and shapes must match."""
        parameters = dict(self.named_adapter_parameters())
        if set(state) != set(parameters):
            missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
            raise ValueError(f"adapter state does not match the model: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                if state[name].shape != parameter.shape:
                    saved, expected = tuple(state[name].shape), tuple(parameter.shape)
                    raise ValueError(f"{name}: saved shape {saved}, the model has {expected}")
                parameter.copy_(state[name])


def _recomputes_in_backward(llm: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing; read the new name first (the old one warns)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(llm), name) or hasattr(llm, name):
            return bool(getattr(llm, name))
    return False


def _inject(llm: nn.Module, config: AdapterConfig, gate_context: Optional[GateContext]) -> list[str]:
    """Replaces every nn.Linear named like a target module with a GatedLoRALinear; returns their names."""
    targets = [
        (name, module)
        for name, module in llm.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in config.target_modules
    ]
    if not targets:
        linear_names = sorted({n.rpartition(".")[2] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no nn.Linear named {list(config.target_modules)} in the model; its linear layers: {linear_names}"
        )
    for slot, (name, linear) in enumerate(targets):
        parent_name, _, attribute = name.rpartition(".")
        setattr(llm.get_submodule(parent_name), attribute, GatedLoRALinear(linear, config, gate_context, slot))
    return [name for name, _ in targets]


def save_adapters(model: PersonalizedLLM, directory: Union[str, os.PathLike]) -> Path:
    """Writes the adapters and gates (safetensors) and their config (JSON) into directory, atomically."""
    directory = Path(directory)
    metadata = {"format_version": _FORMAT_VERSION, "config": model.config.to_json_dict(), "slots": model.slot_names}
    tensors = {name: tensor.contiguous().cpu() for name, tensor in model.adapter_state_dict().items()}
    with atomic_directory(directory) as staging:
        save_file(tensors, staging / ADAPTER_WEIGHTS_FILE)
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return directory


def load_adapters(llm: nn.Module, directory: Union[str, os.PathLike], backend: Optional[str] = None) -> PersonalizedLLM:
    """Injects the adapters saved in directory into llm (a fresh base model of the same architecture)."""
    directory = Path(directory)
    metadata = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    if metadata.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{directory}: adapter format {metadata.get('format_version')}, expected {_FORMAT_VERSION}")
    model = PersonalizedLLM(llm, AdapterConfig(**metadata["config"], backend=backend))
    if model.slot_names != metadata["slots"]:
        raise ValueError(
            f"{directory}: the adapters were saved for modules {metadata['slots']}, this model has {model.slot_names}"
        )
    model.load_adapter_state_dict(load_file(directory / ADAPTER_WEIGHTS_FILE, device=str(llm.device)))
    return model
