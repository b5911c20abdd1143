"""Top-k target attention on CPU: the fused op against the composition, interleaved in the same run.

`python -m benchmarks.run` times the groups below round-robin at each ISA path of the CPU.
"""

import torch

import reclora_kernels as rk
from benchmarks import baselines, shapes
from benchmarks.shapes import RETRIEVAL_CPU, retrieval_inputs

PASSES = ["forward", "forward+backward"]
TRAINABLE = ("query", "table")


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


def step(fn, tensors, passes):
    return shapes.step(fn, tensors, passes, TRAINABLE)


def groups(shape=RETRIEVAL_CPU):
    """[(name, {impl: zero-argument step}, meta)], as bench_gated_lora.groups."""
    tensors = prepare(shape)
    return [
        (
            f"topk_target_attention {passes}",
            {name: (lambda fn=fn, p=passes: step(fn, tensors, p)) for name, fn in implementations().items()},
            dict(
                op="topk_target_attention",
                shape=shape,
                dtype="float32",
                passes=passes,
                valid_positions=int(tensors["lengths"].sum()),
            ),
        )
        for passes in PASSES
    ]
