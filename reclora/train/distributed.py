"""One process or many (torchrun): rank, device, sharding, and gathering results.

Under torchrun (RANK / WORLD_SIZE set) the process group is gloo on CPU, nccl on GPU; every
rank runs the same pipeline on its shard of each batch, rank 0 alone writes files and logs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of items (parts differ in size by at most one)."""
        bounds = np.linspace(0, len(items), self.world_size + 1).round().astype(int)
        return items[bounds[self.rank] : bounds[self.rank + 1]]

    def gather(self, array: np.ndarray) -> np.ndarray:
        """The ranks' arrays concatenated in rank order (every rank gets the whole)."""
        if not self.distributed:
            return array
        parts = [None] * self.world_size
        dist.all_gather_object(parts, array)
        return np.concatenate(parts)

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _collective_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: str | None) -> Processes:
    """Joins the torchrun process group when there is one; picks this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device is None and torch.cuda.is_available() or str(device or "").startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if world_size == 1:
        return Processes(device=torch.device(device or ("cuda" if wants_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        # Generous: the other ranks wait in a barrier while rank 0 trains the CRM on the whole split.
        dist.init_process_group("nccl" if wants_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(), device=target)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
