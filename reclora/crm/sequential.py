"""Sequential CRMs: GRU4Rec and SASRec as click-through models.

Both keep DIN's embeddings (a behaviour is h_i = ReLU(W [E(item_i); E(rating_i)])), user fields and
MLP, and replace its target attention by a sequence encoder over the behaviours, oldest first. The
encoder's state after the most recent behaviour, s, is read out with the target t:
MLP([user fields; t; s; s * t]) (target-aware: the MLP sees the product as well as both vectors). The
last hidden layer is, as for DIN, the representation handed to RecLoRA's gates.

The batch is DIN's: the last K_long behaviours in the history slots, a valid prefix of
`history_lengths` (left-aligned), so the state at position length - 1 never reads padding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from reclora.crm.din import DIN


def last_valid(outputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """outputs (B, L, e) at each row's last valid position (valid: (B, L) bool, a prefix); zeros if none."""
    lengths = valid.sum(1)
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    return outputs[rows, (lengths - 1).clamp(min=0)] * (lengths > 0)[:, None].to(outputs.dtype)


class SequentialCRM(DIN):
    readout_blocks = 3  # [target; s; s * target]

    def summarize(self, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, e) behaviours, (B, L) valid prefix -> (B, e) state after the most recent behaviour."""
        raise NotImplementedError

    def pool(self, target, history, valid):
        state = self.summarize(history, valid)
        return torch.cat([state, state * target], -1)


class GRU4Rec(SequentialCRM):
    """GRU4Rec (Hidasi et al., 2016): a GRU over the behaviour sequence."""

    def build_pooling(self, embed_dim, attention_hidden, dropout):
        self.encoder = nn.GRU(embed_dim, embed_dim, batch_first=True)

    def summarize(self, history, valid):
        outputs, _ = self.encoder(history)
        return last_valid(outputs, valid)


class CausalSelfAttention(nn.Module):
    """A pre-LayerNorm transformer block whose positions read only themselves and earlier ones."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.feedforward_norm = nn.LayerNorm(dim)
        self.feedforward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.feedforward(self.feedforward_norm(x))


class SASRec(SequentialCRM):
    """SASRec (Kang and McAuley, 2018): causal self-attention blocks over the behaviour sequence.

    Positions are counted back from the most recent behaviour (0 = the latest), so a position means
    the same recency in every row whatever its length; the causal mask keeps each position from
    reading later ones, padding included. Like GRU4Rec here, the encoder has no dropout of its own
    (the readout MLP has): on the CPU, dropout masks over (B, L, e) cost more than the attention.
    """

    def __init__(self, *args, max_length: int = 60, heads: int = 2, layers: int = 2, **kwargs):
        self.encoder_shape = (max_length, heads, layers)  # build_pooling reads it inside DIN.__init__
        super().__init__(*args, **kwargs)

    def build_pooling(self, embed_dim, attention_hidden, dropout):
        max_length, heads, layers = self.encoder_shape
        if max_length < 1 or heads < 1 or embed_dim % heads:
            raise ValueError(
                f"SASRec needs max_length >= 1 and embed_dim ({embed_dim}) divisible by heads, got "
                f"max_length={max_length}, heads={heads}"
            )
        self.recency = nn.Embedding(max_length, embed_dim)
        self.blocks = nn.Sequential(*(CausalSelfAttention(embed_dim, heads) for _ in range(layers)))
        self.final_norm = nn.LayerNorm(embed_dim)

    def summarize(self, history, valid):
        steps_back = valid.sum(1, keepdim=True) - 1 - torch.arange(history.shape[1], device=history.device)
        positions = steps_back.clamp(0, self.recency.num_embeddings - 1)
        return last_valid(self.final_norm(self.blocks(history + self.recency(positions))), valid)
