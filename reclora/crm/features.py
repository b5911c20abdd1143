"""From sample indices to the CRM's batch: user fields, the target, and the history slots."""

import numpy as np
import torch

from reclora.data import HistoryBatch, RecDataset


class CrmInputs:
    """Builds DIN / SIM batches from a RecDataset.

    history_slots: the last N history items (DIN's input; the paper's ML-1M setting is 60), or
    None for the whole history (SIM retrieves from it). use_user_id adds the user id as a field.
    """

    def __init__(self, dataset: RecDataset, history_slots=60, use_user_id=True):
        self.dataset = dataset
        self.history_slots = history_slots
        self.use_user_id = use_user_id
        self.rating_levels = dataset.rating_levels()
        sizes = list(dataset.users.vocabulary_sizes())
        self.user_field_sizes = ([dataset.n_users] if use_user_id else []) + sizes

    def model_arguments(self) -> dict:
        """What DIN / SIM need to know about the data."""
        return dict(
            num_items=self.dataset.n_items,
            item_genres=torch.from_numpy(self.dataset.items.genres.astype(np.float32)),
            user_field_sizes=self.user_field_sizes,
            num_ratings=len(self.rating_levels) + 1,
        )

    def batch(self, samples, device="cpu", history=None) -> dict:
        """history: a HistoryBatch for these samples (e.g. the retrieved long list) instead of the last N."""
        samples = np.asarray(samples, dtype=np.int64)
        if history is None:
            history = self.dataset.histories(samples, max_length=self.history_slots, align="left")
        history = HistoryBatch(*(np.asarray(a) for a in history))
        if history.item_ids.shape[1] == 0:
            # No history in the whole batch (cold starts at inference): one padding slot keeps
            # SIM's gather over the retrieved slots defined.
            history = HistoryBatch(
                np.zeros((len(samples), 1), np.int64), np.zeros((len(samples), 1), np.float32), history.lengths
            )
        valid = np.arange(history.item_ids.shape[1])[None, :] < history.lengths[:, None]
        rating_codes = np.where(valid, np.searchsorted(self.rating_levels, history.ratings) + 1, 0)
        users = self.dataset.samples.user[samples]
        fields = self.dataset.users.codes[users]
        if self.use_user_id:
            # Users beyond the id vocabulary the CRM was built with (cold start, at inference): -1.
            user_ids = np.where(users < self.user_field_sizes[0], users, -1)
            fields = np.concatenate([user_ids[:, None], fields], 1)
        arrays = dict(
            user_fields=fields,
            target_item=self.dataset.samples.item[samples],
            history_items=history.item_ids,
            history_ratings=rating_codes,
            history_lengths=history.lengths,
        )
        batch = {
            name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device) for name, a in arrays.items()
        }
        batch["label"] = torch.from_numpy(self.dataset.samples.label[samples].astype(np.float32)).to(device)
        return batch
