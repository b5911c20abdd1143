"""DIN (Deep Interest Network) as RecLoRA configures it.

One shared embedding table for all fields. A history item is h_i = ReLU(W [E(item_i); E(rating_i)]);
the target is t = E(target). Attention a_i = MLP([t, h_i, t - h_i, t * h_i]) times the mask, no
softmax; pooled = sum_i a_i h_i. Then [user fields; t; pooled] -> MLP blocks; the last hidden
layer (default 256) is the representation handed to the gates, and Linear(hidden, 1) is the
pre-training head.

Batch (dict of tensors, B samples, L history slots):
  user_fields: (B, F) int64 codes, field f in [0, user_field_sizes[f])
  target_item: (B,) int64
  history_items, history_ratings: (B, L) int64 (rating codes in [1, num_ratings); padding anything)
  history_lengths: (B,) int64 valid prefix of the history slots
"""

import torch
from torch import nn

from reclora_kernels.retrieval_reference import valid_positions


class DIN(nn.Module):
    # Blocks of embed_dim width beside the user fields in the MLP's input: [target; pooled history].
    readout_blocks = 2

    def __init__(
        self,
        num_items: int,
        item_genres: torch.Tensor,
        user_field_sizes,
        num_ratings: int = 6,
        embed_dim: int = 64,
        hidden: int = 256,
        num_layers: int = 3,
        attention_hidden: int = 64,
        dropout: float = 0.1,
    ):
        """item_genres: (num_items, G) multi-hot, the item side information; num_ratings counts code 0 (padding)."""
        super().__init__()
        self.num_items, self.num_ratings, self.hidden = num_items, num_ratings, hidden
        num_genres = item_genres.shape[1]
        sizes = [num_items, num_ratings, num_genres, *user_field_sizes]
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.register_buffer("item_genres", item_genres.float(), persistent=False)
        self.register_buffer("field_offsets", offsets, persistent=False)
        self.embedding = nn.Embedding(int(sum(sizes)), embed_dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.history_proj = nn.Linear(2 * embed_dim, embed_dim)
        self.build_pooling(embed_dim, attention_hidden, dropout)
        layers, width = [], (len(user_field_sizes) + self.readout_blocks) * embed_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, 1)

    def build_pooling(self, embed_dim, attention_hidden, dropout):
        """The history summarizer's parameters (created here, between the embeddings and the MLP, so that
        a seed gives every model the same embedding initialization)."""
        self.attention = nn.Sequential(
            nn.Linear(4 * embed_dim, attention_hidden), nn.ReLU(), nn.Linear(attention_hidden, 1)
        )

    def _field(self, index, codes):
        return self.embedding(codes + self.field_offsets[index])

    def item_embedding(self, items):
        """E(item) plus the mean embedding of its genres: (...,) -> (..., e)."""
        genres = self.item_genres[items]
        genre_emb = genres @ self._field(2, torch.arange(self.item_genres.shape[1], device=items.device))
        return self._field(0, items) + genre_emb / genres.sum(-1, keepdim=True).clamp(min=1)

    def behaviours(self, items, ratings):
        """h_i = ReLU(W [E(item); E(rating)]): (B, L) -> (B, L, e)."""
        ratings = ratings.clamp(0, self.num_ratings - 1)
        return torch.relu(self.history_proj(torch.cat([self.item_embedding(items), self._field(1, ratings)], -1)))

    def pool(self, target, history, valid):
        """Target attention without softmax: (B, e), (B, L, e), (B, L) bool -> (B, e)."""
        t = target[:, None, :].expand_as(history)
        weights = self.attention(torch.cat([t, history, t - history, t * history], -1)).squeeze(-1)
        return ((weights * valid)[:, :, None] * history).sum(1)

    def user_fields(self, codes):
        """(B, F) codes -> (B, F * e); code -1 (a user the CRM never saw) reads the mean of the field's embeddings."""
        return torch.cat([self._user_field(3 + f, codes[:, f]) for f in range(codes.shape[1])], -1)

    def _user_field(self, index, codes):
        known = codes >= 0
        embedded = self._field(index, codes.clamp(min=0))
        if bool(known.all()):
            return embedded
        end = self.field_offsets[index + 1] if index + 1 < len(self.field_offsets) else self.embedding.num_embeddings
        mean = self.embedding.weight[self.field_offsets[index] : end].mean(0)
        return torch.where(known[:, None], embedded, mean)

    def represent_from(self, batch, history_items, history_ratings, valid):
        target = self.item_embedding(batch["target_item"])
        pooled = self.pool(target, self.behaviours(history_items, history_ratings), valid)
        return self.mlp(torch.cat([self.user_fields(batch["user_fields"]), target, pooled], -1))

    def represent(self, batch):
        """The last hidden layer: (B, hidden). RecLoRA's gates read this (detached, CRM frozen)."""
        items = batch["history_items"]
        valid = valid_positions(items.shape[0], items.shape[1], batch["history_lengths"], None, items.device)
        return self.represent_from(batch, items, batch["history_ratings"], valid)

    def logit_from(self, hidden):
        """Click logits (B,) from represent()'s output."""
        return self.head(hidden).squeeze(-1)

    def forward(self, batch):
        """Click logits: (B,)."""
        return self.logit_from(self.represent(batch))
