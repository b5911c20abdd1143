"""Stage 2 of Few2Many: tune the LLM's adapters on the sampled subset, validate, checkpoint, resume.

Determinism, which resume relies on: epoch e visits the subset in the permutation drawn from
(seed, e); optimizer step s reseeds torch's RNG from (seed, s, rank) before its dropout; the
checkpoint holds the step, the adapters, the optimizer and scheduler, the best adapters and
the metrics so far. A resumed run therefore takes the steps the interrupted one would have
taken and ends with the same metrics.

With P processes and A accumulation steps, each optimizer step's batch of `batch_size` samples
is cut into P x A near-equal micro-batches; each process sums its micro-batches' losses
scaled so that DDP's gradient average is the mean over the whole batch: results do not depend
on P or A (up to float rounding).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reclora.files import save_torch
from reclora.metrics import ctr_metrics, format_metrics
from reclora.model import RecLoRAModel
from reclora.progress import progress_bar
from reclora.prompt import length_sorted_batches
from reclora.train.config import ConfigError, TrainConfig, as_stored
from reclora.train.distributed import Processes
from reclora.train.outputs import RunDirectory

# Raise it when a checkpoint's content changes meaning: older checkpoints are then refused by name.
CHECKPOINT_FORMAT = 2


def run_identity(config: TrainConfig, dataset) -> dict:
    """What a checkpoint must share with the run resuming it: every setting but the run-only ones, and the data."""
    identity = {"format": CHECKPOINT_FORMAT, "settings": config.run_fingerprint(), "data": dataset.fingerprint}
    return as_stored(identity)


def settings_conflict(saved: dict, config: TrainConfig, source) -> None:
    """Raises ConfigError unless the run saved in source (its run_identity) had config's settings."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"--resume: {source} was written by another version of reclora (run format "
            f"{saved.get('format') if isinstance(saved, dict) else None}, expected {CHECKPOINT_FORMAT}); "
            "start afresh with --overwrite"
        )
    changed = config.settings_changed_since(saved["settings"])
    if changed:
        raise ConfigError(
            f"--resume: {source} was written with other settings (saved, now): {changed}; resume "
            "with the same settings or start afresh with --overwrite"
        )


def data_conflict(saved: dict, dataset, source) -> None:
    """Raises ConfigError unless the run saved in source was trained on dataset's exact content."""
    if saved["data"] != dataset.fingerprint:
        raise ConfigError(
            f"--resume: {source} was trained on other data (the content of {dataset.name} changed: "
            f"fingerprint {saved['data']} then, {dataset.fingerprint} now); restore that data or start "
            "afresh with --overwrite"
        )


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class _Loss(nn.Module):
    """The module DDP wraps: a micro-batch's summed loss, scaled (see the module docstring)."""

    def __init__(self, model: RecLoRAModel):
        super().__init__()
        self.model = model

    def forward(self, batch, scale):
        if batch is None:  # no samples for this process in this micro-step: it still joins the all-reduce
            return sum(p.sum() for p in self.model.trainable_parameters()) * 0.0
        return self.model.loss(batch) * (len(batch["label"]) * scale)


@dataclass
class TrainingState:
    step: int = 0
    history: list = field(default_factory=list)  # one row per validation
    best_auc: float = -math.inf
    best_step: int = 0
    best_adapters: dict = None
    stale: int = 0  # validations since the best one
    stopped_early: bool = False
    loss_sum: float = 0.0  # since the last validation
    loss_samples: int = 0
    train_seconds: float = 0.0
    trained_samples: int = 0


