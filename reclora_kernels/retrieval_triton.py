"""Triton kernels of the top-k retrieval ops (semantics: csrc/registration.cpp; ground truth:
retrieval_reference.py).

Forward, grid (B, C): each program scores one chunk of a row's L positions tile by tile
(table rows gathered through ids while scoring, never forming (B, L, d)) and keeps the
chunk's top K_PAD in registers; a second kernel merges the C chunk lists of a row and
writes scores and index, or the softmax probs and the pooled values. With one chunk per
row the first kernel writes the outputs itself.
Ordering: each candidate is one 64-bit key, the float32 score mapped to an order-preserving
unsigned 32-bit word in the high half and 0xFFFFFFFF - position in the low half, so the
unsigned maximum is the higher score and, on ties, the smaller position; key 0 is "no item".
Top-k lists are merged with bitonic networks: tl.topk on a tile, then max(list_ascending,
tile_descending) is the bitonic top half of both, sorted by one bitonic merge.
Backward, grid (B,): one program per row over its k selected slots; gradients of dense
keys/values are stored directly (a row's positions are distinct), table rows accumulate
with float32 atomics or, under torch.use_deterministic_algorithms, through per-slot
contributions reduced by torch's deterministic index_add_.
"""

import torch
import triton
import triton.language as tl

from reclora_kernels._checks import KERNEL_DTYPES
from reclora_kernels._triton_support import interpreter_enabled, on_device
from reclora_kernels._triton_support import num_sms as _num_sms  # a module attribute: check_gpu_compile sets it

_INTERPRET = interpreter_enabled()  # decided at import, as triton.jit decides between compiling and interpreting
# Positions live in the low 32 bits of a key; int32 position arithmetic keeps headroom below 2**31.
_MAX_LENGTH = 2**30

# ---- kernels --------------------------------------------------------------------------


