"""Argument checks that fail with a message naming the argument and what was expected."""

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def tensor(name, value, *, ndim=None, dtypes=None, device=None, shape=None):
    """Checks one tensor argument. shape: tuple with None for free dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() not in _as_tuple(ndim):
        raise ValueError(f"{name} must have {_or(_as_tuple(ndim))} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_or(dtypes)}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device} (like the first input), got {value.device}")
    if shape is not None:
        ok = value.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, value.shape))
        if not ok:
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return value


def same_dtype(names_values, what):
    """All named tensors (None skipped) share one dtype."""
    present = [(n, v) for n, v in names_values if v is not None]
    first_name, first = present[0]
    for name, value in present[1:]:
        if value.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {first_name} ({first.dtype}) {what}, got {value.dtype}"
            )


def index_range(name, index, low, high, what, where=None):
    """Every entry of index (where the bool tensor where is True, if given) lies in [low, high).

    Eager: checked on the host (a sync), so a bad index is a ValueError, never a device crash.
    Inside torch.compile the graph cannot sync: the check becomes a device-side assertion.
    """
    if torch.compiler.is_compiling():
        inside = (index >= low) & (index < high)
        torch._assert_async((inside if where is None else inside | ~where).all(), f"{name} out of range ({what})")
        return
    if where is not None:
        index = index[where]
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} must hold {what} in [{low}, {high}), got values in [{lo}, {hi}]")


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {_or(options)}, got {value!r}")
    return value


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _or(options):
    options = [str(o).replace("torch.", "") for o in options]
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]
