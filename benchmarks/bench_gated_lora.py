"""gated_lora on CPU: the fused op against the PyTorch ways, interleaved in the same run.

`python -m benchmarks.run` times every group below round-robin (benchmarks/roofline.py has the
timer) at each ISA path of the CPU and writes the ratios to benchmarks/results/.
"""

import torch

import reclora_kernels as rk
from benchmarks import baselines, shapes
from benchmarks.shapes import LORA_SMOLLM2, SCALING, lora_inputs

PASSES = ["forward", "forward+backward"]
# Upstream gradients of forward+backward: a dense random one, and the expanded stride-0 one that
# y.sum().backward() passes.
GRADIENTS = ["dense", "sum"]
TRAINABLE = ("x", "gate", "lora_a", "lora_b")  # the base weight stays frozen, as in LoRA tuning


def implementations(mix):
    """The op alone: the fused kernel against the PyTorch ways of computing the LoRA term."""
    impls = {
        "fused": lambda t: rk.gated_lora(t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING, mix=mix, backend="cpu"),
        # No torch.compile'd composition here: its Inductor kernel aborts the process (index out of
        # bounds) under ATEN_CPU_CAPABILITY=avx2 with torch 2.13; it was never faster than eager on CPU.
        "composition": lambda t: baselines.composed_gated_lora(
            t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING, mix == "output"
        ),
    }
    if mix == "weight":
        impls["published"] = lambda t: baselines.published_gated_lora(
            t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING
        )
    return impls


def linear_implementations(mix):
    """The adapted projection, base GEMM included, as a model runs it (benchmarks/gpu.py's group):
    gated_lora_linear against the base linear alone and against each PyTorch way added to it. A group
    of its own, so that the op alone is timed after other LoRA implementations, and the projections
    after other projections (a model's regimes), not one after the other."""
    base = lambda t: baselines.base_linear(t["x"], t["weight"])
    impls = {
        "fused": lambda t: rk.gated_lora_linear(
            t["x"], t["weight"], None, t["gate"], t["lora_a"], t["lora_b"], SCALING, mix=mix, backend="cpu"
        ),
        "base_linear": base,
    }
    for name, delta in implementations(mix).items():
        if name != "fused":
            impls[f"{name}+linear"] = lambda t, delta=delta: base(t) + delta(t)
    return impls


def step(fn, tensors, passes):
    """One timed call; grad_out None: the gradient of y.sum()."""
    if passes == "forward" or tensors["grad_out"] is not None:
        return shapes.step(fn, tensors, passes, TRAINABLE)
    for name in TRAINABLE:
        tensors[name].grad = None
    fn(tensors).sum().backward()


def prepare(shape, gradient="dense"):
    tensors = lora_inputs(**shape)
    for name in TRAINABLE:
        tensors[name].requires_grad_()
    dense = gradient == "dense"
    tensors["grad_out"] = torch.randn(shape["batch"], shape["tokens"], shape["d_out"]) if dense else None
    return tensors


def groups(shape=LORA_SMOLLM2):
    """[(name, {impl: zero-argument step}, meta)]: each group's impls are timed round-robin."""
    out = []
    for op, impls_of in (("gated_lora", implementations), ("gated_lora_linear", linear_implementations)):
        for mix in ("weight", "output"):
            for passes in PASSES:
                for gradient in GRADIENTS if passes != "forward" else [None]:
                    tensors = prepare(shape, gradient or "dense")
                    impls = {
                        name: (lambda fn=fn, t=tensors, p=passes: step(fn, t, p)) for name, fn in impls_of(mix).items()
                    }
                    name = f"{op} mix={mix} {passes}" + (f" grad={gradient}" if gradient else "")
                    meta = dict(op=op, shape=shape, dtype="float32", mix=mix, passes=passes, gradient=gradient)
                    out.append((name, impls, meta))
    return out
