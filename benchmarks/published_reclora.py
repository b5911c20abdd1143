"""RecLoRA the published way: a faithful PyTorch re-statement of the released code's personalized LoRA.

What the released code does (see /work/shared/docs/RECLORA.md, "Where the official code is slow"),
and what this module does the same way:
  - one gate module per adapted slot (LayerNorm -> Linear -> ReLU -> Dropout -> Linear, then
    softmax(z / T)), every one called in a Python loop over the slots on the same CRM vector h;
  - the K meta-LoRAs of a slot held as Linear(K -> r * d_in) and Linear(K -> d_out * r) (no
    bias): the per-sample A_p (B, r, d_in) and B_p (B, d_out, r) are materialized by calling them
    on the gate alpha (B, K) and reshaping (kept alive for autograd);
  - delta = bmm(bmm(x, A_p^T), B_p^T), then a separate multiply by the scaling;
  - the delta added to q_proj / v_proj's output by a forward hook (out-of-place: it copies the
    whole projection output), so the base projection and the LoRA path read x separately.
It is a benchmark baseline, not library code. `PublishedRecLoRA.from_personalized` copies the
parameter values of a reclora.adapters.PersonalizedLLM, so both compute the same function and
the comparison is about cost only (tests/test_benchmarks_e2e.py checks outputs and gradients).
"""

from typing import Optional

import torch
from torch import nn

from reclora.llm import last_token_logits


class PublishedGate(nn.Module):
    """The released code's gate for one slot: alpha = softmax(MLP(h) / T), (B, h) -> (B, K)."""

    def __init__(self, input_dim: int, hidden_dim: int, num_loras: int, dropout: float, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.net = nn.Sequential(
            nn.LayerNorm(input_dim),
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_loras),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(h) / self.temperature, dim=-1)


