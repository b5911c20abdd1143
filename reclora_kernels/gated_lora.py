"""Personalized LoRA: per-sample gated meta-LoRA mixing fused with the batched low-rank matmul.

Each sample b owns mixing weights gate[b] over K meta-LoRAs (A_k: (r, d_in), B_k: (d_out, r)).
  mix="weight" (the published RecLoRA code): A_p = sum_k g_k A_k, B_p = sum_k g_k B_k,
      delta = scaling * x A_p^T B_p^T
  mix="output": delta = scaling * sum_k g_k x A_k^T B_k^T
Layout: reference in gated_lora_reference.py, Triton kernels in gated_lora_triton.py,
C++/CUDA kernels in csrc/gated_lora_{cpu.cpp,cuda.cu}; this module validates, dispatches
and wires autograd (custom ops reclora::gated_lora and reclora::gated_lora_grad).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from reclora_kernels import _backends, _checks, _native
from reclora_kernels.gated_lora_reference import gated_lora_reference, sample_ids_for

MIX_MODES = ("weight", "output")
Tensor = torch.Tensor


def gated_lora(x, gate, lora_a, lora_b, scaling=1.0, mix="weight", sample_index=None, backend=None) -> Tensor:
    """The personalized LoRA update alone.

    x: (B, T, d_in), (B, d_in), or packed tokens (M, d_in) with sample_index: (M,) int64
    giving each token's row of gate. gate: (B, K) mixing weights (any real values).
    lora_a: (K, r, d_in). lora_b: (K, d_out, r). Returns delta shaped like x with d_out last,
    in x's dtype. backend: None (fastest available), "torch", "cpu", "triton" or "cuda".
    """
    return _apply(x, None, None, gate, lora_a, lora_b, scaling, mix, sample_index, backend)


def gated_lora_linear(
    x, weight, bias, gate, lora_a, lora_b, scaling=1.0, mix="weight", sample_index=None, backend=None
) -> Tensor:
    """x W^T + bias + gated_lora(...), with the base projection fused into the kernel.

    weight: (d_out, d_in); bias: (d_out,) or None; other arguments as in gated_lora.
    """
    return _apply(x, weight, bias, gate, lora_a, lora_b, scaling, mix, sample_index, backend)


def _apply(x, weight, bias, gate, lora_a, lora_b, scaling, mix, sample_index, backend):
    x2d, sample_index = _check_inputs(x, weight, bias, gate, lora_a, lora_b, scaling, mix, sample_index)
    backend = _backends.resolve(backend, x.device.type, "gated_lora")
    output_mix = mix == "output"
    if backend == "torch":
        ids = sample_ids_for(x2d.shape[0], gate.shape[0], sample_index, x.device)
        y = gated_lora_reference(x2d, gate, lora_a, lora_b, ids, float(scaling), output_mix)
        if weight is not None:
            y = y + F.linear(x2d, weight, bias)
    else:
        if x.dtype not in _checks.KERNEL_DTYPES:
            raise TypeError(
                f"x has dtype {x.dtype}: the {backend} backend supports float32, float16 and bfloat16 "
                "(backend='torch' runs any float dtype)"
            )
        y = _run(
            x2d.contiguous(),
            None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous(),
            gate.float().contiguous(),
            lora_a.contiguous(),
            lora_b.contiguous(),
            sample_index,
            float(scaling),
            output_mix,
            backend,
        )
    return y.view(*x.shape[:-1], lora_b.shape[1])


def _check_inputs(x, weight, bias, gate, lora_a, lora_b, scaling, mix, sample_index):
    """Validates every argument; returns x as (M, d_in) tokens and the checked sample_index."""
    _checks.tensor("x", x, ndim=(2, 3), dtypes=_checks.FLOAT_DTYPES)
    device = x.device
    _checks.tensor("gate", gate, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=device)
    num_samples, num_loras = gate.shape
    if num_loras < 1:
        raise ValueError(f"gate must have shape (B, K) with K >= 1 meta-LoRAs, got {tuple(gate.shape)}")
    d_in = x.shape[-1]
    if d_in < 1:
        raise ValueError(f"x must have d_in >= 1 features, got shape {tuple(x.shape)}")
    _checks.tensor("lora_a", lora_a, ndim=3, device=device)
    rank = lora_a.shape[1]
    _checks.tensor("lora_a", lora_a, shape=(num_loras, None, d_in))
    if rank < 1:
        raise ValueError(f"lora_a must have shape (K, r, d_in) with r >= 1, got {tuple(lora_a.shape)}")
    _checks.tensor("lora_b", lora_b, ndim=3, device=device, shape=(num_loras, None, rank))
    d_out = lora_b.shape[1]
    if weight is not None:
        _checks.tensor("weight", weight, device=device, shape=(d_out, d_in))
    if bias is not None:
        if weight is None:
            raise ValueError("bias needs weight")
        _checks.tensor("bias", bias, device=device, shape=(d_out,))
    _checks.same_dtype(
        [("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("weight", weight), ("bias", bias)],
        "(the LoRA factors and base projection run in x's dtype)",
    )
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    _checks.choice("mix", mix, MIX_MODES)

    if sample_index is None:
        if x.shape[0] != num_samples:
            layout = "(B, T, d_in)" if x.dim() == 3 else "(B, d_in)"
            raise ValueError(
                f"x must have shape {layout} with B = gate.shape[0] = {num_samples}, got {tuple(x.shape)} "
                "(packed tokens need sample_index)"
            )
        return x.reshape(-1, d_in), None
    if x.dim() != 2:
        raise ValueError(f"with sample_index, x must be packed tokens (M, d_in), got shape {tuple(x.shape)}")
    _checks.tensor("sample_index", sample_index, dtypes=(torch.int64,), device=device, shape=(x.shape[0],))
    _checks.index_range("sample_index", sample_index, 0, num_samples, "rows of gate")
    return x, sample_index.contiguous()


def _run(*inputs):
    """The custom op where torch.compile, export, functorch or a dispatch mode must see it; in plain
    eager, _EagerGatedLoRA: the same kernels and backward without the custom op's Python dispatch
    layers (about 0.2 ms of a forward+backward, a tenth of the op at the SmolLM2 shape)."""
    if _needs_custom_op(inputs):
        return _gated_lora_op(*inputs)[0]
    return _EagerGatedLoRA.apply(*inputs)[0]


def _needs_custom_op(inputs):
    return (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.utils._python_dispatch._get_current_dispatch_mode() is not None
        or any(isinstance(t, torch.Tensor) and type(t) not in _PLAIN_TENSORS for t in inputs)
    )


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # anything else (fake, functional, subclasses) may trace


def _kernels(backend):
    """The module-like object holding the backend's gated_lora_forward/backward."""
    if backend == "triton":
        from reclora_kernels import gated_lora_triton

        return gated_lora_triton
    return torch.ops.reclora  # cpu and cuda: the dispatcher picks the kernel by device


