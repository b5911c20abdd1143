"""What this CPU offers the kernels: its model, the ISA levels it runs, the path the C++ kernels take
and whether it has native bfloat16 arithmetic.

The C++ CPU kernels (csrc/cpu_utils.h) are compiled for three levels and pick one at run time:
  avx512    AVX-512 F/VL/BW/DQ, 16 floats a vector, 32 registers
  avx2      AVX2 + FMA, 8 floats a vector, 16 registers
  baseline  SSE2 (x86-64) or NEON, 4 floats a vector
The best level the CPU runs by default; RECLORA_CPU_ISA=avx512|avx2|baseline forces one (read once,
when the first kernel runs), so that each path can be tested and measured on a machine that has it.
A level the CPU lacks, or an unknown name, is refused with an error, never quietly lowered.
"""

import os
import platform
import warnings

import torch

from reclora_kernels import _native

ISA_ENV = "RECLORA_CPU_ISA"
ISA_LEVELS = ("avx512", "avx2", "baseline")  # best first


class CpuIsaError(ValueError):
    """RECLORA_CPU_ISA names an unknown level or one this CPU lacks."""


def cpu_model() -> str:
    """The CPU's name as the OS reports it, with its family and model numbers when known: virtual
    machines often report a bare "AMD EPYC", which the numbers tell apart (family 25 model 17: Zen 4)."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{name} (family {family} model {model})" if family and model else name


def cpu_flags() -> frozenset:
    """The feature flags of /proc/cpuinfo (Linux); empty elsewhere."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def _cpuinfo_field(name):
    """The first value of field name in /proc/cpuinfo, or None."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def isa_levels() -> tuple:
    """The levels this CPU runs, best first (the kernels' own CPUID check when the library is built)."""
    if _native.is_loaded():
        return tuple(_native._C.cpu_isa_levels())
    flags = cpu_flags()
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"} <= flags:
        return ISA_LEVELS
    if {"avx2", "fma"} <= flags:
        return ISA_LEVELS[1:]
    return ISA_LEVELS[2:]


def requested_isa():
    """RECLORA_CPU_ISA, or None when unset (the best level)."""
    return os.environ.get(ISA_ENV) or None


def isa_error(requested=None, levels=None):
    """None when the requested level (default: RECLORA_CPU_ISA) can run here, else what is wrong."""
    requested = requested_isa() if requested is None else requested
    levels = isa_levels() if levels is None else levels
    if requested is None:
        return None
    if requested not in ISA_LEVELS:
        return f"{ISA_ENV}={requested} is not a level: expected one of {', '.join(ISA_LEVELS)}"
    if requested not in levels:
        return (
            f"{ISA_ENV}={requested}: this CPU ({cpu_model()}) lacks it; it runs {', '.join(levels)}. "
            f"Unset {ISA_ENV} or pick one of those"
        )
    return None


def check_isa():
    """Raises CpuIsaError when RECLORA_CPU_ISA cannot be honoured."""
    error = isa_error()
    if error is not None:
        raise CpuIsaError(error)


def active_isa():
    """The path the C++ CPU kernels take in this process ("avx512", "avx2", "baseline"), or None
    when the library is not built. Raises CpuIsaError when RECLORA_CPU_ISA is refused."""
    if not _native.is_loaded():
        return None
    check_isa()
    return _native._C.cpu_isa()


def native_bf16() -> bool:
    """True when the CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16): only then does
    bf16 autocast usually beat float32 on the CPU (elsewhere bf16 matmuls convert to float32 and back)."""
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_advice() -> str:
    """One sentence for a user asking for bf16 autocast on this CPU."""
    if native_bf16():
        return f"{cpu_model()} has native bfloat16 arithmetic (AVX512-BF16 or AMX): bf16 autocast can pay here"
    return (
        f"{cpu_model()} has no native bfloat16 arithmetic (neither AVX512-BF16 nor AMX): bf16 autocast "
        "converts to float32 and back around every matmul and is usually slower than float32 here"
    )


def warn_if_bf16_is_slow(device=None):
    """Warns when bf16 autocast is asked for on a CPU without native bfloat16 arithmetic. device: "cpu",
    "cuda[:n]" or None (CUDA when available, else the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cpu") and not native_bf16():
        warnings.warn(f"bf16 autocast on the CPU: {bf16_advice()}; consider float32 (no --bf16)", stacklevel=2)


def describe() -> dict:
    """What benchmarks record: CPU model, ISA levels, the kernels' path, torch's own ISA, bf16."""
    try:
        path = active_isa()
    except CpuIsaError as error:
        path = f"refused: {error}"
    return {
        "cpu_model": cpu_model(),
        "isa_levels": list(isa_levels()),
        "requested_isa": requested_isa(),
        "kernel_isa": path,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
    }
