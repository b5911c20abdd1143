"""Which backend runs an op: availability per device, the default choice, and why not.

Backends:
  torch   the pure-PyTorch reference (any device, any float dtype; the ground truth)
  cpu     C++ kernels in reclora_kernels._C (CPU tensors); RECLORA_CPU_ISA forces their ISA path
  triton  Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests)
  cuda    CUDA C++ kernels in reclora_kernels._C (CUDA tensors)
"""

import importlib.util

from reclora_kernels import _native, cpu_features
from reclora_kernels._triton_support import interpreter_enabled

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Preferred order when backend=None; the interpreter is never picked automatically.
_DEFAULT_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


def _triton_reason(device_type):
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.6')"
    if device_type == "cpu" and not interpreter_enabled():
        return "Triton kernels run on CUDA tensors; on CPU only under TRITON_INTERPRET=1 (slow, for tests)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton backend supports cuda (and interpreted cpu) tensors, not {device_type}"
    return None


def _native_reason(backend, device_type, op):
    key = {"cpu": "CPU", "cuda": "CUDA"}[backend]
    if device_type != backend:
        return f"the {backend} backend runs on {backend} tensors, got {device_type} tensors"
    if not _native.is_loaded():
        return f"reclora_kernels._C is not built or failed to load ({_native.LOAD_ERROR}); {_native.BUILD_HINT}"
    missing = _native.missing_kernels(key, op)
    if missing:
        return (
            f"reclora_kernels._C was built without {backend} kernels (missing: {', '.join(missing)}); "
            + _native.BUILD_HINT
        )
    return None


def _reason(backend, device_type, op):
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    return _native_reason(backend, device_type, op)


# Computed once so that resolve() is plain dictionary work (cheap, and traceable by torch.compile).
_OPS = (None, *_native.OP_KERNELS)
_REASONS = {(b, d, op): _reason(b, d, op) for b in BACKENDS for d in ("cpu", "cuda") for op in _OPS}
# A refused RECLORA_CPU_ISA fails every use of the cpu backend: falling back to another backend would
# measure or test something else than was asked for.
_CPU_ISA_ERROR = cpu_features.isa_error()


def unavailable_reason(backend: str, device_type: str, op=None):
    """None when backend can run op ("gated_lora", "retrieval"; None: every op) on device_type tensors.

    Otherwise a sentence saying why not.
    """
    if (backend, device_type, op) in _REASONS:
        return _REASONS[(backend, device_type, op)]
    if backend == "torch":
        return None
    return f"no {backend} kernels for {device_type} tensors"


def default_backend(device_type: str, op=None) -> str:
    for backend in _DEFAULT_ORDER.get(device_type, ("torch",)):
        if unavailable_reason(backend, device_type, op) is None:
            return backend
    return "torch"


def resolve(backend, device_type: str, op=None) -> str:
    """The concrete backend to run op: backend itself after checks, or the default for the device."""
    if backend is None:
        backend = default_backend(device_type, op)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {', '.join(BACKENDS)}, got {backend!r}")
    else:
        reason = unavailable_reason(backend, device_type, op)
        if reason is not None:
            raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
    if backend == "cpu" and _CPU_ISA_ERROR is not None:
        raise cpu_features.CpuIsaError(_CPU_ISA_ERROR)
    return backend
