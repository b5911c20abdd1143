"""The kernel backends that can run in this process, each with the device its tensors live on."""

import pytest
import torch

import reclora_kernels as rk
from tests.cuda_emulation import kernels as cuda_emulation


def kernel_backends(op=None):
    """pytest params (backend, device) for every kernel backend of op; unavailable ones skip with the reason."""
    params = []
    gpu = torch.cuda.is_available()
    for backend, device in (("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu"), ("cuda", "cuda")):
        reason = rk.unavailable_reason(backend, device, op)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, device, id=backend, marks=marks))
    # The cuda backend's kernels on CPU tensors, run by the CUDA emulation in place of the cpu
    # kernels (the cuda_emulation marker makes tests/conftest.py swap them in).
    reason = cuda_emulation.unavailable_reason()
    marks = [pytest.mark.cuda_emulation] + ([pytest.mark.skip(reason=reason)] if reason else [])
    params.append(pytest.param("cpu", "cpu", id="cuda_emulation", marks=marks))
    return params


def interpreted(backend, device):
    """Triton on CPU runs in the (slow) interpreter: tests keep those shapes small."""
    return backend == "triton" and device == "cpu"
