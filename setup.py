"""Builds reclora_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment):
  RECLORA_SKIP_CUDA=1   never build the CUDA kernels
  RECLORA_FORCE_CUDA=1  build them even without a visible GPU (fails loudly if impossible)
  TORCH_CUDA_ARCH_LIST  target architectures; defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS              parallel compile jobs (ninja)
  RECLORA_DEBUG=1       -g -O0 instead of -O3
  RECLORA_PTXAS_VERBOSE=1  ptxas prints each CUDA kernel's registers and spills
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup


def _toolkit_of_nvcc():
    """The CUDA toolkit root of the nvcc on PATH, as nvcc itself reports it (TOP=...).

    torch guesses it from nvcc's location, which is wrong for wrappers such as a
    /usr/local/bin/nvcc script (it would look for libcudart under /usr/local).
    """
    try:
        dry = subprocess.run(
            ["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line.split("=", 1)[1].strip())
    return None


if "CUDA_HOME" not in os.environ and shutil.which("nvcc"):
    _toolkit = _toolkit_of_nvcc()
    if _toolkit:
        os.environ["CUDA_HOME"] = _toolkit

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

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
    # at::parallel_for is header code: without OpenMP here it runs serially. torch ships its
    # own libgomp.so.1, which the loader reuses for this library (same soname).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = opt + openmp + ["-fvisibility=hidden"]
    build_cuda, reason = _cuda_decision()
    print(f"reclora: building CUDA kernels: {build_cuda} ({reason})")
    if not build_cuda:
        return [
            CppExtension(
                "reclora_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
            )
        ]
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc_flags = opt + ["--expt-relaxed-constexpr", "-DRECLORA_WITH_CUDA"]
    if _flag("RECLORA_PTXAS_VERBOSE"):  # registers and spills per kernel in the build log (check-gpu-compile)
        nvcc_flags.append("-Xptxas=-v")
    return [
        CUDAExtension(
            "reclora_kernels._C",
            cpp_sources + cu_sources,
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + ["-DRECLORA_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=openmp,
        )
    ]


class Build(BuildExtension):
    """Drops the -g that Python's own CFLAGS carry: debug info triples compile time and size."""

    def build_extensions(self):
        if not _flag("RECLORA_DEBUG"):
            for attr in ("compiler_so", "compiler_cxx", "linker_so"):
                flags = getattr(self.compiler, attr, None)
                if flags:
                    setattr(self.compiler, attr, [f for f in flags if f != "-g"])
        super().build_extensions()


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
