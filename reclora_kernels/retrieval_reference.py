"""Pure-PyTorch top-k retrieval and top-k target attention: the ground truth for the kernels.

This is also the composition that open implementations use (gather (B, L, d), score,
topk, gather, softmax, sum): it materializes the gathered keys, which the kernels avoid.
  query: (B, d); keys: (B, L, d) dense, or a table (N, d) with ids: (B, L) int64;
  lengths: (B,) int64 valid prefix; mask: (B, L) bool.
"""

import torch


def valid_positions(batch: int, length: int, lengths, mask, device) -> torch.Tensor:
    """(B, L) bool: inside the row's valid prefix and not masked out."""
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    if lengths is not None:
        valid &= torch.arange(length, device=device)[None, :] < lengths[:, None]
    if mask is not None:
        valid &= mask
    return valid


def gather_rows(table_or_dense, ids, valid):
    """(B, L, d) rows: the dense tensor itself, or the table rows named by ids.

    Invalid positions may hold any id (padding): they read row 0 (zeros from an empty table) and
    are never selected.
    """
    if ids is None:
        return table_or_dense
    if table_or_dense.shape[0] == 0:  # every position is invalid (checked by the caller)
        return table_or_dense.new_zeros(*ids.shape, table_or_dense.shape[-1])
    return table_or_dense[ids.masked_fill(~valid, 0)]


def score_dtype(dtype):
    """Scores and softmax run in float32 (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def retrieve_topk_reference(query, keys, k: int, ids=None, lengths=None, mask=None, scale: float = 1.0):
    """Returns scores (B, k) sorted descending and index (B, k) int64 positions on L.

    Ties go to the smaller position; missing slots (fewer than k valid items) hold
    score -inf and index -1.
    """
    batch = query.shape[0]
    length = keys.shape[1] if ids is None else ids.shape[1]
    valid = valid_positions(batch, length, lengths, mask, query.device)
    dense_keys = gather_rows(keys, ids, valid)
    scores = scale * torch.einsum("bd,bld->bl", query, dense_keys).to(score_dtype(query.dtype))
    ranked = scores.detach().masked_fill(~valid, float("-inf"))
    # A stable descending sort keeps equal scores in position order: the tie rule. A second stable
    # sort puts valid positions first, even those scoring -inf, as the kernels do.
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    invalid_first = (~torch.gather(valid, 1, order)).to(torch.uint8)
    order = torch.gather(order, 1, torch.sort(invalid_first, dim=1, stable=True).indices)[:, : min(k, length)]
    selected_valid = torch.gather(valid, 1, order)
    top_scores = torch.gather(scores, 1, order).masked_fill(~selected_valid, float("-inf"))
    index = order.masked_fill(~selected_valid, -1)
    missing = k - order.shape[1]
    if missing > 0:
        top_scores = torch.cat([top_scores, top_scores.new_full((batch, missing), float("-inf"))], 1)
        index = torch.cat([index, index.new_full((batch, missing), -1)], 1)
    return top_scores, index


def topk_target_attention_reference(query, keys, k: int, values=None, ids=None, lengths=None, mask=None, scale=None):
    """Returns pooled (B, d_v) in values' dtype and index (B, k).

    Softmax over the top-k scores (scale defaults to 1/sqrt(d)); rows with no valid item
    pool to zeros with zero gradients.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    values = keys if values is None else values
    top_scores, index = retrieve_topk_reference(query, keys, k, ids, lengths, mask, scale)
    selected = index >= 0
    any_valid = selected.any(1, keepdim=True)
    # Empty rows softmax over zeros, then are masked: no NaN in the forward or the backward.
    safe_scores = torch.where(any_valid, top_scores, torch.zeros_like(top_scores))
    probs = torch.softmax(safe_scores, dim=1) * selected
    length = values.shape[1] if ids is None else ids.shape[1]
    dense_values = gather_rows(values, ids, valid_positions(query.shape[0], length, lengths, mask, query.device))
    if dense_values.shape[1] == 0:  # nothing to pick: zeros, still a function of every input (zero gradients)
        nothing = dense_values.new_zeros(k, dense_values.shape[-1])
        return probs.to(values.dtype) @ nothing + dense_values.sum(1), index
    picked = torch.gather(dense_values, 1, index.clamp(min=0)[:, :, None].expand(-1, -1, dense_values.shape[-1]))
    pooled = (probs.to(values.dtype)[:, :, None] * picked).sum(1)
    return pooled, index
