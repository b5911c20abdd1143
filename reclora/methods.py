"""The methods, one row each: what a method is made of. Every layer reads this table, none tests names.

Adding a method is a row here plus its own module when it brings new code: the model builds its
adapters from `adapters`, the trainer and the inference load a CRM when `needs_crm`, tune when
`tuned`, and take the prompt's history from `prompt_history`. Every CRM of reclora.crm.KINDS is
a method too (the CRM alone, no LLM): adding a CRM to reclora.crm adds its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from reclora.crm import KINDS as CRMS

# What feeds a gated method's gates: the frozen CRM's representation (the paper), a trainable user
# embedding (the ablation without the CRM), or nothing, every alpha 1/K (the ablation without
# personalization).
GATE_INPUTS = ("crm", "user-embedding", "uniform")
# The LLM projections a tuned method adapts by default: the paper's q and v, or every linear
# projection of a LLaMA-family layer (docs/RESULTS.md, issue 16's capacity hypothesis).
PUBLISHED_PROJECTIONS = ("q_proj", "v_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    """llm: False for a CRM alone. adapters: "gated" (K meta-LoRAs mixed per sample by the gates),
    "shared" (one LoRA for every sample) or None (nothing tuned). prompt_history: the prompt's items
    when --prompt-history is auto ("semantic": retrieved; "recent": the last K_short).
    target_modules: the projections adapted when --target-modules is not given. gate_input_norm: what
    the gates do to the CRM's representation when --gate-input-norm is not given (reclora.adapters)."""

    name: str
    description: str
    llm: bool = True
    adapters: Optional[str] = None
    prompt_history: Optional[str] = None
    target_modules: tuple[str, ...] = PUBLISHED_PROJECTIONS
    gate_input_norm: str = "layer"  # the published code's LayerNorm

    @property
    def tuned(self) -> bool:
        """Whether stage 2 tunes the LLM."""
        return self.adapters is not None

    @property
    def gated(self) -> bool:
        return self.adapters == "gated"

    def gates_read_crm(self, gate_input: str) -> bool:
        return self.gated and gate_input == "crm"

    def needs_crm(self, gate_input: str, readout_reads_crm: bool = False) -> bool:
        """Whether stage 1 trains (or finds) a CRM: a CRM alone, gates that read one, or a tuned LLM
        whose readout reads the CRM's logit (--crm-residual, --crm-fusion)."""
        return not self.llm or self.gates_read_crm(gate_input) or (self.tuned and readout_reads_crm)


LLM_METHODS = {
    m.name: m
    for m in (
        Method(
            "reclora",
            "personalized LoRA gated by the frozen CRM, retrieved prompt",
            adapters="gated",
            prompt_history="semantic",
            target_modules=ALL_PROJECTIONS,  # chosen on validation at 3 seeds: docs/RESULTS.md, issue 16 part 12
            gate_input_norm="none",  # chosen on validation at 3 seeds: docs/RESULTS.md, issue 16 part 16
        ),
        Method(
            "lora",
            "one shared LoRA, the last K_short items in the prompt (TALLRec)",
            adapters="shared",
            prompt_history="recent",
            target_modules=ALL_PROJECTIONS,  # chosen on validation at 3 seeds: docs/RESULTS.md, issue 16 part 11
        ),
        Method(
            "rella",
            "one shared LoRA, retrieved prompt",
            adapters="shared",
            prompt_history="semantic",
            target_modules=ALL_PROJECTIONS,  # chosen on validation at 3 seeds: docs/RESULTS.md, issue 16 parts 18, 21
        ),
        Method("zero-shot", "the LLM untuned", prompt_history="semantic"),
    )
}
CRM_METHODS = {kind: Method(kind, "the CRM alone", llm=False) for kind in CRMS}
METHODS = {**LLM_METHODS, **CRM_METHODS}


def method(name: str) -> Method:
    """The row of the method called name."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


def describe_methods() -> str:
    """One line for --help: each LLM method with what it is, then the CRMs."""
    llm = "; ".join(f"{m.name}: {m.description}" for m in LLM_METHODS.values())
    return f"{llm}; {', '.join(CRM_METHODS)}: the CRM alone"
