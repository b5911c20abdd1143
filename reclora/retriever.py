"""Long-Short Modality Retriever: the history items most relevant to the target.

For each sample, items of the user's whole earlier history are scored against the target by
the similarity of their text embeddings (reclora.item_embeddings; ReLLa's semantic retrieval) with
reclora_kernels.retrieve_topk over the item-embedding table (gather fused, top k, ties to the
older item). The top K_long go to the CRM (ids), the top K_short to the LLM prompt (texts);
both lists are returned in chronological order. strategy="recent" takes the last K instead.
"""

from dataclasses import dataclass

import numpy as np
import torch

import reclora_kernels as rk
from reclora.data import HistoryBatch, RecDataset

STRATEGIES = ("semantic", "recent")


@dataclass
class RetrievedHistories:
    """long: (B, K_long) for the CRM; short: (B, K_short) for the prompt; chronological, left-aligned."""

    long: HistoryBatch
    short: HistoryBatch


class LongShortRetriever:
    def __init__(self, dataset: RecDataset, item_embeddings, k_long=60, k_short=10, strategy="semantic", backend=None):
        """item_embeddings: (I, e) float; rows are L2-normalized so scores are cosine similarities."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not 1 <= k_short <= k_long:
            raise ValueError(f"need 1 <= k_short <= k_long, got k_short={k_short}, k_long={k_long}")
        embeddings = torch.as_tensor(item_embeddings, dtype=torch.float32)
        if embeddings.shape[0] != dataset.n_items:
            raise ValueError(
                f"item_embeddings must have {dataset.n_items} rows (one per item), got {tuple(embeddings.shape)}"
            )
        self.dataset = dataset
        self.table = torch.nn.functional.normalize(embeddings, dim=-1)
        self.k_long, self.k_short, self.strategy, self.backend = k_long, k_short, strategy, backend

    def positions(self, samples) -> torch.Tensor:
        """(B, K_long) positions in each sample's full history, best first; -1 where there are fewer."""
        full = self.dataset.histories(samples, as_tensor=True)
        if self.strategy == "recent":
            newest_first = full.lengths[:, None] - 1 - torch.arange(self.k_long)
            return newest_first.clamp(min=-1)
        targets = torch.from_numpy(self.dataset.samples.item[np.asarray(samples, dtype=np.int64)])
        _, index = rk.retrieve_topk(
            self.table[targets], self.table, self.k_long, lengths=full.lengths, ids=full.item_ids, backend=self.backend
        )
        return index

    def retrieve(self, samples) -> RetrievedHistories:
        samples = np.asarray(samples, dtype=np.int64)
        positions = self.positions(samples)
        return RetrievedHistories(self._gather(samples, positions), self._gather(samples, positions[:, : self.k_short]))

    def _gather(self, samples, positions) -> HistoryBatch:
        """The items at the given history positions, in chronological order (missing ones last)."""
        missing = positions < 0
        ordered = torch.where(missing, torch.iinfo(torch.int64).max, positions).sort(1).values
        lengths = (~missing).sum(1)
        valid = torch.arange(positions.shape[1])[None, :] < lengths[:, None]
        seq = self.dataset.sequences
        starts = torch.from_numpy(seq.offsets[self.dataset.samples.user[samples]])
        rows = torch.where(valid, starts[:, None] + ordered, 0).numpy()
        items = np.where(valid.numpy(), seq.item[rows], 0)
        ratings = np.where(valid.numpy(), seq.rating[rows], 0).astype(np.float32)
        return HistoryBatch(torch.from_numpy(items), torch.from_numpy(ratings), lengths)