class PublishedMetaLoRA(nn.Module):
    """One slot's K meta-LoRAs as two Linear layers over the gate (the released code's layout)."""

    def __init__(self, in_features: int, out_features: int, num_loras: int, rank: int, scaling: float):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scaling = in_features, out_features, rank, scaling
        self.lora_A = nn.Linear(num_loras, rank * in_features, bias=False)
        self.lora_B = nn.Linear(num_loras, out_features * rank, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.alpha: Optional[torch.Tensor] = None  # set for the batch being run (B, K)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_in) -> scaling * x A_p^T B_p^T: (B, T, d_out)."""
        batch = x.shape[0]
        a_p = self.lora_A(self.alpha).view(batch, self.rank, self.in_features).to(x.dtype)
        b_p = self.lora_B(self.alpha).view(batch, self.out_features, self.rank).to(x.dtype)
        low = torch.bmm(x, a_p.transpose(1, 2))
        out = torch.bmm(low, b_p.transpose(1, 2))
        return out * self.scaling

    def hook(self, module, inputs, output):
        return output + self.delta(inputs[0])


class PublishedRecLoRA(nn.Module):
    """LLM (frozen) + per-slot meta-LoRAs added by forward hooks + per-slot gates in a Python loop.

    forward(input_ids, attention_mask, gate_features) -> (B, V) logits at the last position,
    the same contract as reclora.adapters.PersonalizedLLM.
    """

    def __init__(
        self,
        llm: nn.Module,
        target_modules=("q_proj", "v_proj"),
        num_loras=16,
        rank=8,
        lora_alpha=16.0,
        gate_input_dim=256,
        gate_hidden_dim=60,
        gate_dropout=0.1,
        temperature=5.0,
    ):
        super().__init__()
        llm.requires_grad_(False)
        self.llm = llm
        targets = [
            (name, module)
            for name, module in llm.named_modules()
            if isinstance(module, nn.Linear) and name.rpartition(".")[2] in target_modules
        ]
        if not targets:
            raise ValueError(f"no nn.Linear named {list(target_modules)} in the model")
        self.slot_names = [name for name, _ in targets]
        device = next(llm.parameters()).device
        self.loras = nn.ModuleList(
            PublishedMetaLoRA(m.in_features, m.out_features, num_loras, rank, lora_alpha / rank) for _, m in targets
        ).to(device)
        self.gates = nn.ModuleList(
            PublishedGate(gate_input_dim, gate_hidden_dim, num_loras, gate_dropout, temperature) for _ in targets
        ).to(device)
        self._handles = [module.register_forward_hook(lora.hook) for (_, module), lora in zip(targets, self.loras)]

    def forward(self, input_ids, attention_mask, gate_features):
        features = gate_features.float()
        for gate, lora in zip(self.gates, self.loras):  # one gate module per slot, in Python
            lora.alpha = gate(features)
        try:
            return last_token_logits(self.llm, input_ids, attention_mask)
        finally:
            for lora in self.loras:
                lora.alpha = None

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @classmethod
    def from_personalized(cls, llm: nn.Module, personalized) -> "PublishedRecLoRA":
        """A published-way model on llm (a fresh base model) with personalized's parameter values.

        personalized: a gated reclora.adapters.PersonalizedLLM (not a shared gate).
        """
        config = personalized.config
        if not config.gated or config.share_gate:
            raise ValueError("the published way has one gate per slot: need a gated, unshared PersonalizedLLM")
        model = cls(
            llm,
            config.target_modules,
            config.num_loras,
            config.rank,
            config.lora_alpha,
            config.gate_input_dim,
            config.gate_hidden_dim,
            config.gate_dropout,
            config.temperature,
        )
        if model.slot_names != personalized.slot_names:
            raise ValueError(f"slots differ: {model.slot_names} vs {personalized.slot_names}")
        model.load_from_personalized(personalized)
        return model

    @torch.no_grad()
    def load_from_personalized(self, personalized) -> None:
        bank = personalized.gate_bank
        for slot, name in enumerate(self.slot_names):
            layer = personalized.llm.get_submodule(name)
            lora = self.loras[slot]
            num_loras, rank, d_in = layer.lora_a.shape
            # Linear(K -> r*d_in): weight (r*d_in, K), weight[i*d_in + j, k] = A_k[i, j]
            lora.lora_A.weight.copy_(layer.lora_a.reshape(num_loras, rank * d_in).T)
            lora.lora_B.weight.copy_(layer.lora_b.reshape(num_loras, -1).T)
            norm, first, _, _, second = self.gates[slot].net
            norm.weight.copy_(bank.norm_weight[slot])
            norm.bias.copy_(bank.norm_bias[slot])
            first.weight.copy_(bank.hidden_weight[slot])
            first.bias.copy_(bank.hidden_bias[slot])
            second.weight.copy_(bank.out_weight[slot])
            second.bias.copy_(bank.out_bias[slot])

    def gradients_as_personalized(self, personalized) -> dict:
        """This model's parameter gradients, in personalized.named_adapter_parameters()'s names and layouts."""
        out = {}
        for slot, name in enumerate(self.slot_names):
            layer = personalized.llm.get_submodule(name)
            num_loras, rank, d_in = layer.lora_a.shape
            lora = self.loras[slot]
            out[f"llm.{name}.lora_a"] = lora.lora_A.weight.grad.T.reshape(num_loras, rank, d_in)
            out[f"llm.{name}.lora_b"] = lora.lora_B.weight.grad.T.reshape(layer.lora_b.shape)
        grads = {k: [] for k in ("norm_weight", "norm_bias", "hidden_weight", "hidden_bias", "out_weight", "out_bias")}
        for gate in self.gates:
            norm, first, _, _, second = gate.net
            for key, parameter in zip(
                grads, (norm.weight, norm.bias, first.weight, first.bias, second.weight, second.bias)
            ):
                grads[key].append(parameter.grad)
        for key, values in grads.items():
            out[f"gate_bank.{key}"] = torch.stack(values)
        return out
