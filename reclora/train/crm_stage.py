"""Stage 1 of Few2Many: the CRM trained on the whole training split, or the one trained before.

With --crm-holdout the CRM trains without the LLM's training subset (held_out): on those samples
the LLM then sees the CRM as it is on new samples of known users (SIM on ML-100K: AUC 0.835 on the
2,000 samples it was fitted to, 0.806 held out, 0.742 on the validation split; docs/RESULTS.md,
issue 16 parts 5 and 6). With --crm-holdout-users it trains without any sample of the users the
LLM's subset is drawn from: those users are new to it, as most validation and test users are.

A trained CRM is kept in the run's crm/ directory and in the cache under a key of the whole
dataset's content, the CRM's settings and CRM_FORMAT, so methods sharing data and settings
train it once (rank 0 trains, the other ranks wait and load it). crm.json holds the weights'
checksum: a corrupt crm.pt is never loaded, the CRM is trained again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from reclora.crm import build_crm, history_slots
from reclora.crm.features import CrmInputs
from reclora.crm.train import CrmTrainConfig, train_crm
from reclora.data import RecDataset
from reclora.files import atomic_directory, cache_folder, file_digest, save_torch, write_json
from reclora.train.config import TrainConfig
from reclora.train.distributed import Processes

CRM_SETTINGS = (
    "crm",
    "crm_search",
    "crm_epochs",
    "crm_batch_size",
    "crm_lr",
    "crm_embed_dim",
    "crm_hidden",
    "crm_dropout",
    "k_long",
    "seed",
)
# Part of the cache key: raise it when the CRM's code changes what a given key trains.
CRM_FORMAT = 2
WEIGHTS, INFO = "crm.pt", "crm.json"


def crm_key(config: TrainConfig, dataset: RecDataset) -> str:
    """The cache key: everything the CRM's training reads (the whole dataset), its settings, the code's format."""
    settings = config.fingerprint(*CRM_SETTINGS)
    if config.crm_holdout:  # the held-out subset is drawn by --seed (in CRM_SETTINGS) and --train-size
        settings["held_out"] = config.fingerprint("train_size")
    if config.crm_holdout_users:  # likewise the held-out users
        settings["held_out_users"] = config.fingerprint("train_size")
    identity = json.dumps([CRM_FORMAT, dataset.fingerprint, settings], sort_keys=True)
    return f"{dataset.name}-{config.crm}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def crm_inputs(config: TrainConfig, dataset: RecDataset) -> CrmInputs:
    return CrmInputs(dataset, history_slots=history_slots(config.crm, config.k_long))


def new_crm(config: TrainConfig, inputs: CrmInputs):
    """The CRM config describes (--crm and its --crm-* settings), untrained."""
    return build_crm(
        config.crm,
        inputs,
        config.crm_embed_dim,
        config.crm_hidden,
        config.k_long,
        config.crm_search,
        config.crm_dropout,
    )


def prepare_crm(
    config: TrainConfig, dataset: RecDataset, run_crm_dir: Path, processes: Processes, log=print, held_out=None
):
    """Returns (crm in eval mode on the device, its CrmInputs, info: key, cached, train_seconds, metrics).

    held_out: training samples the CRM must not train on (--crm-holdout: the LLM's subset), or None.
    """
    inputs = crm_inputs(config, dataset)
    key = crm_key(config, dataset)
    cache = cache_folder("crms", config.cache_dir) / key
    found = next((d for d in (run_crm_dir, cache) if _holds(d, key, log)), None)
    if found is None and processes.is_main:
        _train_and_save(config, inputs, key, [run_crm_dir, cache], processes.device, log, held_out)
    processes.barrier()  # the other ranks wait for rank 0's CRM
    source = found or run_crm_dir
    info = json.loads((source / INFO).read_text())
    info["cached"] = found is not None
    if found is not None:
        log(f"stage 1: the CRM ({config.crm}) trained before is in {found}")
        if found != run_crm_dir and processes.is_main:
            _copy(found, run_crm_dir)
    model = new_crm(config, inputs)
    model.load_state_dict(torch.load(source / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(processes.device).eval(), inputs, info


def _holds(directory: Path, key: str, log) -> bool:
    """Whether directory holds the CRM of key, its weights intact (their checksum is in INFO)."""
    try:
        info = json.loads((directory / INFO).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("key") != key:
        return False
    try:
        intact = file_digest(directory / WEIGHTS) == info.get("sha256")
    except OSError:
        intact = False
    if not intact:
        log(
            f"stage 1: the CRM in {directory} is missing or corrupt ({WEIGHTS} does not match its checksum): "
            "not using it"
        )
    return intact


def _train_and_save(
    config: TrainConfig, inputs: CrmInputs, key: str, directories: list, device, log, held_out=None
) -> None:
    train = inputs.dataset.split("train")
    if held_out is not None:
        train = np.setdiff1d(train, held_out)
    left_out = "" if held_out is None else f", without the LLM's {len(held_out):,}"
    log(f"stage 1: training the CRM ({config.crm}) on the training split ({len(train):,} samples{left_out})")
    torch.manual_seed(config.seed)
    model = new_crm(config, inputs)
    train_config = CrmTrainConfig(
        epochs=config.crm_epochs,
        batch_size=config.crm_batch_size,
        lr=config.crm_lr,
        seed=config.seed,
        device=str(device),
        progress=config.progress,
    )
    start = time.perf_counter()
    result = train_crm(model, inputs, train_config, log=lambda line: log(f"  CRM {line}"), samples=train)
    info = {
        "key": key,
        "kind": config.crm,
        "settings": config.fingerprint(*CRM_SETTINGS),
        "best_epoch": result["best_epoch"],
        "epochs": result["epochs"],
        "valid": result["valid"],
        "test": result["test"],
        "train_seconds": time.perf_counter() - start,
        "train_samples": len(train),
    }
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    for directory in directories:
        with atomic_directory(directory) as staging:
            save_torch(staging / WEIGHTS, state)
            info["sha256"] = file_digest(staging / WEIGHTS)
            write_json(staging / INFO, info)


def _copy(source: Path, target: Path) -> None:
    with atomic_directory(target) as staging:
        for name in (WEIGHTS, INFO):
            (staging / name).write_bytes((source / name).read_bytes())
