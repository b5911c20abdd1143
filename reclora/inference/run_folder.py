"""Reading a finished run folder back: its settings, its frozen CRM and its best adapters, checked.

Everything is checked against what the run recorded, so a Recommender scores with exactly what
the run's results.json reports: the settings must parse with this version (the run's
reclora_kernels version must match), config.json must be the one results.json was computed with,
the checkpoint must come from the same settings and hold the best validated adapters (not only
the last step's), and the CRM must have been trained on the data found now.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import reclora_kernels
from reclora.train.config import ConfigError, TrainConfig, completed_settings, make_config
from reclora.train.crm_stage import INFO, WEIGHTS, crm_inputs, crm_key, new_crm
from reclora.train.outputs import RunDirectory


class RunFolderError(ValueError):
    """The run folder cannot be served: missing, incomplete, unfinished or from another version."""


class RunFolder(RunDirectory):
    def __init__(self, path):
        super().__init__(path)
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        if not self.config.exists():
            raise RunFolderError(
                f"{self.path}: not a run folder (no config.json); give the --out of a python -m reclora.train run"
            )
        if not self.results.exists():
            raise RunFolderError(
                f"{self.path}: the run is not finished (no results.json): it is still running or "
                "was interrupted; finish it with python -m reclora.train ... --resume"
            )
        self.results_json = self._read_json(self.results)
        self.settings = self._settings()

    def _read_json(self, path: Path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{path}: cannot be read ({error})") from None

    def _settings(self) -> TrainConfig:
        recorded = self.results_json.get("versions", {}).get("reclora_kernels")
        if recorded != reclora_kernels.__version__:
            raise RunFolderError(
                f"{self.path}: written by reclora {recorded!r}, this is {reclora_kernels.__version__!r}: "
                "score it with the version that trained it, or train it again"
            )
        values = self._read_json(self.config)
        if values != self.results_json.get("config"):
            raise RunFolderError(
                f"{self.path}: config.json is not the configuration results.json was computed with "
                "(the folder mixes two runs); train it again into an empty folder"
            )
        try:
            return make_config(completed_settings(values))
        except ConfigError as error:
            raise RunFolderError(f"{self.config}: settings this version cannot use: {error}") from None

    def test_samples(self) -> np.ndarray:
        """The sample indices results.json's test metrics were computed on (predictions.npz)."""
        return self.predictions_npz()["sample"]

    def predictions_npz(self) -> dict:
        if not self.predictions.exists():
            raise RunFolderError(f"{self.path}: incomplete, predictions.npz is missing")
        with np.load(self.predictions) as arrays:
            return {name: arrays[name] for name in arrays.files}

    def check_dataset(self, dataset) -> None:
        """The data loaded now must be the data the run was evaluated on."""
        saved = self.predictions_npz()
        samples = saved["sample"]
        matches = (
            len(samples) == self.results_json.get("test_size")
            and samples.max(initial=-1) < len(dataset)
            and np.array_equal(dataset.samples.user[samples], saved["user"])
            and np.array_equal(dataset.samples.label[samples], saved["label"])
        )
        if not matches:
            raise RunFolderError(
                f"{self.path}: the data found now ({self.settings.dataset} in "
                f"{self.settings.data_dir}) is not the data this run was evaluated on"
            )

    def load_crm(self, dataset, device):
        """(the frozen CRM in eval mode, its CrmInputs) as stage 1 left them in crm/."""
        config = self.settings
        weights, info = self.crm / WEIGHTS, self.crm / INFO
        if not weights.exists() or not info.exists():
            raise RunFolderError(f"{self.path}: incomplete, the trained CRM ({weights}) is missing")
        if self._read_json(info).get("key") != crm_key(config, dataset):
            raise RunFolderError(f"{self.crm}: this CRM was trained on other data or settings than the run's")
        inputs = crm_inputs(config, dataset)
        model = new_crm(config, inputs)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.to(device).eval().requires_grad_(False), inputs

    def best_adapters(self) -> dict:
        """The adapters and gates of the best validation, which the run's test metrics used."""
        if not self.checkpoint.exists():
            raise RunFolderError(
                f"{self.path}: incomplete, {self.checkpoint} (which holds the best adapters) is missing"
            )
        try:
            checkpoint = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises many kinds for a damaged file
            raise RunFolderError(f"{self.checkpoint}: cannot be read ({type(error).__name__}: {error})") from None
        saved = (checkpoint.get("identity") or {}).get("settings", {})
        changed = sorted(self.settings.settings_changed_since(saved))
        if changed:
            raise RunFolderError(f"{self.checkpoint}: written with other settings than config.json ({changed})")
        state = checkpoint.get("state", {})
        if state.get("best_adapters") is None:
            raise RunFolderError(f"{self.checkpoint}: holds no best adapters (no validation finished)")
        if state.get("best_step") != self.results_json.get("best_step"):
            raise RunFolderError(
                f"{self.checkpoint}: its best step {state.get('best_step')} is not the one "
                f"results.json reports ({self.results_json.get('best_step')})"
            )
        return state["best_adapters"]
