"""Backend selection, build status reporting, and import without the compiled library."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import reclora_kernels as rk
from reclora_kernels import _native, cpu_features

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
    path = cpu_features.active_isa()
    assert (
        f"  gated_lora (default: cpu, ISA path {path})" in out and f"  retrieval (default: cpu, ISA path {path})" in out
    )
    assert f"CPU: {cpu_features.cpu_model()}" in out
    assert f"ISA levels found: {', '.join(cpu_features.isa_levels())}" in out


def test_triton_on_cpu_needs_the_interpreter():
    out = python("import reclora_kernels as rk; print(rk.unavailable_reason('triton', 'cpu'))", TRITON_INTERPRET="0")
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


ISA_PROBE = (
    "import torch, reclora_kernels as rk\n"
    "from reclora_kernels import cpu_features\n"
    "x = torch.randn(2, 3, 20); gate = torch.softmax(torch.randn(2, 3), -1)\n"
    "a = torch.randn(3, 4, 20); b = torch.randn(3, 21, 4)\n"
    "for call in (lambda: cpu_features.active_isa(), lambda: rk.gated_lora(x, gate, a, b).shape,\n"
    "             lambda: torch.ops.reclora.gated_lora_forward(x.view(6, 20), None, None, gate, a, b, None, 1.0, False)[0].shape):\n"
    "    try:\n"
    "        print(call())\n"
    "    except Exception as e:\n"
    "        print(type(e).__name__, e)\n"
)


def test_cpu_isa_switch_forces_each_level():
    """RECLORA_CPU_ISA=<level> runs that path for every level this CPU has (a level it lacks is refused)."""
    levels = cpu_features.isa_levels()
    assert levels[-1] == "baseline" and set(levels) <= set(cpu_features.ISA_LEVELS)
    for level in cpu_features.ISA_LEVELS:
        out = python(ISA_PROBE, RECLORA_CPU_ISA=level).splitlines()
        if level in levels:
            assert out == [level, "torch.Size([2, 3, 21])", "torch.Size([6, 21])"], out
        else:
            assert out[0].startswith(f"CpuIsaError RECLORA_CPU_ISA={level}: this CPU") and "lacks it" in out[0], out
            assert out[2].startswith("RuntimeError RECLORA_CPU_ISA=") and "lacks it" in out[2], out
    assert python(ISA_PROBE, RECLORA_CPU_ISA="").splitlines()[0] == levels[0]


def test_cpu_isa_switch_refuses_unknown_and_missing_levels():
    out = python(ISA_PROBE, RECLORA_CPU_ISA="avx1024").splitlines()
    assert out[0] == "CpuIsaError RECLORA_CPU_ISA=avx1024 is not a level: expected one of avx512, avx2, baseline"
    assert out[1] == out[0], "backend=None must not fall back to another backend"
    assert out[2].startswith("RuntimeError RECLORA_CPU_ISA=avx1024 is not a level"), out
    # an AVX2-only CPU, whatever this one is
    error = cpu_features.isa_error("avx512", levels=("avx2", "baseline"))
    assert error.startswith("RECLORA_CPU_ISA=avx512: this CPU") and "it runs avx2, baseline" in error
    assert cpu_features.isa_error("avx2", levels=("avx2", "baseline")) is None


def test_bf16_advice_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not cpu_features.native_bf16()
    assert "no native bfloat16 arithmetic" in cpu_features.bf16_advice()
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert cpu_features.native_bf16()
        assert "has native bfloat16 arithmetic" in cpu_features.bf16_advice()


def test_bf16_warning_only_on_a_cpu_without_native_bf16(monkeypatch, recwarn):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    cpu_features.warn_if_bf16_is_slow("cuda")
    assert not recwarn.list
    with pytest.warns(UserWarning, match="no native bfloat16 arithmetic"):
        cpu_features.warn_if_bf16_is_slow("cpu")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    cpu_features.warn_if_bf16_is_slow("cpu")
    assert not recwarn.list
