"""The compiled library, reclora_kernels._C, when it was built.

Importing it registers the native ops under torch.ops.reclora (schemas in
csrc/registration.cpp, CPU kernels in csrc/*_cpu.cpp, CUDA kernels in csrc/*_cuda.cu).
The package imports without it; the error comes when a native backend is asked for.
"""

import importlib
import importlib.util

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in this checkout (or `make install`); "
    "the CUDA kernels need a CUDA build of torch and nvcc (see README, 'Backends')"
)

# The native kernels behind each public op family.
OP_KERNELS = {
    "gated_lora": ("gated_lora_forward", "gated_lora_backward"),
    "retrieval": (
        "retrieve_topk_forward",
        "retrieve_topk_backward",
        "topk_attention_forward",
        "topk_attention_backward",
    ),
}
NATIVE_OPS = tuple(kernel for kernels in OP_KERNELS.values() for kernel in kernels)

_C = None
_SPEC = importlib.util.find_spec("reclora_kernels._C")
if _SPEC is None:
    LOAD_ERROR = "reclora_kernels._C was not built"
else:
    try:
        _C = importlib.import_module("reclora_kernels._C")  # registers torch.ops.reclora.*
        LOAD_ERROR = None
    except (ImportError, OSError) as exc:  # e.g. built against another torch
        LOAD_ERROR = f"{_SPEC.origin} failed to load: {type(exc).__name__}: {exc}"


def is_loaded() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.reclora.<op> has a kernel for dispatch_key ("CPU" or "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"reclora::{op}", dispatch_key)


def missing_kernels(dispatch_key: str, op=None) -> list:
    """Native kernels without a dispatch_key implementation: of one op family, or of all (op None)."""
    kernels = NATIVE_OPS if op is None else OP_KERNELS[op]
    return [kernel for kernel in kernels if not has_kernel(kernel, dispatch_key)]
