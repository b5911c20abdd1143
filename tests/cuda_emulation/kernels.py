"""The test-only CUDA emulation library (scripts/build_cuda_emulation.py): loading it, and running
the `cuda` backend's kernels through it on CPU tensors.

The library registers csrc/*_cuda.cu's kernels as torch.ops.reclora_emulated.<native op> for CPU
tensors. emulated_cuda_kernels() puts them in place of reclora's CPU kernels for its duration,
so that any test calling backend="cpu" runs the CUDA kernels' code instead.
"""

import contextlib
import importlib
import os
import unittest.mock
import warnings

import torch

from reclora_kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# RECLORA_CUDA_EMULATION_LIB picks a sanitizer build; by default the plain one.
LIBRARY_ENV = "RECLORA_CUDA_EMULATION_LIB"
_state = {"loaded": None, "schemas": None}


def under_sanitizer():
    """True in a process run by tests.cuda_emulation.sanitized. There ASan's preloaded runtime cannot
    intercept a C++ exception thrown from torch's libc10 (its CHECK on __cxa_throw fails and the
    process dies), so a test expecting a kernel's TORCH_CHECK to throw skips that part; the plain
    emulation build runs it."""
    return any(name in os.environ.get("LD_PRELOAD", "") for name in ("libasan", "libtsan"))


def library_path():
    from scripts.build_cuda_emulation import library_path as built

    return os.environ.get(LIBRARY_ENV) or built("none")


def unavailable_reason():
    """None when the emulation library can be loaded, else why not."""
    if not _native.is_loaded():
        return f"reclora_kernels._C is needed for the op schemas: {_native.LOAD_ERROR}"
    path = library_path()
    if path is None or not os.path.exists(path):
        return "the CUDA emulation library is not built (make cuda-emulation)"
    return None


def load():
    """Loads the library once and gives its ops the schemas of reclora's native ops."""
    path = library_path()
    if _state["loaded"] is None:
        torch.ops.load_library(path)
        library = torch.library.Library("reclora_emulated", "FRAGMENT")
        for op in _native.NATIVE_OPS:
            schema = str(getattr(torch.ops.reclora, op).default._schema)
            library.define(schema.split("::", 1)[1])
        _state["loaded"], _state["schemas"] = path, library
    elif _state["loaded"] != path:
        raise RuntimeError(f"CUDA emulation library {_state['loaded']} is loaded; cannot switch to {path}")
    return torch.ops.reclora_emulated


def _as_cuda_backend_calls(kernel):
    """The Python layer hands the cuda backend contiguous tensors (the cpu backend also takes strided
    upstream gradients): give the emulated kernels what the cuda backend would get."""

    def call(*args):
        return kernel(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))

    return call


@contextlib.contextmanager
def emulated_cuda_kernels():
    """reclora's native ops run the emulated CUDA kernels on CPU tensors while inside."""
    gated_lora_module = importlib.import_module(
        "reclora_kernels.gated_lora"
    )  # the package's gated_lora is the function
    emulated = load()
    library = torch.library.Library("reclora", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for op in _native.NATIVE_OPS:
            library.impl(op, _as_cuda_backend_calls(getattr(emulated, op).default), "CPU")
    try:
        with unittest.mock.patch.dict(gated_lora_module.NATIVE_KERNELS, {"cpu": "cuda"}):  # for the fake shapes
            yield emulated
    finally:
        library._destroy()