@triton.jit
def _pack(score, pos):
    # -0.0 and +0.0 must tie like in the reference's sort
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
    return (ordered.to(tl.uint64) << 32) | (4294967295 - pos.to(tl.int64)).to(tl.uint64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
    bits = tl.where(ordered < 0, ordered ^ -2147483648, ~ordered)
    pos = 4294967295 - key.to(tl.uint32).to(tl.int64)
    return bits.to(tl.float32, bitcast=True), pos


@triton.jit
def _merge_top(top, cand):
    """top: ascending, cand: descending, same size -> the largest of both, ascending."""
    return tl.bitonic_merge(tl.maximum(top, cand))


@triton.jit
def _rows(ids, b, pos, found, L):
    """Row of each position in keys/values: table row through ids, or b * L + pos."""
    if ids is not None:
        return tl.load(ids + b * L + pos, mask=found, other=0)
    return b * L + pos


@triton.jit
def _finish(
    top,
    b,
    k,
    L,
    Dv,
    ids,
    values,
    scores,
    index,
    probs,
    pooled,
    K_PAD: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Writes row b's outputs from its ascending top list; values None: retrieval."""
    slot = K_PAD - 1 - tl.arange(0, K_PAD)
    keep = slot < k
    score, pos = _unpack(top)
    # K_PAD may exceed k: the extra slots are neither written nor part of the softmax
    found = (top != 0) & keep
    tl.store(index + b * k + slot, tl.where(found, pos, -1), mask=keep)
    if values is None:
        tl.store(scores + b * k + slot, tl.where(found, score, float("-inf")), mask=keep)
    else:
        score = tl.where(found, score, float("-inf"))
        top_score = tl.max(score)
        # rows without items: e = 0 everywhere and p = 0, with no inf - inf or 0 / 0
        e = tl.exp(score - tl.where(top_score > float("-inf"), top_score, 0.0))
        total = tl.sum(e)
        p = e / tl.where(total > 0.0, total, 1.0)
        tl.store(probs + b * k + slot, p, mask=keep)
        rows = _rows(ids, b, pos, found, L)
        for d0 in range(0, Dv, BLOCK_DV):
            cols = d0 + tl.arange(0, BLOCK_DV)
            v = tl.load(
                values + rows[:, None] * Dv + cols[None, :], mask=found[:, None] & (cols < Dv)[None, :], other=0.0
            )
            out = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            tl.store(pooled + b * Dv + cols, out.to(pooled.dtype.element_ty), mask=cols < Dv)


@triton.jit
def _chunk_topk_kernel(
    query,
    keys,
    ids,
    lengths,
    mask,
    values,
    cand,
    scores,
    index,
    probs,
    pooled,
    L,
    D,
    Dv,
    k,
    CHUNK,
    scale,
    FINAL: tl.constexpr,
    K_PAD: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_UNROLL: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    start = c * CHUNK
    stop = tl.minimum(start + CHUNK, L)
    if lengths is not None:
        stop = tl.minimum(stop, tl.load(lengths + b).to(tl.int32))
    top = tl.zeros([K_PAD], dtype=tl.uint64)
    for t in range(start, stop, TILE):
        pos = t + tl.arange(0, TILE)
        ok = pos < stop
        if mask is not None:
            ok &= tl.load(mask + b * L + pos, mask=ok, other=0, eviction_policy="evict_first") != 0
        rows = _rows(ids, b, pos, ok, L)
        dot = tl.zeros([TILE], dtype=tl.float32)
        # BLOCK_D spans 16 bytes, so a row's dot product stays inside one thread; a wider
        # tile would spread rows over lanes and the top-k network would run replicated.
        for d0 in range(0, D, BLOCK_D * D_UNROLL):
            for u in tl.static_range(D_UNROLL):
                cols = d0 + u * BLOCK_D + tl.arange(0, BLOCK_D)
                q = tl.load(query + b * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                kt = tl.load(
                    keys + rows[:, None] * D + cols[None, :],
                    mask=ok[:, None] & (cols < D)[None, :],
                    other=0.0,
                    eviction_policy="evict_first",
                )
                dot += tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
        key = tl.where(ok, _pack(scale * dot, pos), 0)
        top = _merge_top(top, tl.topk(key, K_PAD))
    if FINAL:
        _finish(top, b, k, L, Dv, ids, values, scores, index, probs, pooled, K_PAD, BLOCK_DV)
    else:
        slot = tl.arange(0, K_PAD)
        tl.store(cand + (b * tl.num_programs(1) + c) * K_PAD + slot, top.to(tl.int64, bitcast=True))


@triton.jit
def _merge_chunks_kernel(
    cand,
    ids,
    values,
    scores,
    index,
    probs,
    pooled,
    L,
    Dv,
    k,
    C,
    K_PAD: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # the chunk lists are ascending: read backwards, each is the descending side of a merge
    slot = K_PAD - 1 - tl.arange(0, K_PAD)
    top = tl.zeros([K_PAD], dtype=tl.uint64)
    for c in range(0, C):
        chunk_top = tl.load(cand + (b * C + c) * K_PAD + slot).to(tl.uint64, bitcast=True)
        top = _merge_top(top, chunk_top)
    _finish(top, b, k, L, Dv, ids, values, scores, index, probs, pooled, K_PAD, BLOCK_DV)


# SCATTER modes of the backward kernel
_STORE, _ATOMIC, _PER_SLOT = 0, 1, 2


@triton.jit
def _scatter_rows(dst, rows, slots, found, cols, width, contrib, SCATTER: tl.constexpr):
    """Adds contrib[j] to row rows[j] of a gradient, or writes it to per-slot row slots[j]."""
    cmask = (cols < width)[None, :]
    if SCATTER == 0:
        ptrs = dst + rows[:, None] * width + cols[None, :]
        tl.store(ptrs, contrib.to(dst.dtype.element_ty), mask=found[:, None] & cmask)
    elif SCATTER == 1:
        ptrs = dst + rows[:, None] * width + cols[None, :]
        tl.atomic_add(ptrs, contrib, mask=found[:, None] & cmask, sem="relaxed")
    else:
        # every slot is written: missing ones add zeros to row 0 in the index_add_
        ptrs = dst + slots[:, None] * width + cols[None, :]
        tl.store(ptrs, tl.where(found[:, None], contrib, 0.0), mask=cmask & (slots >= 0)[:, None])


@triton.jit
def _backward_kernel(
    grad_scores,
    grad_pooled,
    probs,
    query,
    keys,
    values,
    ids,
    index,
    grad_query,
    grad_keys,
    grad_values,
    slot_rows,
    L,
    D,
    Dv,
    k,
    scale,
    SCATTER: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, K_PAD)
    in_k = j < k
    pos = tl.load(index + b * k + j, mask=in_k, other=-1)
    found = pos >= 0
    rows = _rows(ids, b, pos, found, L)
    slots = tl.where(in_k, b * k + j, -1)
    if SCATTER == 2:
        tl.store(slot_rows + b * k + j, tl.where(found, rows, 0), mask=in_k)
    if values is None:
        ds = tl.load(grad_scores + b * k + j, mask=found, other=0.0)
    else:
        p = tl.load(probs + b * k + j, mask=found, other=0.0)
        dp = tl.zeros([K_PAD], dtype=tl.float32)
        for d0 in range(0, Dv, BLOCK_DV):
            cols = d0 + tl.arange(0, BLOCK_DV)
            g = tl.load(grad_pooled + b * Dv + cols, mask=cols < Dv, other=0.0).to(tl.float32)
            v = tl.load(
                values + rows[:, None] * Dv + cols[None, :], mask=found[:, None] & (cols < Dv)[None, :], other=0.0
            )
            dp += tl.sum(v.to(tl.float32) * g[None, :], axis=1)
            _scatter_rows(grad_values, rows, slots, found, cols, Dv, p[:, None] * g[None, :], SCATTER)
        ds = p * (dp - tl.sum(p * dp))
    ds *= scale
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(query + b * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        kt = tl.load(keys + rows[:, None] * D + cols[None, :], mask=found[:, None] & (cols < D)[None, :], other=0.0)
        gq = tl.sum(ds[:, None] * kt.to(tl.float32), axis=0)
        tl.store(grad_query + b * D + cols, gq.to(grad_query.dtype.element_ty), mask=cols < D)
        _scatter_rows(grad_keys, rows, slots, found, cols, D, ds[:, None] * q[None, :], SCATTER)


# Tiles of positions per step of a chunk (>= K_PAD), tuned on the GPU; CHUNK is a multiple
# of every tile. The interpreter runs one tile size (see _chunking).
# (256, 8) and (512, 8) spilled registers (make check-gpu-compile), as did 256 positions of fp32
# queries on sm_80, which the pruner leaves out.
_TILE_CONFIGS = ((128, 4), (256, 4))  # (TILE, num_warps)


def _tile_configs(configs, named_args, **kwargs):
    """tl.topk needs tiles of at least K_PAD positions; fp32 keeps the 128-position tile."""
    seen, out = set(), []
    wide = named_args["query"].dtype != torch.float32
    for config in configs:
        if config.kwargs["TILE"] > 128 and not wide:
            continue
        tile = max(config.kwargs["TILE"], kwargs["K_PAD"])
        if (tile, config.num_warps) not in seen:
            seen.add((tile, config.num_warps))
            out.append(triton.Config({"TILE": tile}, num_warps=config.num_warps, num_stages=config.num_stages))
    return out


if not _INTERPRET:
    _chunk_topk_kernel = triton.autotune(
        configs=[triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in _TILE_CONFIGS],
        key=["D", "Dv", "K_PAD", "FINAL"],
        prune_configs_by={"early_config_prune": _tile_configs},
    )(_chunk_topk_kernel)


# ---- host side ------------------------------------------------------------------------


def _pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _block(width, rows):
    """Columns per step so that a [rows, columns] tile stays near 16K elements."""
    return min(_pow2(width), max(16, 16384 // rows))


def _chunking(batch, length, k_pad, device):
    """(chunk length, tile or None when autotuned): enough programs to fill the GPU, long
    enough chunks that the merge stays small."""
    if _INTERPRET:
        # small tiles and at least two chunks on short rows, so that small shapes exercise
        # the tile loop and the merge; at most 8 chunks of larger tiles on long rows
        tile = max(k_pad, min(1024, max(16, _pow2(length) // 64)))
        return max(2 * tile, triton.cdiv(triton.cdiv(length, 8), tile) * tile), tile
    step = max(max(tile for tile, _ in _TILE_CONFIGS), k_pad)
    target = 16 * _num_sms(device)
    chunks = max(1, min(triton.cdiv(target, max(batch, 1)), triton.cdiv(length, 4 * step)))
    return triton.cdiv(triton.cdiv(length, chunks), step) * step, None


def _fail(message):
    raise ValueError(f"reclora retrieval (triton): {message}")


def _check_common(query, keys, values, ids):
    """Returns (B, L, d): the contract the Python layer guarantees, checked cheaply."""
    if query.dim() != 2 or query.dtype not in KERNEL_DTYPES:
        _fail(f"query must be (B, d) float32/float16/bfloat16, got {tuple(query.shape)} {query.dtype}")
    batch, dim = query.shape
    tensors = [("query", query), ("keys", keys), ("values", values), ("ids", ids)]
    for name, t in tensors:
        if t is not None and (t.device != query.device or not t.is_contiguous()):
            _fail(f"{name} must be contiguous and on {query.device}")
    for name, t in (("keys", keys), ("values", values)):
        if t is not None and t.dtype != query.dtype:
            _fail(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
    if ids is None:
        if keys.dim() != 3 or keys.shape[0] != batch or keys.shape[2] != dim:
            _fail(f"dense keys must be (B, L, d) = ({batch}, L, {dim}), got {tuple(keys.shape)}")
        length = keys.shape[1]
        if values is not None and (values.dim() != 3 or tuple(values.shape[:2]) != (batch, length)):
            _fail(f"dense values must be (B, L, d_v) = ({batch}, {length}, d_v), got {tuple(values.shape)}")
    else:
        if ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[0] != batch:
            _fail(f"ids must be (B, L) int64 with B = {batch}, got {tuple(ids.shape)} {ids.dtype}")
        if keys.dim() != 2 or keys.shape[1] != dim:
            _fail(f"table keys must be (N, d) with d = {dim}, got {tuple(keys.shape)}")
        if values is not None and values.dim() != 2:
            _fail(f"table values must be (N_v, d_v), got {tuple(values.shape)}")
        length = ids.shape[1]
    if length > _MAX_LENGTH:
        _fail(f"L = {length} exceeds {_MAX_LENGTH}")
    return batch, length, dim


def _check_slots(name, t, batch, k, dtype, device):
    if t.dtype != dtype or t.shape != (batch, k) or t.device != device or not t.is_contiguous():
        _fail(f"{name} must be a contiguous ({batch}, {k}) {dtype} tensor on {device}, got {tuple(t.shape)} {t.dtype}")


def _forward(query, keys, values, ids, lengths, mask, k, scale):
    """(scores or None, index, probs or None, pooled or None); values None: retrieval."""
    batch, length, dim = _check_common(query, keys, values, ids)
    device = query.device
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        _fail(f"k must be an int >= 1, got {k!r}")
    if lengths is not None and (lengths.dtype != torch.int64 or lengths.shape != (batch,) or lengths.device != device):
        _fail(f"lengths must be ({batch},) int64 on {device}, got {tuple(lengths.shape)} {lengths.dtype}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch, length) or mask.device != device):
        _fail(f"mask must be ({batch}, {length}) bool on {device}, got {tuple(mask.shape)} {mask.dtype}")
    attention = values is not None
    k_pad = max(2, _pow2(min(k, length)))
    # the kernels write K_PAD slots: the rest (k > L) and empty problems keep these fills
    prefill = k > k_pad or length == 0

    def slots(fill, dtype):
        shape = (batch, k)
        if prefill:
            return torch.full(shape, fill, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    index = slots(-1, torch.int64)
    scores = probs = pooled = None
    dim_v = values.shape[-1] if attention else 0
    if attention:
        probs = slots(0.0, torch.float32)
        pooled = (torch.zeros if length == 0 else torch.empty)((batch, dim_v), dtype=values.dtype, device=device)
    else:
        scores = slots(float("-inf"), torch.float32)
    if batch == 0 or length == 0:
        return scores, index, probs, pooled
    chunk, tile = _chunking(batch, length, k_pad, device)
    chunks = triton.cdiv(length, chunk)
    final = chunks == 1
    cand = None if final else torch.empty((batch, chunks, k_pad), dtype=torch.int64, device=device)
    # 16-byte column steps on the GPU (see the kernel); the interpreter pays per op, not per lane
    block_d = min(_pow2(dim), 64) if _INTERPRET else 16 // query.element_size()
    d_unroll = max(1, min(triton.cdiv(dim, block_d), 16))
    block_dv = _block(dim_v, k_pad)
    tuned = {} if tile is None else {"TILE": tile, "num_warps": 4}
    with on_device(query):
        _chunk_topk_kernel[(batch, chunks)](
            query, keys, ids, lengths, None if mask is None else mask.view(torch.uint8), values,
            cand, scores, index, probs, pooled,
            length, dim, dim_v, k, chunk, float(scale),
            FINAL=final, K_PAD=k_pad, BLOCK_D=block_d, D_UNROLL=d_unroll, BLOCK_DV=block_dv,
            **tuned,
        )  # fmt: skip
        if not final:
            _merge_chunks_kernel[(batch,)](
                cand, ids, values, scores, index, probs, pooled, length, dim_v, k, chunks,
                K_PAD=k_pad, BLOCK_DV=block_dv, num_warps=4,
            )  # fmt: skip
    return scores, index, probs, pooled


def _gradient_buffer(table, batch, k, mode):
    """Where the kernel writes a keys/values gradient for the given scatter mode."""
    if mode == _STORE or (mode == _ATOMIC and table.dtype == torch.float32):
        return torch.zeros_like(table)
    if mode == _ATOMIC:
        return torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    return torch.empty((batch, k, table.shape[-1]), dtype=torch.float32, device=table.device)


def _gradient(table, buffer, slot_rows, mode):
    if mode == _PER_SLOT:
        accumulated = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
        buffer = accumulated.index_add_(0, slot_rows.view(-1), buffer.view(-1, table.shape[-1]))
    return buffer.to(table.dtype)


def _backward(grad_scores, grad_pooled, probs, query, keys, values, ids, index, scale):
    batch, length, dim = _check_common(query, keys, values, ids)
    device = query.device
    if index.dim() != 2:
        _fail(f"index must be (B, k), got {tuple(index.shape)}")
    k = index.shape[1]
    _check_slots("index", index, batch, k, torch.int64, device)
    if values is None:
        _check_slots("grad_scores", grad_scores, batch, k, torch.float32, device)
        dim_v = 0
    else:
        _check_slots("probs", probs, batch, k, torch.float32, device)
        dim_v = values.shape[-1]
        if grad_pooled.shape != (batch, dim_v) or grad_pooled.device != device or not grad_pooled.is_contiguous():
            _fail(f"grad_pooled must be contiguous ({batch}, {dim_v}) on {device}, got {tuple(grad_pooled.shape)}")
    if ids is None:
        mode = _STORE
    else:
        mode = _PER_SLOT if torch.are_deterministic_algorithms_enabled() else _ATOMIC
    grad_query = torch.empty_like(query)
    grad_keys = _gradient_buffer(keys, batch, k, mode)
    grad_values = None if values is None else _gradient_buffer(values, batch, k, mode)
    # table row of each slot for the index_add_ (0 for missing slots, whose contributions are 0)
    slot_rows = torch.empty((batch, k), dtype=torch.int64, device=device) if mode == _PER_SLOT else None
    if batch > 0:
        k_pad = max(2, _pow2(k))
        block_d, block_dv = _block(dim, k_pad), _block(dim_v, k_pad)
        with on_device(query):
            _backward_kernel[(batch,)](
                grad_scores, grad_pooled, probs, query, keys, values, ids, index,
                grad_query, grad_keys, grad_values, slot_rows, length, dim, dim_v, k, float(scale),
                SCATTER=mode, K_PAD=k_pad, BLOCK_D=block_d, BLOCK_DV=block_dv,
                num_warps=4 if k_pad * max(block_d, block_dv) <= 4096 else 8,
            )  # fmt: skip
    grad_keys = _gradient(keys, grad_keys, slot_rows, mode)
    if values is None:
        return grad_query, grad_keys
    return grad_query, grad_keys, _gradient(values, grad_values, slot_rows, mode)


# ---- entry points (reclora_kernels/retrieval.py calls these) ---------------------------


def retrieve_topk_forward(query, keys, ids, lengths, mask, k, scale):
    """-> scores (B, k) float32 sorted descending, index (B, k) int64 (missing: -inf, -1)."""
    scores, index, _, _ = _forward(query, keys, None, ids, lengths, mask, k, scale)
    return scores, index


def retrieve_topk_backward(grad_scores, query, keys, ids, index, scale):
    """-> grad_query (B, d), grad_keys (keys' shape and dtype; unselected rows zero)."""
    return _backward(grad_scores, None, None, query, keys, None, ids, index, scale)


def topk_attention_forward(query, keys, values, ids, lengths, mask, k, scale):
    """-> pooled (B, d_v) in values' dtype, index (B, k) int64, probs (B, k) float32."""
    _, index, probs, pooled = _forward(query, keys, values, ids, lengths, mask, k, scale)
    return pooled, index, probs


def topk_attention_backward(grad_pooled, query, keys, values, ids, index, probs, scale):
    """-> grad_query, grad_keys, grad_values (each its input's shape and dtype)."""
    return _backward(None, grad_pooled, probs, query, keys, values, ids, index, scale)
