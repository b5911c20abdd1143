"""gated_lora on CPU (pytest-benchmark): the fused op against the PyTorch ways, same run.

Run through `python -m benchmarks.run` (ratios and JSON) or directly:
  pytest benchmarks/bench_gated_lora.py --benchmark-enable --benchmark-only
"""
import pytest
import torch

import reclora_kernels as rk
from benchmarks import baselines
from benchmarks import shapes
from benchmarks.shapes import LORA_SMOLLM2, SCALING, lora_inputs

PASSES = ["forward", "forward+backward"]
# compiled once, called with tensors only: dynamo guards on them, not on the benchmark's dicts
_compiled_composition = torch.compile(baselines.composed_gated_lora)


def implementations(mix):
    fused = lambda t: rk.gated_lora(t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING, mix=mix, backend="cpu")
    composed = lambda t: baselines.composed_gated_lora(t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING, mix == "output")
    compiled = lambda t: _compiled_composition(t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING, mix == "output")
    impls = {"fused": fused, "composition": composed, "composition_compiled": compiled}
    if mix == "weight":
        impls["published"] = lambda t: baselines.published_gated_lora(
            t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING
        )
        impls["fused_linear"] = lambda t: rk.gated_lora_linear(
            t["x"], t["weight"], None, t["gate"], t["lora_a"], t["lora_b"], SCALING, mix=mix, backend="cpu"
        )
        impls["base_linear"] = lambda t: baselines.base_linear(t["x"], t["weight"])
    return impls


CASES = [(mix, name) for mix in ("weight", "output") for name in implementations(mix)]


TRAINABLE = ("x", "gate", "lora_a", "lora_b")  # the base weight stays frozen, as in LoRA tuning


def step(fn, tensors, passes):
    return shapes.step(fn, tensors, passes, TRAINABLE)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("mix,impl", CASES)
def test_gated_lora_cpu(benchmark, mix, impl, passes):
    if rk.unavailable_reason("cpu", "cpu", "gated_lora") and impl.startswith("fused"):
        pytest.skip(rk.unavailable_reason("cpu", "cpu", "gated_lora"))
    tensors = lora_inputs(**LORA_SMOLLM2)
    for name in TRAINABLE:
        tensors[name].requires_grad_()
    shape = LORA_SMOLLM2
    tensors["grad_out"] = torch.randn(shape["batch"], shape["tokens"], shape["d_out"])
    fn = implementations(mix)[impl]
    step(fn, tensors, passes)  # warm-up (and compilation)
    benchmark.group = f"gated_lora mix={mix} {passes}"
    benchmark.extra_info.update(shape=shape, dtype="float32", mix=mix, impl=impl, passes=passes)
    benchmark(step, fn, tensors, passes)
