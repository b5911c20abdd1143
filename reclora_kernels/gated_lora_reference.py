"""Pure-PyTorch personalized LoRA: the ground truth every kernel is tested against.

Runs on any device and float dtype; gradients come from autograd. Shapes use the
normalized token layout of the kernels:
  x: (M, d_in) tokens; gate: (B, K); lora_a: (K, r, d_in); lora_b: (K, d_out, r);
  sample_ids: (M,) int64, the row of gate that owns each token.

The notation of every backend (csrc/gated_lora_*.cpp/.cu and gated_lora_triton.py say only what
they do differently). Token m belongs to sample b(m); g = gate[b(m)], s = scaling, G = grad_out,
R = K r. The meta-LoRAs concatenated: A_cat = lora_a as (R, d_in), B_cat^T = lora_b as (R, d_out).
  U = x A_cat^T (M, R): A_k x_m for every k.      H = G B_cat (M, R): B_k^T G_m for every k.
  weight mix (A_p = sum_k g_k A_k, B_p = sum_k g_k B_k):
    u_m = sum_k g_k U_mk = A_p x_m,   h_m = s sum_k g_k H_mk = s B_p^T G_m,
    V_mk = s g_k u_m,                 Z_mk = g_k h_m,
    dgate[b, k] = sum over b's tokens of <h_m, U_mk> + s <u_m, H_mk>   (g_k is in A_p and in B_p)
  output mix:
    V_mk = s g_k U_mk,                Z_mk = s g_k H_mk,
    dgate[b, k] = sum over b's tokens of s <U_mk, H_mk>
  delta = V B_cat^T    dx = Z A_cat    dA_cat = Z^T x    dB_cat^T = V^T G
Nothing per token is wider than R, and no per-sample (r, d) matrix is needed (the CPU backend
forms A_p, B_p once per sample instead: its header says why).
"""

import torch


def sample_ids_for(num_tokens: int, num_samples: int, sample_index, device) -> torch.Tensor:
    """Each token's sample: sample_index itself, or contiguous groups of M // B tokens."""
    if sample_index is not None:
        return sample_index
    per_sample = num_tokens // max(num_samples, 1)
    return torch.arange(num_samples, device=device).repeat_interleave(per_sample)


def gated_lora_reference(x, gate, lora_a, lora_b, sample_ids, scaling: float, output_mix: bool):
    """Returns delta: (M, d_out).

    weight mix: delta_m = s * B_p A_p x_m with A_p = sum_k g_k A_k, B_p = sum_k g_k B_k;
    output mix: delta_m = s * sum_k g_k B_k A_k x_m; g = gate[sample_ids[m]].
    Both are written with the meta-LoRAs concatenated (A_cat: (K r, d_in)) so that
    nothing per token of size r * d is formed; test_gated_lora checks this against the
    literal per-sample matrices.
    """
    num_loras, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    g = gate.to(x.dtype)[sample_ids]  # (M, K)
    a_cat = lora_a.reshape(num_loras * rank, d_in)
    b_cat = lora_b.permute(1, 0, 2).reshape(d_out, num_loras * rank)
    u = (x @ a_cat.t()).view(-1, num_loras, rank)  # A_k x_m for every k
    if output_mix:
        v = g[:, :, None] * u
    else:
        u_mixed = (g[:, :, None] * u).sum(1)  # A_p x_m
        v = g[:, :, None] * u_mixed[:, None, :]  # B_p u = sum_k g_k B_k u
    return scaling * (v.reshape(-1, num_loras * rank) @ b_cat.t())
