"""Item text embeddings for semantic retrieval: the LLM's mean-pooled last hidden state, or a
hashed bag of words; computed once per dataset, embedder and model, and cached as .npy."""

import hashlib
import os
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from reclora.data import RecDataset
from reclora.files import atomic_write
from reclora.llm import position_ids

EMBEDDERS = ("llm", "bow")
ITEM_SENTENCE = "Here is a movie. Its title is {title}. The movie's genre is {genres}."


def item_sentences(dataset: RecDataset) -> list:
    """ReLLa's item description for embedding: title and genres in one sentence."""
    items = dataset.items
    return [
        ITEM_SENTENCE.format(title=items.titles[i], genres=", ".join(items.genres_of(i)) or "unknown")
        for i in range(len(items))
    ]


@torch.inference_mode()
def llm_embeddings(model, tokenizer, texts, batch_size=64, max_length=64, device="cpu", progress=True) -> np.ndarray:
    """Mean-pooled last hidden state of a causal LM over each text: (n, hidden) float32.

    Only the transformer body runs: the vocabulary projection and the other layers' hidden
    states are never computed. Texts are batched by token length, so batches carry little padding.
    """
    model.eval()
    texts = list(texts)
    token_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="item embeddings", disable=not progress):
        rows = order[start : start + batch_size]
        encoded = tokenizer.pad({"input_ids": [token_ids[r] for r in rows]}, return_tensors="pt").to(device)
        mask = encoded["attention_mask"]
        hidden = model.base_model(**encoded, position_ids=position_ids(mask), use_cache=False).last_hidden_state.float()
        mask = mask[:, :, None].float()
        out[rows] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
    return out


def bow_embeddings(texts, dim=512) -> np.ndarray:
    """Hashed bag of words (a cheap embedder needing no model): (n, dim) float32."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return out


def item_embeddings(
    dataset: RecDataset,
    embedder="llm",
    model=None,
    tokenizer=None,
    model_name="",
    cache_dir=None,
    device="cpu",
    progress=True,
) -> np.ndarray:
    """(I, e) item text embeddings, computed once per dataset and embedder and cached as .npy."""
    if embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be one of {EMBEDDERS}, got {embedder!r}")
    texts = item_sentences(dataset)
    key = hashlib.sha256("\n".join([embedder, model_name, *texts]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"item-embeddings-{dataset.name}-{embedder}-{key}.npy") if cache_dir else None
    if path and os.path.exists(path):
        cached = _load_cached_embeddings(path, len(texts))
        if cached is not None:
            return cached
    if embedder == "bow":
        embeddings = bow_embeddings(texts)
    else:
        if model is None or tokenizer is None:
            raise ValueError("the llm embedder needs model and tokenizer")
        embeddings = llm_embeddings(model, tokenizer, texts, device=device, progress=progress)
    if path:
        atomic_write(path, lambda f: np.save(f, embeddings), mode="wb")
    return embeddings


def _load_cached_embeddings(path, rows: int):
    """The cached (rows, e) finite float embeddings in path, or None (with a warning) when they are not that."""
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        problem = f"unreadable ({error})"
    else:
        if embeddings.ndim != 2 or embeddings.shape[0] != rows or embeddings.dtype.kind != "f":
            problem = f"of shape {embeddings.shape} and dtype {embeddings.dtype}, expected ({rows}, e) float"
        elif not np.isfinite(embeddings).all():
            problem = "holding NaN or infinite values"
        else:
            return embeddings
    warnings.warn(f"computing again the cached item embeddings {path}: {problem}", stacklevel=3)
    return None