def _forward_kernels(*inputs):
    """The backend's forward on _gated_lora_op's arguments (the backend last): (y, u)."""
    return tuple(_kernels(inputs[-1]).gated_lora_forward(*inputs[:-1]))


def _backward_kernels(*inputs):
    """The backend's backward on _gated_lora_grad_op's arguments (the backend last)."""
    return tuple(_kernels(inputs[-1]).gated_lora_backward(*inputs[:-1]))


@torch.library.custom_op("reclora::gated_lora", mutates_args=())
def _gated_lora_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    gate: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sample_index: Optional[Tensor],
    scaling: float,
    output_mix: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(y, u): u, the LoRA activations the backward reuses, is an output only so that autograd can
    keep it (the public functions return y)."""
    return _forward_kernels(x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix, backend)


@_gated_lora_op.register_fake
def _(x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix, backend):
    return _forward_like(x, lora_a, lora_b, output_mix, backend)


# The kernels each native backend runs. The CUDA emulation tests map "cpu" to "cuda": there the
# native ops run the CUDA kernels' code on CPU tensors (tests/cuda_emulation/kernels.py).
NATIVE_KERNELS = {"cpu": "cpu", "cuda": "cuda"}


def _forward_like(x, lora_a, lora_b, output_mix, backend):
    """Empty (y, u) as the backend's forward returns them. u: (M, r) for the CPU's weight mix (s A_p x,
    what its tile pipeline needs), else U = x A_cat^T (M, K r); float32, but x's dtype on CUDA."""
    kernels = NATIVE_KERNELS.get(backend, backend)
    num_loras, rank = lora_a.shape[:2]
    width = rank if kernels == "cpu" and not output_mix else num_loras * rank
    dtype = x.dtype if kernels == "cuda" else torch.float32
    return x.new_empty(x.shape[0], lora_b.shape[1]), x.new_empty(x.shape[0], width, dtype=dtype)


@torch.library.custom_op("reclora::gated_lora_grad", mutates_args=())
def _gated_lora_grad_op(
    grad_out: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Optional[Tensor],
    gate: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    sample_index: Optional[Tensor],
    scaling: float,
    output_mix: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_kernels(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, scaling, output_mix, backend)


@_gated_lora_grad_op.register_fake
def _(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, scaling, output_mix, backend):
    return _grad_like(x, gate, lora_a, lora_b)


def _grad_like(x, gate, lora_a, lora_b):
    return (
        torch.empty_like(x),
        torch.empty_like(gate, dtype=torch.float32),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix, backend = inputs
    u = output[1]
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, u, weight, gate, lora_a, lora_b, sample_index)
    ctx.scaling, ctx.output_mix, ctx.backend = scaling, output_mix, backend


def _backward(ctx, grad_out, grad_u, grad_op=None):
    """grad_u: always None or zeros (u is not differentiable). grad_op: the backward kernels' entry
    (default: the reclora::gated_lora_grad custom op)."""
    x, u, weight, gate, lora_a, lora_b, sample_index = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    if ctx.backend != "cpu":  # the CPU kernels read any strides, a broadcast gradient included
        grad_out = grad_out.contiguous()
    grad_x, grad_gate, grad_a, grad_b = (grad_op or _gated_lora_grad_op)(
        grad_out,
        x,
        u,
        weight if need_x else None,
        gate,
        lora_a,
        lora_b,
        sample_index,
        ctx.scaling,
        ctx.output_mix,
        ctx.backend,
    )
    grad_weight = grad_out.t() @ x if need_weight else None
    grad_bias = grad_out.sum(0) if need_bias else None
    return grad_x, grad_weight, grad_bias, grad_gate, grad_a, grad_b, None, None, None, None


_gated_lora_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGatedLoRA(torch.autograd.Function):
    """reclora::gated_lora's forward and backward for plain eager calls (see _run)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_kernels(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_u):
        return _backward(ctx, grad_out, grad_u, grad_op=_backward_kernels)


def _register_native_fakes():
    """Shapes of the C++ ops for torch.compile and opcheck (only when _C is loaded)."""

    @torch.library.register_fake("reclora::gated_lora_forward")
    def _(x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix):
        return _forward_like(x, lora_a, lora_b, output_mix, x.device.type)

    @torch.library.register_fake("reclora::gated_lora_backward")
    def _(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, scaling, output_mix):
        return _grad_like(x, gate, lora_a, lora_b)


if _native.is_loaded():
    _register_native_fakes()
