"""GPU benchmarks with triton.testing.do_bench: fused ops against the PyTorch ways, same run.

  python -m benchmarks.gpu [--out DIR] [--quick]
Writes gpu-<card>-<date>.json (timings at quantiles 0.5/0.2/0.8, ratios, TFLOP/s and GB/s
beside the card's peak) and gpu-scaling-<card>-<date>.png.
"""

import argparse
import os
import re

import torch
import triton.testing

import reclora_kernels as rk
from benchmarks import baselines, bench_gated_lora, bench_retrieval
from benchmarks.environment import RESULTS, describe
from benchmarks.memory import peak_bytes
from benchmarks.run import plot_scaling
from benchmarks.shapes import LORA_7B, LORA_SMOLLM2, RETRIEVAL_GPU, SCALING, lora_inputs
from reclora.files import write_json

# Where the benchmarks run, and the attention scaling study's sizes; tests/test_gpu_check.py runs the
# whole entry point on CPU with small stand-ins for these and for the timer.
DEVICE = "cuda"
SCALING_BATCH = 1024
SCALING_LENGTHS = [512 * 2**i for i in range(8)]

# dense bf16 tensor-core FLOP/s and HBM bytes/s from NVIDIA's data sheets
PEAKS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12)}


def card_peaks():
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return (None, None)


def timed(fn):
    median, low, high = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": low, "p80_ms": high}


def lora_step(fn, tensors, passes):
    return lambda: bench_gated_lora.step(fn, tensors, passes)


def lora_impls(backends):
    def linear_plus(delta):
        return lambda t: baselines.base_linear(t["x"], t["weight"]) + delta(t)

    # The published code's gate lives in the model's dtype (einsum takes no mixed dtypes).
    published = lambda t: baselines.published_gated_lora(
        t["x"], t["gate"].to(t["x"].dtype), t["lora_a"], t["lora_b"], SCALING
    )
    composed = lambda t: baselines.composed_gated_lora(t["x"], t["gate"], t["lora_a"], t["lora_b"], SCALING)
    impls = {
        "base_linear": lambda t: baselines.base_linear(t["x"], t["weight"]),
        "published+linear": linear_plus(published),
        "composition+linear": linear_plus(composed),
        "composition_compiled+linear": torch.compile(linear_plus(composed)),
    }
    for backend in backends:
        impls[f"fused_{backend}"] = lambda t, b=backend: rk.gated_lora_linear(
            t["x"], t["weight"], None, t["gate"], t["lora_a"], t["lora_b"], SCALING, backend=b
        )
    return impls


def bench_lora(shape, backends):
    tensors = lora_inputs(**shape, device=DEVICE, dtype=torch.bfloat16)
    for name in bench_gated_lora.TRAINABLE:
        tensors[name].requires_grad_()
    tensors["grad_out"] = torch.randn(
        shape["batch"], shape["tokens"], shape["d_out"], device=DEVICE, dtype=torch.bfloat16
    )
    table = {}
    for passes in ("forward", "forward+backward"):
        group = table.setdefault(f"gated_lora_linear {passes}", {})
        for name, fn in lora_impls(backends).items():
            group[name] = timed(lora_step(fn, tensors, passes))
            print(f"gated_lora {shape} {passes} {name}: {group[name]['median_ms']:.3f} ms")
    tokens = shape["batch"] * shape["tokens"]
    base_flops = 2 * tokens * shape["d_in"] * shape["d_out"]
    flop_peak, byte_peak = card_peaks()
    base_bytes = 2 * (tokens * (shape["d_in"] + shape["d_out"]) + shape["d_in"] * shape["d_out"])
    achieved = {}
    for name, stats in table["gated_lora_linear forward"].items():
        seconds = stats["median_ms"] / 1e3
        achieved[name] = {
            "TFLOP/s (base GEMM flops)": base_flops / seconds / 1e12,
            "GB/s (x, W, y bytes)": base_bytes / seconds / 1e9,
            "fraction of peak FLOP/s": base_flops / seconds / flop_peak if flop_peak else None,
        }
    ratio = {}
    for passes in ("forward", "forward+backward"):
        group = table[f"gated_lora_linear {passes}"]
        for backend in backends:
            fused = group[f"fused_{backend}"]["median_ms"]
            ratio[f"{passes}: fused_{backend} / base_linear"] = fused / group["base_linear"]["median_ms"]
            ratio[f"{passes}: published+linear / fused_{backend}"] = group["published+linear"]["median_ms"] / fused
            ratio[f"{passes}: composition+linear / fused_{backend}"] = group["composition+linear"]["median_ms"] / fused
    return {
        "shape": shape,
        "dtype": "bfloat16",
        "timings": table,
        "ratios": ratio,
        "achieved": achieved,
        "peaks": {"flop_per_s": flop_peak, "bytes_per_s": byte_peak},
    }


