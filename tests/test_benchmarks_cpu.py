"""benchmarks.run's CPU pieces: the round-robin timer, ratios, work models, and every group runs."""

import time

import pytest

from benchmarks import bench_gated_lora, bench_retrieval, roofline, run
from reclora_kernels import cpu_features

TINY_LORA = dict(batch=2, tokens=3, d_in=5, d_out=7, num_loras=3, rank=2)
TINY_RETRIEVAL = dict(batch=2, length=9, dim=4, k=3, table_rows=20)


def test_interleaved_runs_round_robin():
    calls = []
    table = roofline.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert table["a"]["steps"] == 3 and table["a"]["cpu_median_ms"] >= 0


def test_back_to_back_times_the_second_of_two_calls():
    calls = []

    def slow_after_other(name):
        # Slow (10 ms) when the previous call was another implementation's, fast after its own.
        def fn():
            if not calls or calls[-1] != name:
                time.sleep(0.01)
            calls.append(name)

        return fn

    impls = {"a": slow_after_other("a"), "b": slow_after_other("b")}
    table = roofline.interleaved(impls, rounds=2, warmup=0, back_to_back=True)
    assert calls == ["a", "a", "b", "b"] * 2
    assert table["a"]["max_ms"] < 5 and table["b"]["max_ms"] < 5
    cold = roofline.interleaved(impls, rounds=2, warmup=0)
    assert cold["a"]["min_ms"] >= 10 and cold["b"]["min_ms"] >= 10


def test_ratios():
    table = {
        name: {"median_ms": ms}
        for name, ms in {
            "fused": 1.0,
            "published": 3.0,
            "composition": 2.0,
            "fused_linear": 11.0,
            "base_linear": 10.0,
        }.items()
    }
    out = run.ratios(table)
    assert out["best PyTorch way / fused"] == 2.0 and out["published / fused"] == 3.0
    assert out["fused_linear / base_linear"] == pytest.approx(1.1)


def test_gated_lora_work_model():
    meta = dict(op="gated_lora", shape=TINY_LORA, mix="weight", passes="forward", gradient=None)
    tokens, d, factors = 6, 12, 3 * 2 * 12
    assert roofline.gated_lora_work(meta) == (2 * tokens * 2 * d + 2 * 2 * factors, 4 * (tokens * d + factors))
    output = dict(meta, mix="output", passes="forward+backward", gradient="sum")
    flops, nbytes = roofline.gated_lora_work(output)
    assert flops == 3 * 2 * tokens * 6 * d
    assert nbytes == 4 * (tokens * d + factors) + 4 * (2 * tokens * 5 + 1 * 7 + factors)


@pytest.mark.skipif(cpu_features.active_isa() is None, reason="needs the CPU kernels")
def test_every_cpu_group_runs_and_has_a_roofline():
    peaks = {"mm_gflops": 100.0, "triad_l3_gbs": 50.0, "triad_dram_gbs": 20.0}
    groups = bench_gated_lora.groups(TINY_LORA) + bench_retrieval.groups(TINY_RETRIEVAL)
    assert len(groups) == 2 * 3 + 2
    for name, impls, meta in groups:
        table = roofline.interleaved(impls, rounds=1, warmup=1)
        assert "fused" in table and ("published" in table or "composition" in table), name
        line = roofline.roofline(table["fused"]["median_ms"], meta, peaks)
        assert line["bound"] in ("compute", "memory") and line["gflops"] > 0, name


def test_table_of_a_committed_result():
    """benchmarks.table renders a result of benchmarks.run: one row per group and path, ratios as stored."""
    import json
    from pathlib import Path

    from benchmarks import table

    path = (
        Path(__file__).parents[1]
        / "benchmarks/results/cpu-intel-r-xeon-r-processor-2-80ghz-family-6-model-106-2026-12-03-1thread.json"
    )
    result = json.loads(path.read_text())
    rows = table.table(result).splitlines()[2:]
    groups = result["paths"]["avx512"]["groups"]
    assert len(rows) == sum(len(p["groups"]) for p in result["paths"].values())
    best = groups["gated_lora mix=weight forward+backward grad=dense"]["ratios"]["best PyTorch way / fused"]
    dense = next(r for r in rows if r.startswith("| mix=weight forward+backward grad=dense | avx512 |"))
    assert f"| {best:.2f} (" in dense and "memory (" in dense
    assert any(r.startswith("| topk attention forward | avx2 |") and "| - | - |" in r for r in rows)
