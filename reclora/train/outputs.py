"""What a run leaves in its output directory, every file written atomically (temp file, then rename).

.lock             held (flock) by the run writing into the folder; names it (pid, host, start)
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

import contextlib
import csv
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch

from reclora.files import atomic_write
from reclora.train.config import ConfigError

CSV_COLUMNS = (
    "method",
    "dataset",
    "llm",
    "seed",
    "train_size",
    "test_size",
    "auc",
    "logloss",
    "accuracy",
    "gauc",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_second",
    "eval_samples_per_second",
    "device",
    "out",
)
CHECKPOINT_KEYS = ("adapters", "optimizer", "scheduler", "state")  # and its identity (reclora.train.loop)


class RunInUse(ConfigError):
    """Another process holds the run folder's lock."""


class UnreadableFile(ConfigError):
    """A file of an earlier run that cannot be used: truncated, corrupt or not what it should be."""


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
    lock_file = property(lambda self: self.path / ".lock")

    @contextlib.contextmanager
    def locked(self):
        """Holds the folder's exclusive lock for the block (RunInUse names the holder if another run has it).

        A folder this creates is removed again if the block leaves nothing in it.
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = self._acquire_lock()
        try:
            holder = (
                f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
            )
            os.ftruncate(handle, 0)
            os.write(handle, holder.encode())
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)
            os.close(handle)
            if created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    def _acquire_lock(self) -> int:
        while True:
            handle = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(handle, 4096).decode(errors="replace") or "a process starting up"
                os.close(handle)
                raise RunInUse(
                    f"--out {self.path} is in use by another run ({holder}; lock {self.lock_file}): "
                    "wait for it to end or choose another --out"
                ) from None
            try:
                if os.stat(self.lock_file).st_ino == os.fstat(handle).st_ino:
                    return handle
            except FileNotFoundError:
                pass
            os.close(handle)  # the holder removed the file just as we opened it: lock the new one

    def load_checkpoint(self) -> dict:
        """The checkpoint, loaded and checked (UnreadableFile names it and what to do)."""
        try:
            checkpoint = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as error:  # torch reports a bad file with many kinds of error
            raise self._unreadable(self.checkpoint, f"{type(error).__name__}: {error}") from None
        if not isinstance(checkpoint, dict) or not set(CHECKPOINT_KEYS) <= set(checkpoint):
            raise self._unreadable(self.checkpoint, f"not a reclora checkpoint (expected the keys {CHECKPOINT_KEYS})")
        adapters = checkpoint["adapters"]
        if not all(isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all()) for t in adapters.values()):
            raise self._unreadable(self.checkpoint, "its adapters hold NaN or infinite values")
        return checkpoint

    def load_results(self) -> dict:
        """results.json of a finished run, checked."""
        try:
            results = json.loads(self.results.read_text())
        except (OSError, ValueError) as error:
            raise self._unreadable(self.results, str(error)) from None
        if not isinstance(results, dict) or "auc" not in results:
            raise self._unreadable(self.results, "not the results of a finished run")
        return results

    def _unreadable(self, path, reason) -> UnreadableFile:
        return UnreadableFile(f"{path} is unreadable ({reason}); delete it, or start the run afresh with --overwrite")

    def holds_a_run(self) -> bool:
        return any(p.exists() for p in (self.checkpoint, self.results, self.metrics))

    def clear(self) -> None:
        for path in (self.checkpoint, self.results, self.metrics, self.curve, self.config, self.predictions):
            path.unlink(missing_ok=True)

    def write_metrics(self, history: list) -> None:
        """The whole history each time: a resumed run rewrites the lines it had, never duplicates them."""
        atomic_write(self.metrics, lambda f: f.writelines(json.dumps(row) + "\n" for row in history))

    def read_metrics(self) -> list:
        """write_metrics's rows, [] before the first validation."""
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_predictions(self, dataset, samples, prob, **parts) -> None:
        """prob: the run's P(Yes); parts: more scores per sample (--crm-fusion: llm_prob and crm_prob, each
        logit of the fused readout alone)."""
        arrays = dict(
            sample=samples, user=dataset.samples.user[samples], label=dataset.samples.label[samples], prob=prob, **parts
        )
        atomic_write(self.predictions, lambda f: np.savez(f, **arrays), mode="wb")

    def read_predictions(self) -> dict:
        """write_predictions's arrays of a finished run, its parts included (UnreadableFile when missing or
        damaged)."""
        try:
            with np.load(self.predictions) as arrays:
                missing = {"sample", "user", "label", "prob"} - set(arrays.files)
                if missing:
                    raise KeyError(f"no {', '.join(sorted(missing))}")
                return {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, KeyError) as error:
            raise self._unreadable(self.predictions, f"{type(error).__name__}: {error}") from None

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
