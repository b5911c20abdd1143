"""Triton kernels of the personalized LoRA (called by gated_lora.py; semantics in csrc/registration.cpp).

The algebra and its notation (U, H, V, Z over the concatenated meta-LoRAs) are in
gated_lora_reference.py. Here: U is kept in float32, and the forward returns it for the backward
(which then runs one GEMM fewer); the products are one GEMM kernel with a
second accumulated product and bias in its epilogue (y = x W^T + bias + V B_cat^T,
dx = G W + Z A_cat), a row-wise mixing kernel (V, Z from U, H) and a per-sample segment sum for
dgate. Rows of one tile may belong to different samples (packed, unsorted tokens) at no extra
cost, and every reduction is deterministic (no atomics).
"""

import functools

import torch
import triton
import triton.language as tl

from reclora_kernels._checks import KERNEL_DTYPES
from reclora_kernels._triton_support import interpreter_enabled, on_device
from reclora_kernels._triton_support import num_sms as _num_sms  # a module attribute: check_gpu_compile sets it

_INTERPRET = interpreter_enabled()  # decided at import, as triton.jit decides between compiling and interpreting


# ------------------------------------------------------------------------------------------------
# GEMM: C = A B + A2 B2 + bias, fp32 accumulation, any strides, optional split of A B's reduction
# ------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Wide-K tiles: 16-bit operands whose rows are
# 16-element aligned, pipelined through cp.async into Hopper wgmma (64 rows per warpgroup), up to
# 192 KB of operands in flight; the thin ones serve the K r wide products. Narrow-K tiles: fp32 (the
# exact ieee FMA dot) and unaligned rows, where every element has its own 64-bit address and wider
# tiles spill registers.
_TILES_WIDE_K = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 128, 128, 4, 3),
    (64, 32, 128, 4, 4),
]
# (64, 64, 32, 4, 3) spilled registers on sm_90 (make check-gpu-compile).
_TILES_NARROW_K = [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (32, 64, 32, 4, 3)]
_STRIDE_NAMES = (
    "stride_am",
    "stride_ak",
    "stride_bk",
    "stride_bn",
    "stride_a2m",
    "stride_a2k",
    "stride_b2k",
    "stride_b2n",
)


def _matmul_configs():
    if _INTERPRET:  # one tile: the interpreter's cost is per program and per statement
        tiles = [(64, 64, 64, 4, 1)]
    else:
        tiles = _TILES_WIDE_K + _TILES_NARROW_K
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in tiles
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keeps the tile family of the operands (narrow-K ones have BLOCK_K 32) whose pipeline fits the
    device's shared memory (the 192 KB tile only fits Hopper's 227 KB, not Ampere's 163 KB), without
    tiles much larger than the problem."""
    aligned = all(named_args[name] in (0, 1) or named_args[name] % 16 == 0 for name in _STRIDE_NAMES)
    a = named_args["a_ptr"]
    narrow = a.dtype == torch.float32 or not aligned
    limit = _shared_bytes_per_block(a.device)
    own = [
        c for c in configs if (c.kwargs["BLOCK_K"] == 32) == narrow and _pipeline_bytes(c, a.element_size()) <= limit
    ]
    m_cap = max(32, triton.next_power_of_2(named_args["M"]))
    n_cap = max(32, triton.next_power_of_2(named_args["N"]))
    sized = [c for c in own if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
    return sized or [min(own, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _pipeline_bytes(config, element_size):
    """Shared memory of the GEMM's software pipeline: num_stages tiles of A and B in flight."""
    k = config.kwargs
    return config.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * element_size