def trainable_state(model: RecLoRAModel) -> dict:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: RecLoRAModel, state: dict) -> None:
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        raise ValueError(
            f"the checkpoint's adapters do not match the model: {sorted(set(parameters) ^ set(state))[:5]}"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def autocast(config: TrainConfig, device: torch.device):
    if config.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(
    model: RecLoRAModel,
    samples: np.ndarray,
    config: TrainConfig,
    processes: Processes,
    desc: str,
    score=None,
    columns: int = 0,
) -> np.ndarray:
    """P(Yes) for samples, in order (each process scores its shard; every process gets all); or what
    score(batch) gives instead of model.yes_probability, (B, columns) when columns. Batches hold
    prompts of similar length (length_sorted_batches), not consecutive samples."""
    score = score or model.yes_probability
    was_training = model.training
    model.eval()
    mine = processes.shard(samples)
    out = np.zeros((len(mine), columns) if columns else len(mine))
    bar = progress_bar(
        total=len(mine), desc=desc, unit="sample", disable=not (config.progress and processes.is_main), leave=False
    )

    def token_ids_of(rows):
        return model.prompt_token_ids(mine[rows])

    for rows, token_ids in length_sorted_batches(len(mine), token_ids_of, config.eval_batch_size):
        batch = model.prepare(mine[rows], token_ids)
        with autocast(config, processes.device):
            out[rows] = score(batch).double().cpu().numpy()
        bar.update(len(rows))
    bar.close()
    model.train(was_training)
    return processes.gather(out)


def evaluate(model, samples, config, processes, desc) -> tuple[dict, np.ndarray]:
    """(metrics with the seconds taken, P(Yes) per sample)."""
    data = model.dataset.samples
    start = time.perf_counter()
    probs = predict(model, samples, config, processes, desc)
    metrics = ctr_metrics(data.label[samples], probs, users=data.user[samples])
    return dict(metrics, seconds=time.perf_counter() - start, samples=len(samples)), probs


def _parameter_groups(model: RecLoRAModel, config: TrainConfig) -> list[dict]:
    """One AdamW group, or two when --gate-lr gives the gates a learning rate of their own."""
    gates = model.gate_parameters() if config.gate_lr is not None else []
    gate_ids = {id(p) for p in gates}
    groups = [{"params": [p for p in model.trainable_parameters() if id(p) not in gate_ids]}]
    if gates:
        groups.append({"params": gates, "lr": config.gate_lr})
    return groups


class Trainer:
    def __init__(
        self,
        model: RecLoRAModel,
        config: TrainConfig,
        train_samples: np.ndarray,
        valid_samples: np.ndarray,
        processes: Processes,
        run: RunDirectory,
        log=print,
    ):
        self.model, self.config, self.processes, self.run, self.log = model, config, processes, run, log
        config.check_micro_batch(processes.world_size)
        self.train_samples, self.valid_samples = train_samples, valid_samples
        self.steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.parameters = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            _parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.loss_module = _Loss(model)
        if processes.distributed:
            device_ids = [processes.device.index] if processes.device.type == "cuda" else None
            self.loss_module = DistributedDataParallel(self.loss_module, device_ids=device_ids)
        self.state = TrainingState()
        self.saved_step = "none written yet"
        # Validations at evenly spaced steps of each epoch, the last at its end.
        per_epoch = np.linspace(0, self.steps_per_epoch, config.evals_per_epoch + 1).round().astype(int)[1:]
        self.validation_steps = {e * self.steps_per_epoch + s for e in range(config.epochs) for s in per_epoch if s > 0}

    def _lr_factor(self, step: int) -> float:
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.processes.is_main:
            save_torch(
                self.run.checkpoint,
                {
                    "identity": run_identity(self.config, self.model.dataset),
                    "adapters": trainable_state(self.model),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "state": self.state.__dict__,
                },
            )
        self.saved_step = self.state.step
        self.processes.barrier()

    def restore(self, checkpoint: dict) -> None:
        """Continues from a checkpoint whose identity the pipeline has checked."""
        load_trainable_state(self.model, checkpoint["adapters"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = TrainingState(**checkpoint["state"])
        self.saved_step = self.state.step
        self.log(f"resumed from {self.run.checkpoint} at optimizer step {self.state.step} of {self.total_steps}")

    # -- one optimizer step -------------------------------------------------------------------
    def batch_of_step(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(self.train_samples)
        return order[index * self.config.batch_size : (index + 1) * self.config.batch_size]

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns the batch's mean loss over all processes, and its size."""
        config, processes = self.config, self.processes
        torch.manual_seed(hash((config.seed, step, processes.rank)) % 2**62)  # dropout masks independent of resume
        batch = self.batch_of_step(step)
        pieces = np.array_split(batch, processes.world_size * config.grad_accum)
        mine = pieces[processes.rank * config.grad_accum : (processes.rank + 1) * config.grad_accum]
        scale = processes.world_size / len(batch)
        loss_sum = 0.0
        for index, samples in enumerate(mine):
            last = index == len(mine) - 1
            sync = contextlib.nullcontext() if last or not processes.distributed else self.loss_module.no_sync()
            with sync:
                inputs = self.model.prepare(samples) if len(samples) else None
                with autocast(config, processes.device):
                    loss = self.loss_module(inputs, scale)
                loss.backward()
            loss_sum += loss.item() / scale
        mean_loss = processes.sum(loss_sum) / len(batch)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"the training loss became {mean_loss} at optimizer step {step + 1}; no update was applied. "
                f"The last good checkpoint is {self.run.checkpoint} (step {self.saved_step}). "
                "Lower --lr, set --max-grad-norm, or check the data."
            )
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, len(batch)

    # -- the loop -----------------------------------------------------------------------------
    def validate(self) -> dict:
        state = self.state
        metrics, _ = evaluate(self.model, self.valid_samples, self.config, self.processes, "validate")
        row = {
            "epoch": math.ceil(state.step / self.steps_per_epoch),
            "step": state.step,
            "train_loss": state.loss_sum / max(1, state.loss_samples),
            "lr": self.scheduler.get_last_lr()[0],
            **{f"valid_{k}": v for k, v in metrics.items()},
            "train_seconds": state.train_seconds,
        }
        state.history.append(row)
        state.loss_sum, state.loss_samples = 0.0, 0
        self.log(
            f"step {state.step}/{self.total_steps} epoch {row['epoch']} train loss {row['train_loss']:.6f} "
            f"valid {format_metrics(metrics)}"
        )
        if metrics["auc"] > state.best_auc:
            state.best_auc, state.best_step, state.stale = metrics["auc"], state.step, 0
            state.best_adapters = trainable_state(self.model)
        else:
            state.stale += 1
            if state.stale > self.config.patience:
                state.stopped_early = True
                self.log(
                    f"early stop: validation AUC has not improved for {state.stale} validations "
                    f"(best {state.best_auc:.6f} at step {state.best_step})"
                )
        if self.processes.is_main:
            self.run.write_metrics(state.history)
        return row

    def fit(self) -> TrainingState:
        """Trains to the end (or early stop) and leaves the best validated adapters in the model."""
        state, config = self.state, self.config
        self.model.train()
        bar = progress_bar(
            total=self.total_steps,
            initial=state.step,
            desc="LLM tuning",
            unit="step",
            disable=not (config.progress and self.processes.is_main),
        )
        while state.step < self.total_steps and not state.stopped_early:
            start = time.perf_counter()
            loss, batch_size = self.train_step(state.step)
            state.step += 1
            state.loss_sum += loss * batch_size
            state.loss_samples += batch_size
            state.trained_samples += batch_size
            state.train_seconds += time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            validated = state.step in self.validation_steps
            if validated:
                self.validate()
            if validated or state.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if state.best_adapters is not None:
            load_trainable_state(self.model, state.best_adapters)
        return state
