"""DIN, SIM, GRU4Rec and SASRec: shapes, gradients, padding, SIM's search against brute force, the
sequential encoders against a run on the valid prefix alone, and a tiny overfit."""

import numpy as np
import pytest
import torch

from reclora.crm import DIN, SIM, GRU4Rec, SASRec
from reclora.crm.features import CrmInputs
from reclora.data import load_dataset

NUM_ITEMS, GENRES, FIELDS = 40, 5, [12, 3, 4]


def make_batch(batch=6, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        user_fields=torch.stack([torch.randint(0, s, (batch,), generator=gen) for s in FIELDS], 1),
        target_item=torch.randint(0, NUM_ITEMS, (batch,), generator=gen),
        history_items=torch.randint(0, NUM_ITEMS, (batch, length), generator=gen),
        history_ratings=torch.randint(1, 6, (batch, length), generator=gen),
        history_lengths=torch.tensor([0, 1, 9, 4, 9, 2][:batch]),
        label=torch.randint(0, 2, (batch,), generator=gen).float(),
    )


def genres(seed=0):
    return (torch.rand(NUM_ITEMS, GENRES, generator=torch.Generator().manual_seed(seed)) > 0.6).float()


def small(cls, **kwargs):
    torch.manual_seed(0)
    return cls(NUM_ITEMS, genres(), FIELDS, embed_dim=8, hidden=16, attention_hidden=8, dropout=0.0, **kwargs)


@pytest.mark.parametrize(
    "model",
    [
        lambda: small(DIN),
        lambda: small(SIM, k_long=3),
        lambda: small(SIM, k_long=3, search="hard"),
        lambda: small(SIM, k_long=3, unit="topk_attention"),
        lambda: small(GRU4Rec),
        lambda: small(SASRec, max_length=5),
    ],
)
def test_forward_backward(model):
    model = model()
    batch = make_batch()
    logits = model(batch)
    assert logits.shape == (6,) and model.represent(batch).shape == (6, 16)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    assert model.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [DIN, GRU4Rec, SASRec])
def test_padding_is_never_read(cls):
    model = small(cls).eval()
    batch = make_batch()
    other = dict(batch, history_items=batch["history_items"].clone(), history_ratings=batch["history_ratings"].clone())
    other["history_items"][0] = 7  # row 0 has no valid history: its padding must not matter
    other["history_items"][3, 4:] = 11  # nor the slots after row 3's 4 valid ones
    other["history_ratings"][5, 2:] = 1
    torch.testing.assert_close(model(batch), model(other))


@pytest.mark.parametrize("cls", [GRU4Rec, SASRec])
def test_sequential_state_is_the_valid_prefix_alone(cls):
    """Each row's state equals the encoder run on its valid behaviours only, and depends on their order."""
    model = small(cls).eval()
    batch = make_batch()
    history = model.behaviours(batch["history_items"], batch["history_ratings"])
    valid = torch.arange(9)[None, :] < batch["history_lengths"][:, None]
    states = model.summarize(history, valid)
    for b in range(6):
        n = int(batch["history_lengths"][b])
        if n == 0:
            assert (states[b] == 0).all()
            continue
        alone = model.summarize(history[b : b + 1, :n], valid[b : b + 1, :n])[0]
        torch.testing.assert_close(states[b], alone, atol=1e-5, rtol=1e-5)
        if n > 1:
            flipped = model.summarize(history[b : b + 1, :n].flip(1), valid[b : b + 1, :n])[0]
            assert not torch.allclose(flipped, alone, atol=1e-4)


def test_sasrec_positions_count_back_from_the_latest():
    """The latest behaviour gets recency 0 in every row, whatever the row's length."""
    model = small(SASRec, max_length=4).eval()
    seen = []
    model.recency.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = make_batch()
    model(batch)
    positions, lengths = seen[0], batch["history_lengths"]
    for b in range(6):
        n = int(lengths[b])
        if n:
            assert positions[b, n - 1] == 0 and positions[b, 0] == min(n - 1, 3)


def test_sim_uses_the_top_k_by_similarity():
    """SIM equals DIN run on the k history items scoring highest against the target (brute force)."""
    sim = small(SIM, k_long=3).eval()
    din = small(DIN).eval()
    din.load_state_dict(sim.state_dict())
    batch = make_batch()
    table = sim.item_embedding(torch.arange(NUM_ITEMS)).detach()
    rows = []
    for b in range(6):
        n = int(batch["history_lengths"][b])
        scores = table[batch["history_items"][b, :n]] @ table[batch["target_item"][b]]
        keep = sorted(range(n), key=lambda i: (-float(scores[i]), i))[:3]
        rows.append(keep + [0] * (3 - len(keep)))
    keep = torch.tensor(rows)
    expected = din(
        dict(
            batch,
            history_items=torch.gather(batch["history_items"], 1, keep),
            history_ratings=torch.gather(batch["history_ratings"], 1, keep),
            history_lengths=batch["history_lengths"].clamp(max=3),
        )
    )
    torch.testing.assert_close(sim(batch), expected)


def test_hard_search_keeps_only_shared_genres():
    sim = small(SIM, k_long=50, search="hard")
    batch = make_batch()
    mask = sim.search_mask(batch)
    target = sim.item_genres[batch["target_item"]]
    for b in range(6):
        for position in range(9):
            shared = bool((sim.item_genres[batch["history_items"][b, position]] * target[b]).sum() > 0)
            assert bool(mask[b, position]) == shared


@pytest.mark.parametrize("cls", [DIN, GRU4Rec, SASRec])
def test_tiny_overfit(cls):
    model = small(cls)
    batch = make_batch(seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_inputs_from_a_dataset(tmp_path):
    dataset = load_dataset("synthetic", cache_dir=tmp_path, progress=False, n_users=60, n_items=80, n_ratings=3000)
    inputs = CrmInputs(dataset, history_slots=20)
    samples = dataset.split("train")[:32]
    batch = inputs.batch(samples)
    assert batch["history_items"].shape == (32, 20)
    assert (batch["history_lengths"] == torch.from_numpy(np.minimum(dataset.samples.history_length[samples], 20))).all()
    model = DIN(**inputs.model_arguments(), embed_dim=8, hidden=16)
    assert model(batch).shape == (32,)
    valid = torch.arange(20)[None, :] < batch["history_lengths"][:, None]
    assert (batch["history_ratings"][valid] >= 1).all() and (batch["history_ratings"][~valid] == 0).all()
