"""Top-k behaviour retrieval and top-k target attention over lifelong histories.

score[b, l] = scale * <query[b], key[b, l]> over the valid positions of row b; keep the
top k (ties: smaller position first). topk_target_attention then pools the selected
values with a softmax over the selected scores. With a table (N, d) and ids (B, L) the
kernels gather rows while scoring, never forming (B, L, d), and the backward touches
only the k selected rows.
Layout: reference in retrieval_reference.py, Triton kernels in retrieval_triton.py,
C++/CUDA kernels in csrc/retrieval_{cpu.cpp,cuda.cu}; this module validates, dispatches
and wires autograd.
"""

from typing import Optional

import torch

from reclora_kernels import _backends, _checks, _native
from reclora_kernels.retrieval_reference import (
    retrieve_topk_reference,
    topk_target_attention_reference,
    valid_positions,
)

Tensor = torch.Tensor


def retrieve_topk(query, keys, k, lengths=None, mask=None, ids=None, scale=1.0, backend=None):
    """Top-k keys by scale * <query, key>.

    query: (B, d). keys: (B, L, d), or a table (N, d) with ids: (B, L) int64.
    lengths: (B,) valid prefix per row; mask: (B, L) bool, False drops a position.
    Returns scores (B, k) float32 (float64 for float64 inputs on backend="torch"),
    sorted descending, and index (B, k) int64 positions on L; missing slots hold
    -inf and -1. scores are differentiable with respect to query and keys.
    """
    lengths, mask = _check_inputs(query, keys, None, k, lengths, mask, ids, scale)
    backend = _resolve(backend, query)
    if backend == "torch":
        return retrieve_topk_reference(query, keys, k, ids, lengths, mask, float(scale))
    return _retrieve_topk_op(query, keys, ids, lengths, mask, k, float(scale), backend)


def topk_target_attention(query, keys, k, values=None, lengths=None, mask=None, ids=None, scale=None, backend=None):
    """Softmax-pooled top-k target attention (SIM / TWIN style).

    values: same layout as keys ((B, L, d_v), or a table (N_v, d_v) read through ids);
    default: keys. scale defaults to 1/sqrt(d). Returns pooled (B, d_v) in values'
    dtype and index (B, k) as in retrieve_topk. Rows with no valid item pool to zeros.
    """
    lengths, mask = _check_inputs(query, keys, values, k, lengths, mask, ids, 1.0 if scale is None else scale)
    if scale is None:
        if query.shape[-1] == 0:
            raise ValueError(
                f"query has d = 0 features: pass scale (the default 1/sqrt(d) does not exist), "
                f"got shape {tuple(query.shape)}"
            )
        scale = query.shape[-1] ** -0.5
    backend = _resolve(backend, query)
    if backend == "torch":
        return topk_target_attention_reference(query, keys, k, values, ids, lengths, mask, float(scale))
    values = keys if values is None else values
    pooled, index, _ = _topk_attention_op(query, keys, values, ids, lengths, mask, k, float(scale), backend)
    return pooled, index


def _resolve(backend, query):
    backend = _backends.resolve(backend, query.device.type, "retrieval")
    if backend != "torch" and query.dtype not in _checks.KERNEL_DTYPES:
        raise TypeError(
            f"query has dtype {query.dtype}: the {backend} backend supports float32, float16 and "
            "bfloat16 (backend='torch' runs any float dtype)"
        )
    return backend


