"""What users run today, written as faithfully as we can: the baselines every benchmark compares to."""

import torch
import torch.nn.functional as F

from reclora_kernels.gated_lora_reference import gated_lora_reference, sample_ids_for
from reclora_kernels.retrieval_reference import valid_positions


def published_gated_lora(x, gate, lora_a, lora_b, scaling):
    """The RecLoRA code's way: per-sample A_p, B_p materialized by einsum over the gate, then bmm.

    x: (B, T, d_in). Weight mixing only (what the code does).
    """
    a_p = torch.einsum("bk,krd->brd", gate, lora_a)
    b_p = torch.einsum("bk,kor->bor", gate, lora_b)
    return torch.bmm(torch.bmm(x, a_p.transpose(1, 2)), b_p.transpose(1, 2)) * scaling


def composed_gated_lora(x, gate, lora_a, lora_b, scaling, output_mix=False):
    """The best unfused PyTorch composition: x A_cat^T, gate per block, times B_cat^T."""
    batch, tokens, d_in = x.shape
    ids = sample_ids_for(batch * tokens, batch, None, x.device)
    out = gated_lora_reference(x.reshape(-1, d_in), gate, lora_a, lora_b, ids, scaling, output_mix)
    return out.view(batch, tokens, -1)


def base_linear(x, weight):
    return F.linear(x, weight)


def composed_topk_attention(query, table, ids, lengths, k, scale):
    """FuxiCTR / SIM style: gather (B, L, d), score, torch.topk, gather, softmax, weighted sum."""
    keys = table[ids]
    scores = scale * torch.einsum("bd,bld->bl", query, keys)
    valid = valid_positions(ids.shape[0], ids.shape[1], lengths, None, query.device)
    scores = scores.masked_fill(~valid, float("-inf"))
    top, index = scores.topk(min(k, ids.shape[1]), dim=1)
    picked = torch.gather(keys, 1, index[:, :, None].expand(-1, -1, keys.shape[-1]))
    probs = torch.softmax(top.float(), dim=1).nan_to_num(0.0).to(keys.dtype)
    return (probs[:, :, None] * picked).sum(1), index
