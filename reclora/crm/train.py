"""Stage 1 of Few2Many: train the CRM on the training split (BCE), early stopping on valid AUC."""

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from reclora.crm.features import CrmInputs
from reclora.metrics import ctr_metrics, format_metrics
from reclora.progress import progress_bar


@dataclass
class CrmTrainConfig:
    epochs: int = 5
    batch_size: int = 256
    eval_batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 1  # epochs without a better valid AUC before stopping
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@torch.no_grad()
def predict(model, inputs: CrmInputs, samples, config: CrmTrainConfig, desc="predict") -> np.ndarray:
    """P(click) for each sample index, in order: (n,) float64."""
    model.eval()
    out = []
    batches = range(0, len(samples), config.eval_batch_size)
    for start in progress_bar(batches, desc=desc, disable=not config.progress, leave=False):
        batch = inputs.batch(samples[start : start + config.eval_batch_size], config.device)
        out.append(torch.sigmoid(model(batch)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate(model, inputs: CrmInputs, split: str, config: CrmTrainConfig) -> dict:
    samples = inputs.dataset.split(split)
    probs = predict(model, inputs, samples, config, desc=f"eval {split}")
    data = inputs.dataset.samples
    return ctr_metrics(data.label[samples], probs, users=data.user[samples])


def train_crm(model, inputs: CrmInputs, config: CrmTrainConfig, log=print, samples=None) -> dict:
    """Trains in place on samples (default: the whole training split) and leaves the best epoch's
    weights (by valid AUC) in the model.

    Returns {"epochs": [per-epoch metrics], "best_epoch", "valid", "test", "train_seconds"}.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train = inputs.dataset.split("train") if samples is None else np.asarray(samples)
    history, best_auc, best_state, stale = [], -1.0, None, 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = rng.permutation(train)
        losses = []
        batches = range(0, len(order), config.batch_size)
        bar = progress_bar(batches, desc=f"CRM epoch {epoch}", disable=not config.progress)
        for first in bar:
            batch = inputs.batch(order[first : first + config.batch_size], config.device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        valid = evaluate(model, inputs, "valid", config)
        history.append(
            {"epoch": epoch, "train_loss": float(np.mean(losses)), **{f"valid_{k}": v for k, v in valid.items()}}
        )
        log(f"epoch {epoch} train loss {np.mean(losses):.6f} valid {format_metrics(valid)}")
        if valid["auc"] > best_auc:
            best_auc, best_state, stale = valid["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale > config.patience:
                log(f"early stop: valid AUC did not improve for {stale} epochs")
                break
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h["valid_auc"])["epoch"]
    result = {
        "epochs": history,
        "best_epoch": best_epoch,
        "valid": evaluate(model, inputs, "valid", config),
        "test": evaluate(model, inputs, "test", config),
        "train_seconds": train_seconds,
    }
    log(f"best epoch {best_epoch}; test {format_metrics(result['test'])}")
    return result