def _check_inputs(query, keys, values, k, lengths, mask, ids, scale):
    """Validates every argument; returns lengths as contiguous int64 and mask as contiguous bool."""
    _checks.tensor("query", query, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    device = query.device
    batch, dim = query.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < 2**31:  # the kernels index in int32
        raise ValueError(f"k must be an int >= 1 and < 2**31, got {k!r}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    if ids is None:
        _checks.tensor("keys", keys, device=device, shape=(batch, None, dim))
        length = keys.shape[1]
        if values is not None:
            _checks.tensor("values", values, device=device, shape=(batch, length, None))
    else:
        _checks.tensor("ids", ids, dtypes=(torch.int64,), device=device, ndim=2)
        _checks.tensor("ids", ids, shape=(batch, None))
        _checks.tensor("keys", keys, device=device, shape=(None, dim))
        length = ids.shape[1]
        if values is not None:
            _checks.tensor("values", values, device=device, ndim=2)
    _checks.same_dtype([("query", query), ("keys", keys), ("values", values)], "")
    if lengths is not None:
        _checks.tensor("lengths", lengths, dtypes=(torch.int64, torch.int32), device=device, shape=(batch,))
        lengths = lengths.to(torch.int64).contiguous()
        _checks.index_range("lengths", lengths, 0, length + 1, "valid prefix lengths")
    if mask is not None:
        _checks.tensor("mask", mask, dtypes=(torch.bool,), device=device, shape=(batch, length))
        mask = mask.contiguous()
    if ids is not None:
        # Only positions that are read must name a row: padding may hold anything (even with an empty table).
        valid = valid_positions(batch, length, lengths, mask, device)
        for table_name, table in (("keys", keys), ("values", values)):
            if table is not None:
                _checks.index_range("ids", ids, 0, table.shape[0], f"rows of {table_name}", where=valid)
    return lengths, mask


def _kernels(backend):
    if backend == "triton":
        from reclora_kernels import retrieval_triton

        return retrieval_triton
    return torch.ops.reclora


# ---- retrieve_topk: scores differentiable ------------------------------------------------


@torch.library.custom_op("reclora::retrieve_topk", mutates_args=())
def _retrieve_topk_op(
    query: Tensor,
    keys: Tensor,
    ids: Optional[Tensor],
    lengths: Optional[Tensor],
    mask: Optional[Tensor],
    k: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    scores, index = _kernels(backend).retrieve_topk_forward(
        query.contiguous(), keys.contiguous(), ids if ids is None else ids.contiguous(), lengths, mask, k, scale
    )
    return scores, index


def _topk_like(query, k):
    batch = query.shape[0]
    return (
        query.new_empty(batch, k, dtype=torch.float32),
        query.new_empty(batch, k, dtype=torch.int64),
    )


@_retrieve_topk_op.register_fake
def _(query, keys, ids, lengths, mask, k, scale, backend):
    return _topk_like(query, k)


@torch.library.custom_op("reclora::retrieve_topk_grad", mutates_args=())
def _retrieve_topk_grad_op(
    grad_scores: Tensor, query: Tensor, keys: Tensor, ids: Optional[Tensor], index: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    grad_query, grad_keys = _kernels(backend).retrieve_topk_backward(
        grad_scores, query.contiguous(), keys.contiguous(), ids if ids is None else ids.contiguous(), index, scale
    )
    return grad_query, grad_keys


@_retrieve_topk_grad_op.register_fake
def _(grad_scores, query, keys, ids, index, scale, backend):
    return torch.empty_like(query), torch.empty_like(keys)


def _retrieve_setup(ctx, inputs, output):
    query, keys, ids, lengths, mask, k, scale, backend = inputs
    _, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(query, keys, ids, index)
    ctx.scale, ctx.backend = scale, backend


def _retrieve_backward(ctx, grad_scores, grad_index):
    query, keys, ids, index = ctx.saved_tensors
    grad_query, grad_keys = _retrieve_topk_grad_op(
        grad_scores.float().contiguous(), query, keys, ids, index, ctx.scale, ctx.backend
    )
    return grad_query, grad_keys, None, None, None, None, None, None


_retrieve_topk_op.register_autograd(_retrieve_backward, setup_context=_retrieve_setup)


# ---- topk_target_attention: pooled differentiable ----------------------------------------


@torch.library.custom_op("reclora::topk_target_attention", mutates_args=())
def _topk_attention_op(
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    ids: Optional[Tensor],
    lengths: Optional[Tensor],
    mask: Optional[Tensor],
    k: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    pooled, index, probs = _kernels(backend).topk_attention_forward(
        query.contiguous(),
        keys.contiguous(),
        values.contiguous(),
        ids if ids is None else ids.contiguous(),
        lengths,
        mask,
        k,
        scale,
    )
    return pooled, index, probs


def _attention_like(query, values, k):
    scores, index = _topk_like(query, k)
    return query.new_empty(query.shape[0], values.shape[-1], dtype=values.dtype), index, scores


@_topk_attention_op.register_fake
def _(query, keys, values, ids, lengths, mask, k, scale, backend):
    return _attention_like(query, values, k)


@torch.library.custom_op("reclora::topk_target_attention_grad", mutates_args=())
def _topk_attention_grad_op(
    grad_pooled: Tensor,
    query: Tensor,
    keys: Tensor,
    values: Tensor,
    ids: Optional[Tensor],
    index: Tensor,
    probs: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _kernels(backend).topk_attention_backward(
        grad_pooled,
        query.contiguous(),
        keys.contiguous(),
        values.contiguous(),
        ids if ids is None else ids.contiguous(),
        index,
        probs,
        scale,
    )
    return tuple(grads)


@_topk_attention_grad_op.register_fake
def _(grad_pooled, query, keys, values, ids, index, probs, scale, backend):
    return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)


def _attention_setup(ctx, inputs, output):
    query, keys, values, ids, lengths, mask, k, scale, backend = inputs
    _, index, probs = output
    ctx.mark_non_differentiable(index, probs)
    ctx.save_for_backward(query, keys, values, ids, index, probs)
    ctx.scale, ctx.backend = scale, backend


def _attention_backward(ctx, grad_pooled, grad_index, grad_probs):
    query, keys, values, ids, index, probs = ctx.saved_tensors
    grad_query, grad_keys, grad_values = _topk_attention_grad_op(
        grad_pooled.contiguous(), query, keys, values, ids, index, probs, ctx.scale, ctx.backend
    )
    return grad_query, grad_keys, grad_values, None, None, None, None, None, None


_topk_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _register_native_fakes():
    @torch.library.register_fake("reclora::retrieve_topk_forward")
    def _(query, keys, ids, lengths, mask, k, scale):
        return _topk_like(query, k)

    @torch.library.register_fake("reclora::retrieve_topk_backward")
    def _(grad_scores, query, keys, ids, index, scale):
        return torch.empty_like(query), torch.empty_like(keys)

    @torch.library.register_fake("reclora::topk_attention_forward")
    def _(query, keys, values, ids, lengths, mask, k, scale):
        return _attention_like(query, values, k)

    @torch.library.register_fake("reclora::topk_attention_backward")
    def _(grad_pooled, query, keys, values, ids, index, probs, scale):
        return torch.empty_like(query), torch.empty_like(keys), torch.empty_like(values)


if _native.is_loaded():
    _register_native_fakes()
