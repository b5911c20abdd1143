"""reclora_kernels: fused kernels for RecLoRA (personalized LoRA, long-sequence retrieval).

Ops (each with backends torch | cpu | triton | cuda; see `python -m reclora_kernels.info`):
  gated_lora, gated_lora_linear         per-sample gated meta-LoRA mixing x low-rank matmul
  retrieve_topk, topk_target_attention  top-k retrieval / target attention over histories
"""

from reclora_kernels._backends import (
    BACKENDS,
    BackendUnavailableError,
    default_backend,
    unavailable_reason,
)
from reclora_kernels.gated_lora import gated_lora, gated_lora_linear
from reclora_kernels.retrieval import retrieve_topk, topk_target_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "default_backend",
    "unavailable_reason",
    "gated_lora",
    "gated_lora_linear",
    "retrieve_topk",
    "topk_target_attention",
]