@functools.cache
def _shared_bytes_per_block(device):
    if device.type != "cuda":
        return 1 << 30  # interpreted CPU runs have one small tile
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@triton.jit
def _accumulate(
    acc,
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    k_lo,
    k_hi,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += A[offs_m, k_lo:k_hi] @ B[k_lo:k_hi, offs_n] (offs_m / offs_n already wrapped in range)."""
    offs_k = tl.arange(0, BLOCK_K)
    first_k = (k_lo + offs_k).to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + first_k[None, :] * stride_ak
    b_ptrs = b_ptr + first_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k in range(k_lo, k_hi, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_hi - k, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_hi - k, other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 as raw integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(
    configs=_matmul_configs(),
    key=["M_KEY", "N", "K1", "K2", "k_split", *_STRIDE_NAMES],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    a2_ptr,
    b2_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K1,
    K2,
    k_split,
    M_KEY,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_a2m,
    stride_a2k,
    stride_b2k,
    stride_b2n,
    stride_cs,
    stride_cm,
    stride_cn,
    HAS_SEG2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each column panel of B while it is in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    # Rows and columns past the edge wrap around, so only the reduction dimension needs masks
    # (the wrapped results are never stored); `% M` keeps the contiguity Triton can prove when M is
    # a multiple of 16. int64: M * stride may pass 2^31.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (rows % M).to(tl.int64)
    offs_n = (cols % N).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * k_split
    acc = _accumulate(
        acc,
        a_ptr,
        b_ptr,
        offs_m,
        offs_n,
        k_lo,
        min(K1, k_lo + k_split),
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        BLOCK_K,
        UPCAST,
        PRECISION,
    )
    # The second product and the bias belong to the first split only.
    if HAS_SEG2:
        acc = _accumulate(
            acc,
            a2_ptr,
            b2_ptr,
            offs_m,
            offs_n,
            0,
            tl.where(split == 0, K2, 0),
            stride_a2m,
            stride_a2k,
            stride_b2k,
            stride_b2n,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )
    if HAS_BIAS:  # noqa: SIM102 - a constexpr: this if is decided at compile time, split's at run time
        if split == 0:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]

    c_ptrs = (
        c_ptr
        + split.to(tl.int64) * stride_cs
        + rows.to(tl.int64)[:, None] * stride_cm
        + cols.to(tl.int64)[None, :] * stride_cn
    )
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _split_for(rows, cols, depth, device):
    """Splits a long reduction (over tokens) into partial sums when the output tiles fill under half
    the GPU (a small d with many tokens); otherwise the extra partial-sum pass costs more than it gains."""
    tiles = max(1, triton.cdiv(rows, 64) * triton.cdiv(cols, 64))
    if 2 * tiles >= _num_sms(device):
        return 1
    return max(1, min(triton.cdiv(_num_sms(device), tiles), depth // 1024, 16))


def _matmul(a, b, out, a2=None, b2=None, bias=None, split=1):
    """out = a @ b (+ a2 @ b2) (+ bias) for 2-D views of any strides; split > 1 sums `split` partial
    products over a @ b's reduction in a fixed order."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    if a.shape[1] == 0 and a2 is not None:  # empty d_in: the second product is all there is
        a, b, a2, b2 = a2, b2, None, None
    K1 = a.shape[1]
    if K1 == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    K2 = 0 if a2 is None else a2.shape[1]
    split = max(1, min(split, triton.cdiv(K1, 256)))
    # Splits cover multiples of 256 >= any BLOCK_K, so each split starts on a tile boundary.
    k_split = triton.cdiv(triton.cdiv(K1, split), 256) * 256 if split > 1 else K1
    split = triton.cdiv(K1, k_split)
    target = out if split == 1 else torch.empty((split, M, N), device=out.device, dtype=torch.float32)
    if split == 1:
        stride_cs, stride_cm, stride_cn = 0, out.stride(0), out.stride(1)
    else:
        stride_cs, stride_cm, stride_cn = target.stride()
    a2_strides = (0, 0) if a2 is None else a2.stride()
    b2_strides = (0, 0) if b2 is None else b2.stride()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)

    _matmul_kernel[grid](
        a,
        b,
        a2,
        b2,
        bias,
        target,
        M,
        N,
        K1,
        K2,
        k_split,
        min(triton.next_power_of_2(M), 8192),
        *a.stride(),
        *b.stride(),
        *a2_strides,
        *b2_strides,
        stride_cs,
        stride_cm,
        stride_cn,
        HAS_SEG2=a2 is not None,
        HAS_BIAS=bias is not None,
        UPCAST=_INTERPRET and a.dtype == torch.bfloat16,
        # fp32 is exact like torch's default fp32 matmul (no tf32); 16-bit operands ignore the setting.
        PRECISION="ieee" if a.dtype == torch.float32 or _INTERPRET else "tf32",
    )
    if split > 1:
        out.copy_(target.sum(0))
    return out


