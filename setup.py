"""Builds reclora_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment):
  RECLORA_SKIP_CUDA=1   never build the CUDA kernels
  RECLORA_FORCE_CUDA=1  build them even without a visible GPU (fails loudly if impossible)
  TORCH_CUDA_ARCH_LIST  target architectures; defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS              parallel compile jobs (ninja)
  RECLORA_DEBUG=1       -g -O0 instead of -O3
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _cuda_decision():
    """(build_cuda, reason) following torchao/flash-attention conventions."""
    if _flag("RECLORA_SKIP_CUDA"):
        return False, "RECLORA_SKIP_CUDA=1"
    problems = []
    if torch.version.cuda is None:
        problems.append("the installed torch is a CPU-only build")
    if CUDA_HOME is None:
        problems.append("nvcc / CUDA_HOME not found")
    if problems:
        if _flag("RECLORA_FORCE_CUDA"):
            sys.exit("RECLORA_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    if not torch.cuda.is_available() and not _flag("RECLORA_FORCE_CUDA"):
        return False, "no GPU visible (set RECLORA_FORCE_CUDA=1 to build anyway)"
    return True, "ok"


def _nvidia_wheel_includes():
    """Headers such as cublas_v2.h ship in the nvidia-* wheels, not in every toolkit install."""
    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(p for p in found if os.path.isdir(p)))


def extensions():
    debug = _flag("RECLORA_DEBUG")
    opt = ["-g", "-O0"] if debug else ["-O3"]
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = opt + ["-fvisibility=hidden"]
    build_cuda, reason = _cuda_decision()
    print(f"reclora: building CUDA kernels: {build_cuda} ({reason})")
    if not build_cuda:
        return [CppExtension("reclora_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})]
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-DRECLORA_WITH_CUDA"]
    return [
        CUDAExtension(
            "reclora_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + ["-DRECLORA_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
