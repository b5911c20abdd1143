"""The trainer: RecLoRA's Few2Many pipeline (`python -m reclora.train`, or `run(TrainConfig(...))`).

    from reclora.train import TrainConfig, run
    results = run(TrainConfig(method="reclora", dataset="ml-100k", data_dir="data/ml-100k", train_size=2000))
    results["auc"], results["logloss"]

Stage 1 trains the CRM on the whole training split (crm_stage), stage 2 tunes the LLM's adapters
on a seeded sample of it with the CRM frozen (loop), evaluation is on a seeded test subset;
everything a run writes is described in outputs.
"""

from reclora.train.config import METHODS, ConfigError, TrainConfig, make_config
from reclora.train.loop import TrainingDiverged
from reclora.train.pipeline import run

__all__ = ["METHODS", "ConfigError", "TrainConfig", "TrainingDiverged", "make_config", "run"]
