"""scripts/check_gpu_compile.py: the launches it finds cover every Triton kernel on both archs and
every dtype, the pruner keeps only tiles that fit each arch, a real AOT compile reads resources from
the cubin, and the verdicts (shared memory, spills, occupancy) are right."""

import json
import os
import re
import subprocess
import sys

import pytest

from scripts import check_gpu_compile as check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_gpu_compile.py")


def run_script(*args):
    """The script in its own process: it needs the GPU dispatch (TRITON_INTERPRET=0) at import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def jobs():
    out = run_script("--cuda-lib", "none", "--list-jobs")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def launched_kernels():
    """Every Triton kernel the two Triton modules define (@triton.jit functions named *_kernel)."""
    names = set()
    for module in ("gated_lora_triton", "retrieval_triton"):
        with open(os.path.join(ROOT, "reclora_kernels", f"{module}.py")) as f:
            source = f.read()
        names |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", source))
    return names


def test_every_kernel_arch_and_dtype_is_compiled(jobs):
    for name in launched_kernels():
        for arch in check.ARCHS:
            # a job lists the op dtypes whose launches compile to it (fp32 sums serve all three)
            dtypes = {d for j in jobs if j["name"] == name and j["arch"] == arch for d in j["dtype"].split("/")}
            assert dtypes == set(check.DTYPES), (name, arch, dtypes)


def test_specializations_follow_the_launcher(jobs):
    gemm = [j for j in jobs if j["name"] == "_matmul_kernel" and "bf16" in j["dtype"]]
    # contiguous operands: a unit stride is the constexpr 1, 16-divisible integers carry the hint
    assert any(j["signature"]["stride_ak"] == "constexpr" and "(0,)" in j["attrs"] for j in gemm)
    assert all(j["signature"]["a_ptr"] == "*bf16" for j in gemm)


def test_pruner_keeps_only_tiles_that_fit_the_arch(jobs):
    def pipelines(arch):
        return {
            (j["config"]["BLOCK_M"], j["config"]["BLOCK_N"], j["options"]["num_stages"])
            for j in jobs
            if j["name"] == "_matmul_kernel" and j["arch"] == arch and "bf16" in j["dtype"]
        }

    assert (128, 256, 4) in pipelines("sm_90")  # 192 KB: Hopper only
    assert (128, 256, 4) not in pipelines("sm_80")
    assert (128, 256, 3) in pipelines("sm_80")


def test_a_real_compile_reads_its_resources(tmp_path):
    out = tmp_path / "gpu-compile.json"
    run = run_script("--cuda-lib", "none", "--select", "_segment_sum_kernel sm_90", "--out", str(out), "--jobs", "1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "_segment_sum_kernel" in run.stdout and "Occupancy" in run.stdout
    with open(out) as f:
        kernels = json.load(f)["kernels"]
    assert kernels and all(k["name"] == "_segment_sum_kernel" and k["arch"] == "sm_90" for k in kernels)
    for k in kernels:
        assert set(k) >= {
            "name",
            "backend",
            "arch",
            "config",
            "dtype",
            "registers",
            "spill_bytes",
            "shared_bytes",
            "ok",
            "reason",
        }
        assert k["backend"] == "triton" and k["ok"] and k["registers"] > 0 and k["spill_bytes"] == 0
        assert k["blocks_per_sm"]["blocks"] >= 1


def verdict(**fields):
    base = {
        "name": "k",
        "backend": "triton",
        "arch": "sm_80",
        "threads": 256,
        "registers": 64,
        "spill_bytes": 0,
        "shared_bytes": 0,
    }
    return check.judged({**base, **fields})


def test_shared_memory_over_the_block_limit_is_not_ok():
    assert verdict(arch="sm_90", shared_bytes=192 * 1024)["ok"]
    over = verdict(arch="sm_80", shared_bytes=192 * 1024)
    assert not over["ok"] and "per block" in over["reason"]


def test_spills_are_not_ok():
    spilled = verdict(spill_bytes=24)
    assert not spilled["ok"] and "spills" in spilled["reason"]


def test_occupancy():
    # 64 registers x 256 threads = 16K of the SM's 64K: 4 blocks; 8 by threads (2048 / 256)
    assert verdict(registers=64)["blocks_per_sm"] == {"blocks": 4, "limit": "registers"}
    # 48 KB + 1 KB reserved per block of sm_80's 164 KB: 3 blocks
    assert verdict(registers=32, shared_bytes=48 * 1024)["blocks_per_sm"] == {"blocks": 3, "limit": "shared"}
    assert verdict(registers=16, threads=1024)["blocks_per_sm"] == {"blocks": 2, "limit": "threads"}
