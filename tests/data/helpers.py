"""Helpers for the data tests: where the real MovieLens copies are, small file writers, AUC."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir(name: str, *required: str) -> Path:
    """$RECLORA_DATA_DIR/<name>, else ../shared/data/<name> beside the checkout; skips if absent."""
    root = Path(os.environ.get("RECLORA_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    path = root / name
    missing = [file for file in required if not (path / file).is_file()]
    if not path.is_dir() or missing:
        pytest.skip(f"real {name} data not found in {path} (set RECLORA_DATA_DIR)")
    return path


def write_text(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    """Writes `text` (lines joined by \\n) with the given line ending and encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, ties counted as half (the Mann-Whitney statistic)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    distinct, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first_rank + (counts + 1) / 2)[inverse]
    positives, negatives = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))
