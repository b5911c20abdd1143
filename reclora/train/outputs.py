"""What a run leaves in its output directory, every file written atomically (temp file, then rename).

  config.json       the resolved settings
  metrics.jsonl     one JSON line per validation (train loss, validation metrics, time)
  checkpoints/last.pt   the training state to resume from
  crm/              the trained CRM (stage 1)
  results.json      the final metrics and costs
  predictions.npz   the test samples' indices, users, labels and predicted P(click) (for bootstraps)
  curve.png         training loss and validation AUC against optimizer steps
  ../results.csv    one row per finished run, shared by the runs beside this one
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

CSV_COLUMNS = (
    "method", "dataset", "llm", "seed", "train_size", "test_size", "auc", "logloss", "accuracy", "gauc",
    "train_seconds", "eval_seconds", "train_samples_per_second", "eval_samples_per_second", "device", "out",
)

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write, mode="w") -> None:
    """write(file) fills a temporary file beside path, which then replaces path in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
    try:
        with os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path, value) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2, default=str) + "\n"))


def save_torch(path, state) -> None:
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


class RunDirectory:
    def __init__(self, path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    results = property(lambda self: self.path / "results.json")
    curve = property(lambda self: self.path / "curve.png")
    crm = property(lambda self: self.path / "crm")
    shared_csv = property(lambda self: self.path.parent / "results.csv")

    predictions = property(lambda self: self.path / "predictions.npz")

    def holds_a_run(self) -> bool:
        return any(p.exists() for p in (self.checkpoint, self.results, self.metrics))

    def clear(self) -> None:
        for path in (self.checkpoint, self.results, self.metrics, self.curve, self.config, self.predictions):
            path.unlink(missing_ok=True)

    def write_metrics(self, history: list) -> None:
        """The whole history each time: a resumed run rewrites the lines it had, never duplicates them."""
        atomic_write(self.metrics, lambda f: f.writelines(json.dumps(row) + "\n" for row in history))

    def write_predictions(self, dataset, samples, probs) -> None:
        arrays = dict(sample=samples, user=dataset.samples.user[samples], label=dataset.samples.label[samples], prob=probs)
        atomic_write(self.predictions, lambda f: np.savez(f, **arrays), mode="wb")

    def append_csv_row(self, results: dict) -> None:
        """Appends under an exclusive lock: runs sharing the parent may finish at the same time."""
        row = {column: results.get(column, "") for column in CSV_COLUMNS}
        self.shared_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(self.shared_csv, "a+", newline="") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0, os.SEEK_END)
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if f.tell() == 0:
                writer.writeheader()
            writer.writerow(row)

    def plot_curve(self, history: list, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [row["step"] for row in history]
        figure, loss_axis = plt.subplots(figsize=(6, 3.5))
        loss_axis.plot(steps, [row["train_loss"] for row in history], "o-", color="tab:blue", label="train loss")
        loss_axis.set_xlabel("optimizer step")
        loss_axis.set_ylabel("train loss (since last validation)", color="tab:blue")
        auc_axis = loss_axis.twinx()
        auc_axis.plot(steps, [row["valid_auc"] for row in history], "s--", color="tab:red", label="valid AUC")
        auc_axis.set_ylabel("validation AUC", color="tab:red")
        loss_axis.set_title(title)
        figure.tight_layout()
        atomic_write(self.curve, lambda f: figure.savefig(f, format="png", dpi=110), mode="wb")
        plt.close(figure)
