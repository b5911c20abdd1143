"""Top-k target attention on CPU (pytest-benchmark): the fused op against the composition, same run.

Run through `python -m benchmarks.run` (ratios, memory, JSON) or directly:
  pytest benchmarks/bench_retrieval.py --benchmark-enable --benchmark-only
"""
import pytest
import torch

import reclora_kernels as rk
from benchmarks import baselines
from benchmarks import shapes
from benchmarks.shapes import RETRIEVAL_CPU, retrieval_inputs

PASSES = ["forward", "forward+backward"]


def implementations():
    def fused(t):
        return rk.topk_target_attention(
            t["query"], t["table"], t["k"], lengths=t["lengths"], ids=t["ids"], scale=t["scale"], backend="cpu"
        )[0]

    def composed(t):
        return baselines.composed_topk_attention(t["query"], t["table"], t["ids"], t["lengths"], t["k"], t["scale"])[0]

    return {"fused": fused, "composition": composed}


def prepare(shape, device="cpu", dtype=torch.float32):
    tensors = retrieval_inputs(**shape, device=device, dtype=dtype)
    tensors["scale"] = shape["dim"] ** -0.5
    for name in TRAINABLE:
        tensors[name].requires_grad_()
    tensors["grad_out"] = torch.randn(shape["batch"], shape["dim"], device=device, dtype=dtype)
    return tensors


TRAINABLE = ("query", "table")


def step(fn, tensors, passes):
    return shapes.step(fn, tensors, passes, TRAINABLE)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", list(implementations()))
def test_topk_attention_cpu(benchmark, impl, passes):
    if impl == "fused" and rk.unavailable_reason("cpu", "cpu", "retrieval"):
        pytest.skip(rk.unavailable_reason("cpu", "cpu", "retrieval"))
    tensors = prepare(RETRIEVAL_CPU)
    fn = implementations()[impl]
    step(fn, tensors, passes)
    benchmark.group = f"topk_target_attention {passes}"
    benchmark.extra_info.update(shape=RETRIEVAL_CPU, dtype="float32", impl=impl, passes=passes)
    benchmark(step, fn, tensors, passes)
