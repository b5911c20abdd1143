"""Small CUDA-backend calls, forward and backward, for compute-sanitizer (memcheck, racecheck).

Odd shapes on purpose: K = 1, r < 8, d not a multiple of 16, packed tokens, k > L, empty rows.
  python scripts/sanitizer_cases.py             on a GPU (under compute-sanitizer)
  python scripts/sanitizer_cases.py --emulated  the same calls on the CPU through the CUDA
      emulation (tests/cuda_emulation), e.g. under ThreadSanitizer: make check-cuda-emulation
"""

import os
import sys

import torch

import reclora_kernels as rk


def lora_cases(backend, device="cuda"):
    for mix in ("weight", "output"):
        for batch, tokens, num_loras, rank, d_in, d_out in (
            (1, 1, 1, 1, 5, 7),
            (3, 5, 4, 3, 33, 17),
            (2, 9, 16, 8, 64, 72),
        ):
            x = torch.randn(batch, tokens, d_in, device=device, requires_grad=True)
            gate = torch.softmax(torch.randn(batch, num_loras, device=device), -1).requires_grad_()
            a = torch.randn(num_loras, rank, d_in, device=device, requires_grad=True)
            b = torch.randn(num_loras, d_out, rank, device=device, requires_grad=True)
            w = torch.randn(d_out, d_in, device=device)
            bias = torch.randn(d_out, device=device)
            rk.gated_lora(x, gate, a, b, 2.0, mix=mix, backend=backend).sum().backward()
            rk.gated_lora_linear(x, w, bias, gate, a, b, 2.0, mix=mix, backend=backend).sum().backward()
            packed = x.detach().reshape(-1, d_in).requires_grad_()
            owners = torch.randint(0, batch, (packed.shape[0],), device=device)
            rk.gated_lora(packed, gate, a, b, 2.0, mix=mix, sample_index=owners, backend=backend).sum().backward()


def retrieval_cases(backend, device="cuda"):
    for batch, length, dim, k, rows in (
        (1, 1, 5, 1, None),
        (3, 40, 33, 8, 11),
        (4, 7, 64, 12, None),
        (2, 300, 16, 256, 50),
    ):
        query = torch.randn(batch, dim, device=device, requires_grad=True)
        keys = torch.randn(*((rows,) if rows else (batch, length)), dim, device=device, requires_grad=True)
        ids = torch.randint(0, rows, (batch, length), device=device) if rows else None
        lengths = torch.randint(0, length + 1, (batch,), device=device)
        mask = torch.rand(batch, length, device=device) > 0.3
        scores, _ = rk.retrieve_topk(query, keys, k, lengths=lengths, mask=mask, ids=ids, backend=backend)
        torch.where(torch.isfinite(scores), scores, 0).sum().backward()
        pooled, _ = rk.topk_target_attention(query, keys, k, lengths=lengths, ids=ids, backend=backend)
        pooled.sum().backward()


def emulated():
    """The cases through the CUDA emulation: the cuda backend's kernels in place of the cpu ones."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.cuda_emulation.kernels import emulated_cuda_kernels

    with emulated_cuda_kernels():
        lora_cases("cpu", "cpu")
        retrieval_cases("cpu", "cpu")
    print("sanitizer cases ran (CUDA emulation)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--emulated"]:
        emulated()
    else:
        lora_cases("cuda")
        retrieval_cases("cuda")
        torch.cuda.synchronize()
        print("sanitizer cases ran")
