"""benchmarks.run's CPU pieces: the round-robin timer, ratios, work models, and every group runs."""

import time

import pytest

from benchmarks import bench_gated_lora, bench_retrieval, roofline, run
from reclora_kernels import cpu_features

TINY_LORA = dict(batch=2, tokens=3, d_in=5, d_out=7, num_loras=3, rank=2)
TINY_RETRIEVAL = dict(batch=2, length=9, dim=4, k=3, table_rows=20)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_balanced_orders_put_each_implementation_after_each_other_equally_often(n):
    orders = roofline.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    pairs = [(order[i - 1], order[i]) for order in orders for i in range(1, n)]
    counts = {(a, b): pairs.count((a, b)) for a in range(n) for b in range(n) if a != b}
    assert len(set(counts.values())) <= 1 and len(pairs) == sum(counts.values())


def test_interleaved_runs_every_implementation_once_a_round():
    calls = []
    impls = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    table = roofline.interleaved(impls, rounds=5, warmup=1)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert all(sorted(r) == list("abc") for r in rounds) and len(rounds) == 6
    assert rounds == ["".join("abc"[k] for k in order) for order in roofline.balanced_orders(3)]
    assert table["a"]["steps"] == 5 and table["a"]["cpu_median_ms"] >= 0


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
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]
    assert table["a"]["max_ms"] < 5 and table["b"]["max_ms"] < 5
    calls.clear()
    cold = roofline.interleaved(impls, rounds=3, warmup=0)  # a b | b a | a b: a's second call follows a
    assert cold["a"]["median_ms"] >= 10 and cold["b"]["median_ms"] >= 10


def test_ratios():
    times = lambda **ms: {name: {"median_ms": m} for name, m in ms.items()}
    out = run.ratios(times(fused=1.0, published=3.0, composition=2.0))
    assert out["best PyTorch way / fused"] == 2.0 and out["published / fused"] == 3.0
    assert "fused_linear / base_linear" not in out
    # a gated_lora_linear group: its "fused" is the fused linear, its ways carry the base linear
    linear = run.ratios(times(fused=11.0, base_linear=10.0, **{"published+linear": 16.5, "composition+linear": 22.0}))
    assert linear["fused_linear / base_linear"] == pytest.approx(1.1)
    assert linear["best PyTorch way / fused"] == pytest.approx(1.5)


def test_gated_lora_work_model():
    meta = dict(op="gated_lora", shape=TINY_LORA, mix="weight", passes="forward", gradient=None)
    tokens, d, factors = 6, 12, 3 * 2 * 12
    assert roofline.gated_lora_work(meta) == (2 * tokens * 2 * d + 2 * 2 * factors, 4 * (tokens * d + factors))
    output = dict(meta, mix="output", passes="forward+backward", gradient="sum")
    flops, nbytes = roofline.gated_lora_work(output)
    assert flops == 3 * 2 * tokens * 6 * d
    assert nbytes == 4 * (tokens * d + factors) + 4 * (2 * tokens * 5 + 1 * 7 + factors)
    linear = dict(meta, op="gated_lora_linear", passes="forward+backward", gradient="dense")
    lora_flops, lora_bytes = roofline.gated_lora_work(linear)
    assert roofline.gated_lora_linear_work(linear) == (lora_flops + 2 * 2 * tokens * 5 * 7, lora_bytes + 2 * 4 * 5 * 7)


@pytest.mark.skipif(cpu_features.active_isa() is None, reason="needs the CPU kernels")
def test_every_cpu_group_runs_and_has_a_roofline():
    peaks = {"mm_gflops": 100.0, "triad_l3_gbs": 50.0, "triad_dram_gbs": 20.0}
    groups = bench_gated_lora.groups(TINY_LORA) + bench_retrieval.groups(TINY_RETRIEVAL)
    assert len(groups) == 2 * 2 * 3 + 2
    for name, impls, meta in groups:
        table = roofline.interleaved(impls, rounds=1, warmup=1)
        assert "fused" in table and any(way in table for way in run.PYTORCH_WAYS), name
        assert ("base_linear" in table) == (meta["op"] == "gated_lora_linear"), name
        line = roofline.roofline(table["fused"]["median_ms"], meta, peaks)
        assert line["bound"] in ("compute", "memory") and line["gflops"] > 0, name


def _child(fused_ms, published_ms, mm_gflops, cached_ms=None):
    """A benchmarks.run child's result with one gated_lora group (what measure_path writes)."""
    timings = {
        "fused": {"median_ms": fused_ms, "cpu_median_ms": fused_ms},
        "published": {"median_ms": published_ms, "cpu_median_ms": published_ms},
    }
    group = {
        "meta": dict(op="gated_lora", shape=TINY_LORA, mix="weight", passes="forward", gradient=None),
        "timings": timings,
        "ratios": run.ratios(timings),
        "cpu_time_ratios": run.ratios(timings, "cpu_median_ms"),
        "loadavg": (0.5, 0.5, 0.5),
    }
    if cached_ms is not None:
        cached = {name: dict(t, median_ms=cached_ms) for name, t in timings.items()}
        group["in_cache"] = {"timings": cached, "ratios": run.ratios(cached)}
    peaks = {"mm_gflops": mm_gflops, "triad_l3_gbs": 10.0, "triad_dram_gbs": 5.0}
    return {"environment": {"cpu": "test"}, "peaks": peaks, "groups": {"g": group}}


def test_repeated_children_combine_by_medians():
    """--repeats: a path's ratios, times and peaks are the medians over its child processes (a ratio is
    the median of the children's ratios, not a ratio of median times)."""
    children = [_child(1.0, 3.0, 100.0, 0.5), _child(2.0, 3.0, 50.0, 0.7), _child(1.5, 6.0, 80.0, 0.9)]
    combined = run.combine_children(children)
    group = combined["groups"]["g"]
    assert group["ratios"]["published / fused"] == 3.0  # children: 3, 1.5, 4
    assert group["timings"]["fused"]["median_ms"] == 1.5
    assert group["timings"]["published"]["children_median_ms"] == [3.0, 3.0, 6.0]
    assert group["in_cache"]["timings"]["fused"]["median_ms"] == 0.7
    assert combined["peaks"]["mm_gflops"] == 80.0
    flops, _ = roofline.gated_lora_work(group["meta"])
    assert group["roofline"]["gflops"] == pytest.approx(flops / 1.5e6)
    assert group["roofline"]["fraction_of_mm"] == pytest.approx(flops / 1.5e6 / 80.0)
    assert combined["children"] == children and len(group["loadavg"]) == 3
    # one child: its own figures
    alone = run.combine_children(children[:1])["groups"]["g"]
    assert alone["ratios"] == children[0]["groups"]["g"]["ratios"]


def test_table_of_a_combined_result():
    from benchmarks import table

    result = {"paths": {"avx512": run.combine_children([_child(1.0, 3.0, 100.0, 0.5), _child(2.0, 3.0, 50.0, 0.7)])}}
    (row,) = table.table(result).splitlines()[2:]
    assert row.startswith("| g | avx512 | 1.50 (1.50) | 2.25 (2.25) |")


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
