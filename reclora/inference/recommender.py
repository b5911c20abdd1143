"""`Recommender`: a finished training run, loaded once, scoring and ranking new requests.

    rec = Recommender.load("runs/ml100k/reclora-seed0")
    p = rec.score(users, items, timestamps=None)   # raw ids -> P(click), (n,) float32
    top = rec.rank(user, candidates, k=10)         # [(item, score), ...] best first

Scoring reuses the trainer's model (reclora.train.pipeline.build_model) with the run's best
adapters, so a request is scored by the code that produced the run's test metrics. Requests are
tokenized a block at a time, sorted by prompt length and batched (little padding), and run under
torch.inference_mode; each batch's CRM representation and gates are computed once and handed to
the fused gated_lora_linear in every adapted projection.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from reclora.crm.train import CrmTrainConfig
from reclora.crm.train import predict as crm_predict
from reclora.inference.requests import ServingTable
from reclora.inference.run_folder import RunFolder, RunFolderError
from reclora.prompt import length_sorted_batches
from reclora.train.loop import autocast, load_trainable_state
from reclora.train.pipeline import build_model, load_run_dataset, subsets


class Recommender:
    def __init__(
        self,
        run: RunFolder,
        config,
        table: ServingTable,
        model=None,
        crm=None,
        crm_inputs=None,
        batch_size: Optional[int] = None,
        progress: bool = False,
    ):
        """Use Recommender.load."""
        self.run, self.config, self.table = run, config, table
        self.model, self.crm, self.crm_inputs = model, crm, crm_inputs
        self.batch_size = batch_size or config.eval_batch_size
        self.progress = progress
        self.device = torch.device(config.device)
        self._lock = threading.Lock()  # the serving table holds one call's requests at a time

    @classmethod
    def load(
        cls,
        run_dir,
        device=None,
        bf16: Optional[bool] = None,
        batch_size: Optional[int] = None,
        data_dir=None,
        backend: Optional[str] = None,
        progress: bool = False,
        compile: bool = False,
    ) -> Recommender:
        """Restores the run in run_dir as its results.json reports it.

        device: "cpu", "cuda", ... (default: cuda when available). bf16: autocast as the run did
        (default: the run's --bf16). batch_size: requests per batch (default: the run's
        --eval-batch-size). data_dir: where the run's data lies now, when it has moved (default: its
        --data-dir). backend: the kernel backend (default: the fastest for the device). compile:
        torch.compile the LLM's decoder layers (reclora.llm.compile_decoder_layers; whatever the run
        did): pays when a process scores many batches, after the first ones wait for the compiler.
        Raises RunFolderError for a missing, incomplete, unfinished or other-version run folder.
        """
        run = RunFolder(run_dir)
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        overrides = dict(device=device, backend=backend, progress=progress, compile=compile)
        if bf16 is not None:
            overrides["bf16"] = bf16
        if data_dir is not None:
            overrides["data_dir"] = str(data_dir)
        config = dataclasses.replace(run.settings, **overrides)
        if config.data_dir and not os.path.isdir(config.data_dir):
            raise RunFolderError(
                f"{run.path}: the run's data directory {config.data_dir!r} is not found from "
                f"{os.getcwd()}; say where it is now (data_dir=, or --data-dir)"
            )
        dataset = load_run_dataset(config, progress=progress)
        run.check_dataset(dataset)
        crm = inputs = model = None
        if config.needs_crm:
            crm, inputs = run.load_crm(dataset, device)
        if config.is_llm_method:
            model = build_model(config, dataset, crm, inputs, torch.device(device))
            if config.method_row.tuned:
                load_trainable_state(model, run.best_adapters())
            if config.crm_fusion:  # the weight the trainer chose on validation
                model.fusion_weight = run.results_json["crm_fusion"]["weight"]
            model.eval().requires_grad_(False)
        # Last: the CRM's id vocabulary and the model's tables were sized on the run's users.
        table = ServingTable(dataset)
        return cls(run, config, table, model, crm, inputs, batch_size, progress)

    @property
    def method(self) -> str:
        return self.config.method

    def score(self, users, items, timestamps=None) -> np.ndarray:
        """P(click) of each (user, item[, timestamp]) request: (n,) float32.

        users, items: raw ids as in the dataset's files. timestamps: None, or one per request
        (None / NaN: after the user's last known interaction). Unknown users are cold starts
        (counted in a warning); an unknown item raises UnknownItemError.
        """
        samples, cold = self.table.resolve(users, items, timestamps)
        if cold:
            warnings.warn(
                f"{cold} of {len(samples)} requests come from users the run has never seen: scored as cold "
                "starts (no history, no attributes, the CRM's mean user)",
                stacklevel=2,
            )
        return self._score(samples)

    def rank(self, user, candidates: Sequence, k: int = 10, timestamp=None) -> list:
        """The k best candidates for user, [(item, score), ...] highest score first (ties: input order)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        candidates = list(candidates)
        scores = self.score([user] * len(candidates), candidates, [timestamp] * len(candidates))
        order = np.argsort(-scores, kind="stable")[:k]
        return [(candidates[i], float(scores[i])) for i in order]

    def split_samples(self, split: str = "test") -> np.ndarray:
        """The run's own evaluated samples of a split ("test": those of predictions.npz)."""
        if split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
        if split == "test":
            return self.run.test_samples()
        return subsets(self.config, self.table.dataset)["valid"]

    def score_samples(self, samples: np.ndarray) -> np.ndarray:
        """P(click) of samples of the run's own data (by index), with the histories the run gave them."""
        return self._score(self.table.run_requests(np.asarray(samples, dtype=np.int64)))

    def describe_samples(self, samples: np.ndarray) -> dict:
        """Raw user and item ids and labels of samples of the run's own data."""
        run, dataset = self.table.run_samples, self.table.dataset
        return dict(
            user=dataset.users.raw_ids[run.user[samples]],
            item=dataset.items.raw_ids[run.item[samples]],
            label=run.label[samples],
        )

    def _score(self, samples) -> np.ndarray:
        with self._lock:
            self.table.serve(samples)
            if self.model is None:
                config = CrmTrainConfig(
                    device=str(self.device), eval_batch_size=self.batch_size, progress=self.progress
                )
                return crm_predict(self.crm, self.crm_inputs, np.arange(len(samples)), config).astype(np.float32)
            return self._llm_scores(len(samples))

    def _llm_scores(self, n: int) -> np.ndarray:
        scores = np.empty(n, dtype=np.float32)
        with tqdm(total=n, desc="scoring", unit="request", disable=not self.progress) as bar, torch.inference_mode():
            for rows, token_ids in length_sorted_batches(n, self.model.prompt_token_ids, self.batch_size):
                scores[rows] = self._batch_scores(rows, token_ids)
                bar.update(len(rows))
        return scores

    def _batch_scores(self, samples: np.ndarray, token_ids: list) -> np.ndarray:
        model = self.model
        batch = {name: tensor.to(self.device) for name, tensor in model.prompts.pad(token_ids).items()}
        batch.update(model.gate_batch(samples))
        with autocast(self.config, self.device):
            return model.yes_probability(batch).float().cpu().numpy()
