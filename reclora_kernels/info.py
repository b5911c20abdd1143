"""`python -m reclora_kernels.info`: versions, the CPU and its ISA path, and which backends can run
here (and why not)."""

import importlib
import platform
import sys

import torch

from reclora_kernels import __version__, _backends, _native, cpu_features
from reclora_kernels._triton_support import interpreter_enabled


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # report, never fail: this is a diagnostic tool
        return f"not importable ({type(exc).__name__}: {exc})"


def report() -> str:
    lines = [
        f"reclora_kernels {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {_version('triton')}",
        f"TRITON_INTERPRET={'1' if interpreter_enabled() else '0'}",
    ]
    lines += _cpu_lines()
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"GPU: {names}")
    else:
        lines.append("GPU: none visible")
    if _native.is_loaded():
        lines.append(f"native library: {_native._C.__file__}")
        for key in ("CPU", "CUDA"):
            missing = _native.missing_kernels(key)
            state = "all ops" if not missing else f"missing {', '.join(missing)}"
            lines.append(f"  {key} kernels: {state}")
    else:
        lines.append(f"native library: not loaded ({_native.LOAD_ERROR})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends for {device} tensors:")
        for op in _native.OP_KERNELS:
            default = _backends.default_backend(device, op)
            path = f", ISA path {_cpu_path()}" if default == "cpu" else ""
            lines.append(f"  {op} (default: {default}{path})")
            for backend in _backends.BACKENDS:
                reason = _backends.unavailable_reason(backend, device, op)
                lines.append(f"    {backend:7s} {'usable' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def _cpu_path():
    try:
        return cpu_features.active_isa()
    except cpu_features.CpuIsaError as error:
        return f"refused: {error}"


def _cpu_lines():
    requested = cpu_features.requested_isa()
    return [
        f"CPU: {cpu_features.cpu_model()}, {torch.get_num_threads()} torch threads",
        f"  ISA levels found: {', '.join(cpu_features.isa_levels())}",
        f"  kernels' ISA path: {_cpu_path() or 'none (library not built)'} "
        f"({f'{cpu_features.ISA_ENV}={requested}' if requested else f'{cpu_features.ISA_ENV} unset: the best level'})",
        f"  torch's own CPU capability: {torch.backends.cpu.get_cpu_capability()}",
        f"  bf16: {cpu_features.bf16_advice()}",
    ]


if __name__ == "__main__":
    print(report())