def attention_impls(backends):
    impls = {
        "composition": lambda t: baselines.composed_topk_attention(
            t["query"], t["table"], t["ids"], t["lengths"], t["k"], t["scale"]
        )[0]
    }
    for backend in backends:
        impls[f"fused_{backend}"] = lambda t, b=backend: rk.topk_target_attention(
            t["query"], t["table"], t["k"], lengths=t["lengths"], ids=t["ids"], scale=t["scale"], backend=b
        )[0]
    return impls


def attention_step(fn, tensors, passes):
    return lambda: bench_retrieval.step(fn, tensors, passes)


def attention_tensors(shape):
    return bench_retrieval.prepare(shape, device=DEVICE, dtype=torch.bfloat16)


def bench_attention(shape, backends):
    tensors = attention_tensors(shape)
    table, memory = {}, {}
    for passes in ("forward", "forward+backward"):
        group = table.setdefault(f"topk_target_attention {passes}", {})
        for name, fn in attention_impls(backends).items():
            group[name] = timed(attention_step(fn, tensors, passes))
            print(f"attention {shape} {passes} {name}: {group[name]['median_ms']:.3f} ms")
            if passes == "forward+backward":
                memory[name] = peak_bytes(attention_step(fn, tensors, passes), DEVICE) / 2**20
    valid = int(tensors["lengths"].sum())
    key_bytes = valid * shape["dim"] * 2
    ids_bytes = valid * 8
    _, byte_peak = card_peaks()
    bandwidth = {}
    for name, stats in table["topk_target_attention forward"].items():
        seconds = stats["median_ms"] / 1e3
        bandwidth[name] = {
            "GB/s (key bytes)": key_bytes / seconds / 1e9,
            "GB/s (key + id bytes)": (key_bytes + ids_bytes) / seconds / 1e9,
            "fraction of peak (key + id bytes)": (key_bytes + ids_bytes) / seconds / byte_peak if byte_peak else None,
        }
    return {
        "shape": shape,
        "dtype": "bfloat16",
        "timings": table,
        "ratios": ratios_by_baseline(table, backends),
        "bandwidth": bandwidth,
        "peak_memory_MiB": memory,
    }


def ratios_by_baseline(table, backends):
    out = {}
    for group, impls in table.items():
        for backend in backends:
            out[f"{group}: composition / fused_{backend}"] = (
                impls["composition"]["median_ms"] / impls[f"fused_{backend}"]["median_ms"]
            )
    return out


def attention_scaling(batch, lengths, backend):
    rows = []
    for length in lengths:
        shape = dict(RETRIEVAL_GPU[0], batch=batch, length=length)
        tensors = attention_tensors(shape)
        impls = attention_impls([backend])
        rows.append(
            {
                "L": length,
                "fused_ms": timed(attention_step(impls[f"fused_{backend}"], tensors, "forward+backward"))["median_ms"],
                "composition_ms": timed(attention_step(impls["composition"], tensors, "forward+backward"))["median_ms"],
            }
        )
        print(f"gpu scaling L={length}: {rows[-1]}")
        del tensors
        torch.cuda.empty_cache()
    return rows


def usable_backends(op):
    return [b for b in ("cuda", "triton") if rk.unavailable_reason(b, DEVICE, op) is None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="only the 7B LoRA shape and L=8192")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    env = describe()
    lora_backends, retrieval_backends = usable_backends("gated_lora"), usable_backends("retrieval")
    card = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-")
    result = {
        "environment": env,
        "device": DEVICE,
        "backends": {"gated_lora": lora_backends, "retrieval": retrieval_backends},
    }
    shapes = [LORA_7B] + ([] if args.quick else [LORA_SMOLLM2])
    result["gated_lora"] = [bench_lora(shape, lora_backends) for shape in shapes]
    result["topk_target_attention"] = [
        bench_attention(s, retrieval_backends) for s in RETRIEVAL_GPU[: 1 if args.quick else None]
    ]
    if retrieval_backends and not args.quick:
        backends = retrieval_backends
        rows = attention_scaling(SCALING_BATCH, SCALING_LENGTHS, backends[0])
        png = os.path.join(args.out, f"gpu-scaling-{card}-{env['date']}.png")
        plot_scaling(rows, SCALING_BATCH, png, f"top-k attention, {env['gpu']}, B={SCALING_BATCH}, d=64, k=64, bf16")
        result["topk_target_attention_scaling"] = {
            "batch": SCALING_BATCH,
            "backend": backends[0],
            "rows": rows,
            "plot": os.path.basename(png),
        }
    path = os.path.join(args.out, f"gpu-{card}-{env['date']}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