# ------------------------------------------------------------------------------------------------
# Per-token mixing over the K meta-LoRAs, and the per-sample sum of the gate gradient
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mix_kernel(
    u_ptr,
    h_ptr,
    gate_ptr,
    sample_ptr,
    v_ptr,
    z_ptr,
    c_ptr,
    M,
    num_samples,
    tokens_per_sample,
    K,
    R,
    stride_out,
    scaling,
    HAS_INDEX: tl.constexpr,
    OUTPUT_MIX: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """V = s mix(U); backward also Z = s mix(H) and the gate-gradient terms c (M, K) of each token."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < M
    if HAS_INDEX:
        ids = tl.load(sample_ptr + rows, mask=row_ok, other=0)
    else:
        ids = rows // tokens_per_sample
    # An out-of-range sample id (contract misuse) reads gate 0 instead of stray memory.
    row_ok = row_ok & (ids >= 0) & (ids < num_samples)
    rows = rows.to(tl.int64)
    kk = tl.arange(0, BLOCK_KP)
    jj = tl.arange(0, BLOCK_R)
    g = tl.load(
        gate_ptr + ids.to(tl.int64)[:, None] * K + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0
    )
    g3 = g[:, :, None]
    cols = (kk * R)[None, :, None] + jj[None, None, :]
    offs = rows[:, None, None] * (K * R) + cols
    out_offs = rows[:, None, None] * stride_out + cols
    mask = (rows < M)[:, None, None] & (kk < K)[None, :, None] & (jj < R)[None, None, :]

    u_all = tl.load(u_ptr + offs, mask=mask, other=0.0)
    if OUTPUT_MIX:
        v = g3 * u_all
    else:
        u = tl.sum(g3 * u_all, axis=1)
        v = g3 * u[:, None, :]
    tl.store(v_ptr + out_offs, (scaling * v).to(v_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        h_all = tl.load(h_ptr + offs, mask=mask, other=0.0)
        if OUTPUT_MIX:
            z = g3 * h_all
            c = tl.sum(u_all * h_all, axis=2)
        else:
            h = tl.sum(g3 * h_all, axis=1)
            z = g3 * h[:, None, :]
            c = tl.sum(u_all * h[:, None, :], axis=2) + tl.sum(h_all * u[:, None, :], axis=2)
        tl.store(z_ptr + out_offs, (scaling * z).to(z_ptr.dtype.element_ty), mask=mask)
        c_offs = rows[:, None] * K + kk[None, :]
        tl.store(c_ptr + c_offs, scaling * c, mask=(rows < M)[:, None] & (kk < K)[None, :])


@triton.jit
def _segment_sum_kernel(
    c_ptr,
    order_ptr,
    starts_ptr,
    out_ptr,
    tokens_per_sample,
    K,
    HAS_INDEX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_KP: tl.constexpr,
):
    """out[b] = sum of c over sample b's tokens, in token order (deterministic)."""
    b = tl.program_id(0)
    if HAS_INDEX:
        start = tl.load(starts_ptr + b)
        end = tl.load(starts_ptr + b + 1)
    else:
        start = b.to(tl.int64) * tokens_per_sample
        end = start + tokens_per_sample
    kk = tl.arange(0, BLOCK_KP)
    acc = tl.zeros((BLOCK_T, BLOCK_KP), dtype=tl.float32)
    for t in range(start, end, BLOCK_T):
        pos = t + tl.arange(0, BLOCK_T)
        ok = pos < end
        if HAS_INDEX:
            token = tl.load(order_ptr + pos, mask=ok, other=0)
        else:
            token = pos
        acc += tl.load(c_ptr + token[:, None] * K + kk[None, :], mask=ok[:, None] & (kk < K)[None, :], other=0.0)
    tl.store(out_ptr + b.to(tl.int64) * K + kk, tl.sum(acc, axis=0), mask=kk < K)


def _mix(u, h, gate, sample_index, rank, scaling, output_mix, dtype):
    """Returns V = s mix(U) and, given H, also Z = s mix(H) and the per-token gate terms c (M, K)."""
    M, width = u.shape
    num_samples, num_loras = gate.shape
    backward = h is not None
    # Rows padded to 16 elements: V and Z feed the GEMMs, whose fast tiles need aligned rows.
    padded = triton.cdiv(width, 16) * 16
    v = torch.empty((M, padded), device=u.device, dtype=dtype)[:, :width]
    z = torch.empty((M, padded), device=u.device, dtype=dtype)[:, :width] if backward else None
    c = torch.empty((M, num_loras), device=u.device, dtype=torch.float32) if backward else None
    if M == 0:
        return v, z, c
    block_kp = triton.next_power_of_2(num_loras)
    block_r = triton.next_power_of_2(rank)
    # About 4K elements per live (rows, K, r) tile keeps the backward's several tiles in registers.
    block_rows = max(1, min(64, 4096 // (block_kp * block_r)))
    _mix_kernel[(triton.cdiv(M, block_rows),)](
        u,
        h,
        gate,
        sample_index,
        v,
        z,
        c,
        M,
        num_samples,
        M // num_samples,
        num_loras,
        rank,
        padded,
        scaling,
        HAS_INDEX=sample_index is not None,
        OUTPUT_MIX=output_mix,
        BACKWARD=backward,
        BLOCK_ROWS=block_rows,
        BLOCK_KP=block_kp,
        BLOCK_R=block_r,
        num_warps=4,
    )
    return v, z, c


def _sum_per_sample(c, sample_index, num_samples):
    """(B, K) float32 sums of the per-token rows c (M, K) over each sample's tokens."""
    M, num_loras = c.shape
    out = torch.zeros((num_samples, num_loras), device=c.device, dtype=torch.float32)
    if M == 0 or num_samples == 0:
        return out
    if sample_index is None:
        order = starts = None
    else:
        # Sort and search, not bincount: no device-to-host sync, so the backward stays graph-capturable.
        sorted_ids, order = torch.sort(sample_index, stable=True)
        starts = torch.searchsorted(sorted_ids, torch.arange(num_samples + 1, device=c.device))
    _segment_sum_kernel[(num_samples,)](
        c,
        order,
        starts,
        out,
        M // num_samples,
        num_loras,
        HAS_INDEX=sample_index is not None,
        BLOCK_T=64,
        BLOCK_KP=triton.next_power_of_2(num_loras),
        num_warps=4,
    )
    return out


# ------------------------------------------------------------------------------------------------
# The two entry points (semantics of reclora::gated_lora_forward / gated_lora_backward)
# ------------------------------------------------------------------------------------------------


def _check(x, weight, bias, gate, lora_a, lora_b, sample_index, grad_out=None, u=None):
    """The kernels' own contract (cheap: shapes, dtypes, devices, layout; never syncs)."""

    def require(ok, msg):
        if not ok:
            raise ValueError(f"gated_lora_triton: {msg}")

    require(x.dim() == 2, f"x must be (M, d_in), got shape {tuple(x.shape)}")
    require(x.dtype in KERNEL_DTYPES, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    require(lora_a.dim() == 3 and lora_b.dim() == 3 and gate.dim() == 2, "gate must be 2-D, lora_a/b 3-D")
    num_samples, num_loras = gate.shape
    _, d_in = x.shape
    _, rank, _ = lora_a.shape
    d_out = lora_b.shape[1]
    require(num_loras >= 1 and rank >= 1, "need K >= 1 meta-LoRAs of rank r >= 1")
    require(lora_a.shape == (num_loras, rank, d_in), f"lora_a must be (K, r, d_in), got {tuple(lora_a.shape)}")
    require(lora_b.shape == (num_loras, d_out, rank), f"lora_b must be (K, d_out, r), got {tuple(lora_b.shape)}")
    require(gate.dtype == torch.float32, f"gate must be float32, got {gate.dtype}")
    tensors = {"x": x, "gate": gate, "lora_a": lora_a, "lora_b": lora_b}
    if weight is not None:
        require(weight.shape == (d_out, d_in), f"weight must be (d_out, d_in), got {tuple(weight.shape)}")
        tensors["weight"] = weight
    if bias is not None:
        require(weight is not None and bias.shape == (d_out,), "bias must be (d_out,) and needs weight")
        tensors["bias"] = bias
    if grad_out is not None:
        require(grad_out.shape == (x.shape[0], d_out), f"grad_out must be (M, d_out), got {tuple(grad_out.shape)}")
        tensors["grad_out"] = grad_out
    if u is not None:
        width = num_loras * rank
        require(
            u.shape == (x.shape[0], width) and u.dtype == torch.float32,
            f"u must be the forward's float32 (M, K r) = ({x.shape[0]}, {width}), got {u.dtype} {tuple(u.shape)}",
        )
        tensors["u"] = u
    if sample_index is None:
        require(
            x.shape[0] % max(num_samples, 1) == 0 and (num_samples > 0 or x.shape[0] == 0),
            "without sample_index, M must be a multiple of B (B = 0 only with M = 0)",
        )
    else:
        require(
            sample_index.shape == (x.shape[0],) and sample_index.dtype == torch.int64, "sample_index must be (M,) int64"
        )
        tensors["sample_index"] = sample_index
    for name, t in tensors.items():
        require(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")
        require(t.is_contiguous(), f"{name} must be contiguous")
        require(name in ("gate", "sample_index", "u") or t.dtype == x.dtype, f"{name} must have x's dtype {x.dtype}")


def _factors(lora_a, lora_b):
    """A_cat (K r, d_in), a view, and Bt (K r, d_out), a copy (small: K r d_out elements)."""
    num_loras, rank, d_in = lora_a.shape
    return lora_a.view(num_loras * rank, d_in), lora_b.transpose(1, 2).reshape(num_loras * rank, lora_b.shape[1])


def gated_lora_forward(x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix):
    """(y, u): y = x W^T + bias + LoRA delta, (M, d_out) in x's dtype (see the module docstring), and
    u = U = x A_cat^T, (M, K r) float32, for the backward."""
    _check(x, weight, bias, gate, lora_a, lora_b, sample_index)
    with on_device(x):
        return _forward(x, weight, bias, gate, lora_a, lora_b, sample_index, float(scaling), output_mix)


def gated_lora_backward(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, scaling, output_mix):
    """(grad_x, grad_gate float32, grad_lora_a, grad_lora_b) given the forward's u; grad_x includes
    grad_out @ W given weight."""
    _check(x, weight, None, gate, lora_a, lora_b, sample_index, grad_out, u)
    with on_device(x):
        return _backward(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, float(scaling), output_mix)


def _forward(x, weight, bias, gate, lora_a, lora_b, sample_index, scaling, output_mix):
    a_cat, b_t = _factors(lora_a, lora_b)
    y = x.new_empty(x.shape[0], lora_b.shape[1])
    u = _matmul(x, a_cat.t(), x.new_empty(x.shape[0], a_cat.shape[0], dtype=torch.float32))
    v, _, _ = _mix(u, None, gate, sample_index, lora_a.shape[1], scaling, output_mix, x.dtype)
    if weight is None:
        return _matmul(v, b_t, y), u
    return _matmul(x, weight.t(), y, a2=v, b2=b_t, bias=bias), u


def _backward(grad_out, x, u, weight, gate, lora_a, lora_b, sample_index, scaling, output_mix):
    num_loras, rank, d_in = lora_a.shape
    M, d_out = grad_out.shape
    a_cat, b_t = _factors(lora_a, lora_b)
    width = a_cat.shape[0]
    h = _matmul(grad_out, b_t.t(), x.new_empty(M, width, dtype=torch.float32))
    v, z, c = _mix(u, h, gate, sample_index, rank, scaling, output_mix, x.dtype)
    grad_gate = _sum_per_sample(c, sample_index, gate.shape[0])

    grad_x = torch.empty_like(x)
    if weight is None:
        _matmul(z, a_cat, grad_x)
    else:
        _matmul(grad_out, weight, grad_x, a2=z, b2=a_cat)
    grad_a = torch.empty_like(lora_a)
    _matmul(z.t(), x, grad_a.view(width, d_in), split=_split_for(width, d_in, M, x.device))
    grad_bt = _matmul(v.t(), grad_out, x.new_empty(width, d_out), split=_split_for(width, d_out, M, x.device))
    grad_b = grad_bt.view(num_loras, rank, d_out).transpose(1, 2).contiguous()
    return grad_x, grad_gate, grad_a, grad_b
