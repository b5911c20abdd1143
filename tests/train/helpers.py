"""Tiny trainer runs: tiny-llama on a small synthetic dataset, a few dozen samples, seconds each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(
    dataset="synthetic",
    dataset_options={"n_users": 40, "n_items": 60, "n_ratings": 2000},
    llm="tiny-llama",
    embedder="bow",
    train_size=24,
    eval_size=16,
    batch_size=8,
    eval_batch_size=8,
    num_loras=4,
    rank=2,
    k_long=6,
    k_short=3,
    crm_epochs=1,
    crm_hidden=32,
    crm_embed_dim=8,
    max_prompt_length=512,
    evals_per_epoch=2,
    epochs=2,
    patience=5,
    progress=False,
)


def tiny_settings(tmp_path, **overrides) -> dict:
    """TINY with a cache of its own under tmp_path (shared by the runs of one test module)."""
    return dict(TINY, cache_dir=str(tmp_path / "cache"), **overrides)


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def train_command(*arguments, launcher=(sys.executable, "-m", "reclora.train")):
    return [*launcher, *map(str, arguments)]


def cli_env() -> dict:
    """The environment a trainer subprocess runs in: this checkout first, one thread."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run_cli(*arguments, launcher=(sys.executable, "-m", "reclora.train"), timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(*arguments, launcher=launcher),
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_results(out: Path) -> dict:
    return json.loads((Path(out) / "results.json").read_text())
