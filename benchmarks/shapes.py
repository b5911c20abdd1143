"""Benchmark shapes (from the issues), input builders and the timed step, shared by the CPU and GPU benchmarks."""

import torch

# SmolLM2-135M q_proj / v_proj: d = 576; RecLoRA's K = 16 meta-LoRAs of rank 8, lora_alpha 16
LORA_SMOLLM2 = dict(batch=8, tokens=128, d_in=576, d_out=576, num_loras=16, rank=8)
LORA_7B = dict(batch=8, tokens=512, d_in=4096, d_out=4096, num_loras=16, rank=8)
SCALING = 2.0

RETRIEVAL_CPU = dict(batch=256, length=2048, dim=64, k=64, table_rows=100_000)
RETRIEVAL_GPU = [
    dict(batch=1024, length=8192, dim=64, k=64, table_rows=1_000_000),
    dict(batch=1024, length=65536, dim=64, k=64, table_rows=1_000_000),
]


def lora_inputs(batch, tokens, d_in, d_out, num_loras, rank, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    return dict(
        x=randn(batch, tokens, d_in),
        gate=torch.softmax(torch.randn(batch, num_loras, generator=gen, device=device), -1),
        lora_a=randn(num_loras, rank, d_in, std=d_in**-0.5),
        lora_b=randn(num_loras, d_out, rank, std=rank**-0.5),
        weight=randn(d_out, d_in, std=d_in**-0.5),
        bias=randn(d_out),
    )


def retrieval_inputs(batch, length, dim, k, table_rows, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return dict(
        query=torch.randn(batch, dim, generator=gen, device=device).to(dtype),
        table=torch.randn(table_rows, dim, generator=gen, device=device).to(dtype),
        ids=torch.randint(0, table_rows, (batch, length), generator=gen, device=device),
        lengths=torch.randint(length // 2, length + 1, (batch,), generator=gen, device=device),
        k=k,
    )


def step(fn, tensors, passes, trainable):
    """One timed call: forward under no_grad, or forward+backward with fresh gradients for trainable."""
    if passes == "forward":
        with torch.no_grad():
            return fn(tensors)
    for name in trainable:
        tensors[name].grad = None
    fn(tensors).backward(tensors["grad_out"])
