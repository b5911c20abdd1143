"""Backend selection, build status reporting, and import without the compiled library."""
import os
import shutil
import subprocess
import sys

import torch

import reclora_kernels as rk
from reclora_kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code, cwd=ROOT, **env):
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cpu_kernels_are_built_and_default():
    """make install builds every CPU kernel; backend=None then picks them for CPU tensors."""
    assert _native.is_loaded(), _native.LOAD_ERROR
    assert _native.missing_kernels("CPU") == []
    assert rk.default_backend("cpu") == "cpu"


def test_info_reports_every_backend():
    out = python("import runpy; runpy.run_module('reclora_kernels.info', run_name='__main__')")
    assert f"torch {torch.__version__}" in out
    for backend in rk.BACKENDS:
        assert f"    {backend} " in out
    assert "  gated_lora (default: cpu)" in out and "  retrieval (default: cpu)" in out


def test_triton_on_cpu_needs_the_interpreter():
    out = python(
        "import reclora_kernels as rk; print(rk.unavailable_reason('triton', 'cpu'))", TRITON_INTERPRET="0"
    )
    assert "TRITON_INTERPRET=1" in out


def test_import_without_compiled_library(tmp_path):
    """The package imports without _C; a native backend then fails with what is missing and how to build."""
    shutil.copytree(
        os.path.join(ROOT, "reclora_kernels"), tmp_path / "reclora_kernels", ignore=shutil.ignore_patterns("*.so")
    )
    out = python(
        # an editable install's import hook would find the checkout's _C: keep to PYTHONPATH
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import torch, reclora_kernels as rk\n"
        "x = torch.randn(2, 3, 4); gate = torch.ones(2, 1)\n"
        "a = torch.randn(1, 2, 4); b = torch.randn(1, 5, 2)\n"
        "print(rk.default_backend('cpu'), rk.gated_lora(x, gate, a, b).shape)\n"
        "try:\n"
        "    rk.gated_lora(x, gate, a, b, backend='cpu')\n"
        "except rk.BackendUnavailableError as e:\n"
        "    print(e)\n",
        cwd=tmp_path,
        PYTHONPATH=str(tmp_path),
    )
    assert out.startswith("torch torch.Size([2, 3, 5])")
    assert "reclora_kernels._C was not built" in out
    assert "pip install --no-build-isolation -e ." in out
