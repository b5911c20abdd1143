"""Peak memory of one call: the CUDA allocator's peak on GPU, the peak resident set on CPU."""

import re

import torch


def _status_bytes(field):
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def peak_bytes(fn, device):
    """Bytes above the starting point at the peak of fn(). CPU: Linux's VmHWM, reset through clear_refs."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the high-water mark to the current resident set
    start = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - start
