"""SIM (Search-based Interest Model): retrieve the top K_long of the lifelong history, then DIN.

The general search unit scores the target against every history item with
reclora_kernels.retrieve_topk over the item-embedding table (the gather is fused: nothing of
size (B, L, e) is built for the full history). Soft search ranks by embedding similarity; hard
search keeps only items sharing a genre with the target (the mask). The exact search unit is
DIN's target attention over the retrieved items, or, with unit="topk_attention", the fused
softmax pooling of reclora_kernels.topk_target_attention over the retrieved item embeddings.
The batch is DIN's, with the whole history in the history slots.
"""

import torch

import reclora_kernels as rk
from reclora.crm.din import DIN

SEARCH_MODES = ("soft", "hard")
UNITS = ("din", "topk_attention")


class SIM(DIN):
    def __init__(self, *args, k_long: int = 60, search: str = "soft", unit: str = "din", backend=None, **kwargs):
        super().__init__(*args, **kwargs)
        if search not in SEARCH_MODES or unit not in UNITS:
            raise ValueError(f"search must be one of {SEARCH_MODES} and unit one of {UNITS}, got {search!r}, {unit!r}")
        self.k_long, self.search, self.unit, self.backend = k_long, search, unit, backend

    def search_mask(self, batch):
        """Hard search: (B, L) bool, history items sharing a genre with the target; None for soft."""
        if self.search == "soft":
            return None
        target_genres = self.item_genres[batch["target_item"]]
        return (self.item_genres[batch["history_items"]] @ target_genres[:, :, None]).squeeze(-1) > 0

    def represent(self, batch):
        items, ratings = batch["history_items"], batch["history_ratings"]
        table = self.item_embedding(torch.arange(self.num_items, device=items.device))
        target = table[batch["target_item"]]
        lengths, mask = batch["history_lengths"], self.search_mask(batch)
        if self.unit == "topk_attention":
            pooled, _ = rk.topk_target_attention(
                target, table, self.k_long, lengths=lengths, mask=mask, ids=items, backend=self.backend
            )
            return self.mlp(torch.cat([self.user_fields(batch["user_fields"]), target, pooled], -1))
        _, index = rk.retrieve_topk(
            target.detach(), table.detach(), self.k_long, lengths=lengths, mask=mask, ids=items, backend=self.backend
        )
        found = index >= 0
        picked = index.clamp(min=0)
        return self.represent_from(batch, torch.gather(items, 1, picked), torch.gather(ratings, 1, picked), found)
