"""flash-attention's tolerance rule.

A kernel's error against the float64 reference may be at most twice the error of the
reference computed in the kernel's own dtype, plus a small atol scaled to the output.
"""

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_error(value, ref64):
    if value.numel() == 0:
        return 0.0
    diff = value.double() - ref64.double()
    # -inf == -inf (missing top-k slots) counts as exact
    diff = torch.where(value.double() == ref64.double(), torch.zeros_like(diff), diff)
    return float(diff.abs().max())


def assert_within_tolerance(name, value, ref64, ref_same_dtype, dtype=None):
    """value: kernel output; ref64: reference in float64; ref_same_dtype: reference in value's dtype."""
    dtype = dtype or ref_same_dtype.dtype
    assert value.shape == ref64.shape, f"{name}: shape {tuple(value.shape)} != {tuple(ref64.shape)}"
    finite = ref64[torch.isfinite(ref64)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
    err = max_error(value, ref64)
    base = max_error(ref_same_dtype, ref64)
    bound = 2 * base + ATOL[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > 2 x {base:.3g} (same-dtype reference) + {ATOL[dtype] * scale:.3g}"
