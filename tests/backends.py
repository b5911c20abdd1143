"""The kernel backends that can run in this process, each with the device its tensors live on."""
import pytest
import torch

import reclora_kernels as rk


def kernel_backends(op=None):
    """pytest params (backend, device) for every kernel backend of op; unavailable ones skip with the reason."""
    params = []
    gpu = torch.cuda.is_available()
    for backend, device in (("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu"), ("cuda", "cuda")):
        reason = rk.unavailable_reason(backend, device, op)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, device, id=backend, marks=marks))
    return params


def interpreted(backend, device):
    """Triton on CPU runs in the (slow) interpreter: tests keep those shapes small."""
    return backend == "triton" and device == "cpu"
