"""What the Triton backend's modules share; importable without triton (the backend checks use it).

The interpreter switch, the SM count that sizes grids, and the device guard every launch needs.
The dtypes the kernels take are reclora_kernels._checks.KERNEL_DTYPES.
"""

import contextlib
import functools
import os

import torch


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton interprets the kernels on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def num_sms(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 8 for interpreted CPU runs (it only steers grid sizes)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it tensor's for the block."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
