"""scripts/gpu_check.sh cannot trip on itself on a GPU: every Python entry point it calls is run here
up to where it needs a GPU (imports, arguments, shapes, output with stand-ins), and its summary turns
step results into one PASS/FAIL line per target and the JSON."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def script_text():
    return open(SCRIPT).read().replace("\\\n", " ")


def python_commands():
    """Every `"$PY" -m MODULE ARGS` or `"$PY" scripts/X.py ARGS` of the script, as argument lists."""
    commands = []
    for line in script_text().splitlines():
        for match in re.finditer(r'"\$PY" ((?:-m \S+|scripts/\S+\.py)[^;|&]*)', line):
            commands.append(
                shlex.split(match.group(1).replace('"${TOK[@]}"', "").replace("${QUICK:+--quick}", "--quick"))
            )
    return commands


def test_script_parses_and_names_every_step():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    modules = {c[1] if c[0] == "-m" else c[0] for c in python_commands()}
    assert {
        "reclora_kernels.info",
        "pytest",
        "benchmarks.gpu",
        "benchmarks.e2e",
        "benchmarks.scaling",
        "scripts/sanitizer_cases.py",
        "scripts/gpu_check_summary.py",
    } <= modules, modules


@pytest.mark.parametrize("module", ["benchmarks.gpu", "benchmarks.e2e", "benchmarks.scaling"])
def test_benchmark_entry_points_import_and_parse(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout


def test_e2e_command_lines_parse():
    from benchmarks import e2e

    lines = [c for c in python_commands() if c[:2] == ["-m", "benchmarks.e2e"]]
    assert len(lines) == 2
    for command in lines:
        args = e2e.parse_args([a.replace("$E2E_LLM", "smollm2-135m").replace("$OUT", "/tmp") for a in command[2:]])
        assert args.device == "cuda" and args.batch_size == 16 and args.seq_len == 512 and args.json.startswith("/tmp/")


def test_info_runs():
    out = subprocess.run(
        [sys.executable, "-m", "reclora_kernels.info"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_gpu_benchmarks_write_their_json_with_stand_ins(tmp_path, monkeypatch):
    """benchmarks.gpu's whole main, on CPU: tiny shapes, the cpu backend, a timer that runs each step once."""
    from benchmarks import gpu

    calls = []

    def timed(fn):
        fn()
        calls.append(fn)
        return {"median_ms": 1.0 + len(calls) % 3, "p20_ms": 0.9, "p80_ms": 3.5}

    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "timed", timed)
    monkeypatch.setattr(gpu, "usable_backends", lambda op: ["cpu"])
    monkeypatch.setattr(gpu, "card_peaks", lambda: (1e12, 1e11))
    monkeypatch.setattr(gpu, "describe", lambda: {"gpu": "Stand-in GPU", "date": "2026-01-01"})
    monkeypatch.setattr(gpu, "LORA_7B", dict(batch=2, tokens=3, d_in=16, d_out=8, num_loras=4, rank=2))
    monkeypatch.setattr(gpu, "LORA_SMOLLM2", dict(batch=1, tokens=2, d_in=8, d_out=8, num_loras=2, rank=1))
    monkeypatch.setattr(
        gpu,
        "RETRIEVAL_GPU",
        [dict(batch=2, length=16, dim=8, k=4, table_rows=50), dict(batch=2, length=32, dim=8, k=4, table_rows=50)],
    )
    monkeypatch.setattr(gpu, "SCALING_BATCH", 2)
    monkeypatch.setattr(gpu, "SCALING_LENGTHS", [8, 16])
    result = gpu.main(["--out", str(tmp_path)])
    written = json.loads((tmp_path / "gpu-Stand-in-GPU-2026-01-01.json").read_text())
    assert written["device"] == "cpu" and len(written["gated_lora"]) == 2 and len(written["topk_target_attention"]) == 2
    assert "fused_cpu" in result["gated_lora"][0]["timings"]["gated_lora_linear forward"]
    assert (tmp_path / "gpu-scaling-Stand-in-GPU-2026-01-01.png").exists()
    assert calls  # every timed step ran once for real


def summary(tmp_path, *pairs):
    out = subprocess.run(
        [sys.executable, "scripts/gpu_check_summary.py", str(tmp_path), *pairs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in out.stdout.splitlines() if re.match(r"(PASS|FAIL|MISSING) ", line)]
    return out.returncode, lines, json.load(open(tmp_path / "gpu_check.json"))


def test_summary_prints_a_line_per_target(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="10" failures="0" errors="0" skipped="2"/></testsuites>'
    )
    e2e = {
        "ratios": {"train": {"4/3 reclora/lora_peft": 1.02}},
        "targets": {
            "train 4/3 reclora/lora_peft <= 1.05": {"value": 1.02, "met": True},
            "train 5/4 published/reclora >= 1.5": {"value": 1.3, "met": False},
        },
    }
    (tmp_path / "gpu-e2e-smollm2-135m.json").write_text(json.dumps(e2e))
    code, lines, written = summary(
        tmp_path,
        "build=0",
        "info=0",
        "tests=0",
        "memcheck=0",
        "racecheck=0",
        "bench=0",
        "e2e-smollm2=0",
        "e2e-llama1b=x",
        "scaling-e2e=x",
        "memcheck_errors=0",
        "racecheck_errors=3",
    )
    from scripts.gpu_check_summary import TARGETS

    assert len(lines) == len(TARGETS) == len(written["targets"])
    status = {t["target"]: t["status"] for t in written["targets"]}
    assert status["every CUDA and Triton test passes on the GPU"] == "PASS"
    assert status["compute-sanitizer memcheck: 0 errors"] == "PASS"
    assert status["compute-sanitizer racecheck: 0 errors"] == "FAIL"
    assert status["SmolLM2-135M train 4/3 reclora/lora_peft <= 1.05"] == "PASS"
    assert status["SmolLM2-135M train 5/4 published/reclora >= 1.5"] == "FAIL"
    assert status["1B LLaMA train 4/3 reclora/lora_peft <= 1.05"] == "MISSING"
    assert code == 1


def test_summary_of_a_clean_first_call_passes(tmp_path):
    (tmp_path / "tests.xml").write_text('<testsuite tests="3" failures="0" errors="0" skipped="0"/>')
    code, lines, _ = summary(
        tmp_path,
        "build=0",
        "info=0",
        "tests=0",
        "memcheck=0",
        "racecheck=0",
        "bench=0",
        "memcheck_errors=0",
        "racecheck_errors=0",
    )
    assert code == 0
    assert sum(line.startswith("PASS") for line in lines) == 5
    assert all(line.startswith(("PASS", "MISSING")) for line in lines)


@pytest.mark.cuda_emulation
def test_sanitizer_cases_run_through_the_cuda_emulation():
    out = subprocess.run(
        [sys.executable, "scripts/sanitizer_cases.py", "--emulated"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sanitizer cases ran (CUDA emulation)" in out.stdout


def test_sanitizer_cases_need_cuda_only_where_the_kernels_run():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: gpu_check.sh runs the cases for real")
    from scripts import sanitizer_cases

    with pytest.raises((RuntimeError, AssertionError), match="CUDA|cuda"):
        sanitizer_cases.lora_cases("cuda")
