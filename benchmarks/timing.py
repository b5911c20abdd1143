"""Wall-clock timing of one call, and the summary every benchmark reports (median, quartiles, range)."""

import statistics
import time

import torch


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device):
    """Milliseconds of fn(); on CUDA, the device is synchronized on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def stats(times):
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median_ms": statistics.median(ordered),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "iqr_ms": q[2] - q[0],
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
        "steps": len(ordered),
        "all_ms": ordered,
    }
