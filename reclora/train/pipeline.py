"""`run(config)`: the whole Few2Many pipeline, from data to results.json; what the CLI calls."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time

import numpy as np
import torch

import reclora_kernels
from reclora.adapters import AdapterConfig
from reclora.crm.train import CrmTrainConfig
from reclora.crm.train import predict as crm_predict
from reclora.data import load_dataset
from reclora.files import cache_folder, write_json
from reclora.fusion import choose_weight, fused_logit
from reclora.item_embeddings import item_embeddings
from reclora.llm import TINY_LLAMA, compile_decoder_layers, load_llm
from reclora.metrics import ctr_metrics, format_metrics
from reclora.model import RecLoRAModel
from reclora.retriever import LongShortRetriever
from reclora.train import distributed
from reclora.train.config import ConfigError, TrainConfig
from reclora.train.crm_stage import prepare_crm
from reclora.train.loop import Trainer, data_conflict, evaluate, predict, run_identity, settings_conflict
from reclora.train.outputs import RunDirectory, RunInUse
from reclora_kernels.cpu_features import cpu_model

GAUC_WEIGHTING = "mean of per-user AUCs weighted by each user's number of evaluated samples (users with both labels)"


def subsets(config: TrainConfig, dataset) -> dict:
    """The seeded random subsets: LLM training (train_size, by seed), validation and test (by eval_seed).

    Methods that tune no LLM get the whole training split (the CRM trains on all of it).
    """
    sizes = {
        "train": config.train_size if config.method_row.tuned else 0,
        "valid": config.eval_size if config.valid_size is None else config.valid_size,
        "test": config.eval_size,
    }
    out = {}
    for offset, (split, size) in enumerate(sizes.items()):
        seed = config.seed if split == "train" else config.eval_seed
        samples = dataset.split(split)
        if not len(samples):
            raise ConfigError(
                f"the data is too small: the {split} split of {dataset.name} is empty ({len(dataset):,} samples in "
                f"all: {dataset.split_sizes}; a sample needs {dataset.config.get('min_history')} earlier "
                "interactions of its user); use data with more users or interactions"
            )
        if size > len(samples):
            option = {"train": "--train-size", "valid": "--valid-size", "test": "--eval-size"}[split]
            raise ConfigError(
                f"{option} {size} is larger than the {split} split ({len(samples):,} samples); "
                f"use at most {len(samples)} or 0 for all of it"
            )
        if split == "train" and size and config.crm_holdout_users:
            samples = held_out_users_samples(config, dataset)
        if size and size < len(samples):
            samples = np.sort(np.random.default_rng([seed, offset]).choice(samples, size, replace=False))
        out[split] = samples
    return out


# --crm-holdout-users: the held-out users' training samples, as a multiple of --train-size (about
# 1 in 10 of ML-100K's training split at 2,000, 8,018 samples of 71 of its 750 users at seed 0).
HELD_OUT_USERS_POOL = 4


def held_out_users_samples(config: TrainConfig, dataset):
    """--crm-holdout-users: every training sample of the users drawn (by --seed) until they hold
    HELD_OUT_USERS_POOL x --train-size samples; the LLM's subset is drawn from them."""
    train = dataset.split("train")
    users = dataset.samples.user[train]
    present, counts = np.unique(users, return_counts=True)
    order = np.random.default_rng([config.seed, 2]).permutation(len(present))
    enough = np.searchsorted(np.cumsum(counts[order]), HELD_OUT_USERS_POOL * config.train_size) + 1
    if enough >= len(present):
        raise ConfigError(
            f"--crm-holdout-users holds out users with {HELD_OUT_USERS_POOL} x --train-size = "
            f"{HELD_OUT_USERS_POOL * config.train_size:,} training samples, which would leave the CRM no user "
            f"(the training split has {len(train):,} samples of {len(present):,} users); lower --train-size"
        )
    return train[np.isin(users, present[order[:enough]])]


def crm_held_out(config: TrainConfig, dataset):
    """The training samples the CRM must not train on, drawn as an LLM run at --train-size and --seed
    draws them (for a CRM method too): --crm-holdout, the LLM's subset; --crm-holdout-users, every
    sample of its users. None without either."""
    if config.crm_holdout_users:
        return held_out_users_samples(config, dataset)
    if not config.crm_holdout:
        return None
    as_llm_run = dataclasses.replace(config, method="reclora")
    return subsets(as_llm_run, dataset)["train"]


def run(config: TrainConfig, log=None) -> dict:
    """Runs the pipeline config describes (see reclora.train.config) and returns results.json's content."""
    config = dataclasses.replace(config).validate()
    processes = distributed.start(config.device)
    try:
        results = _run(config, processes, log or _logger(processes))
        # Every rank finishes before any tears the group down: a gloo rank whose peer has already
        # left can abort in its teardown. Only on success, so a failing rank never waits here.
        processes.barrier()
        return results
    finally:
        distributed.stop()


def _logger(processes):
    def log(line):
        if processes.is_main:
            print(line, flush=True)

    return log


def _run(config: TrainConfig, processes, log) -> dict:
    run_dir = RunDirectory(config.output_dir)
    with _locked(run_dir, processes):
        return _run_locked(config, processes, run_dir, log)


@contextlib.contextmanager
def _locked(run_dir: RunDirectory, processes):
    """Rank 0 holds the run folder's lock; every rank fails alike when another run has it."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if processes.is_main:
            try:
                stack.enter_context(run_dir.locked())
            except RunInUse as error:
                refusal = error
        if processes.sum(float(refusal is not None)):
            raise refusal or RunInUse(f"--out {run_dir.path} is in use by another run")
        yield


def _run_locked(config: TrainConfig, processes, run_dir: RunDirectory, log) -> dict:
    """The pipeline; nothing is written into the run folder until the settings, data and earlier run check out."""
    started = time.perf_counter()
    if run_dir.holds_a_run() and not (config.resume or config.overwrite):
        raise ConfigError(
            f"--out {run_dir.path} holds an earlier run: pass --resume to continue it or --overwrite "
            "to start afresh (or choose another --out)"
        )
    earlier = _earlier_run(config, run_dir)
    if earlier is not None:
        settings_conflict(earlier["identity"], config, earlier["source"])
    seconds = {}
    stage = time.perf_counter()
    dataset = load_run_dataset(config, progress=config.progress and processes.is_main)
    parts = subsets(config, dataset)
    seconds["data"] = time.perf_counter() - stage
    if earlier is not None:
        data_conflict(earlier["identity"], dataset, earlier["source"])
        if "results" in earlier:
            log(f"--resume: the run in {run_dir.path} has finished; its results are in {run_dir.results}")
            return earlier["results"]
    if processes.is_main:  # only now that the settings and data are known to be good
        if config.overwrite:
            run_dir.clear()
        write_json(run_dir.config, config.to_dict())
    processes.barrier()
    log(
        f"{dataset.name}: {len(dataset):,} samples ({dataset.split_sizes}); LLM training subset "
        f"{len(parts['train']):,}, validation {len(parts['valid']):,}, test {len(parts['test']):,}"
    )

    crm = inputs = crm_info = None
    stage = time.perf_counter()
    if config.needs_crm:
        crm, inputs, crm_info = prepare_crm(config, dataset, run_dir.crm, processes, log, crm_held_out(config, dataset))
    seconds["crm"] = time.perf_counter() - stage

    if config.is_llm_method:
        checkpoint = None if earlier is None else earlier.get("checkpoint")
        results = _llm_stage(config, dataset, parts, crm, inputs, processes, run_dir, log, seconds, checkpoint)
    else:
        results = _crm_results(config, crm, inputs, parts, crm_info, processes, run_dir, log, seconds)
    results.update(_run_facts(config, dataset, parts, processes, crm_info, seconds, time.perf_counter() - started))
    log(f"test ({len(parts['test']):,} samples) {format_metrics(results)}")
    if processes.is_main:
        write_json(run_dir.results, results)
        run_dir.append_csv_row(results)
        log(f"results: {run_dir.results}")
    return results


def _earlier_run(config: TrainConfig, run_dir: RunDirectory):
    """With --resume, what the run folder holds: {identity, source, and results (finished) or checkpoint}."""
    if not config.resume:
        return None
    if run_dir.results.exists():
        results = run_dir.load_results()
        return {"identity": results.get("identity"), "source": run_dir.results, "results": results}
    if config.is_llm_method and run_dir.checkpoint.exists():
        checkpoint = run_dir.load_checkpoint()
        return {"identity": checkpoint.get("identity"), "source": run_dir.checkpoint, "checkpoint": checkpoint}
    return None


def _llm_stage(config, dataset, parts, crm, inputs, processes, run_dir, log, seconds, checkpoint) -> dict:
    stage = time.perf_counter()
    model = build_model(config, dataset, crm, inputs, processes.device)
    if config.compile:
        log(f"--compile: {len(model.backbone.get_decoder().layers)} decoder layers, compiled on first use")
    seconds["model"] = time.perf_counter() - stage
    results = {"trainable_parameters": sum(p.numel() for p in model.trainable_parameters())}
    if config.method_row.tuned:
        trainer = Trainer(model, config, parts["train"], parts["valid"], processes, run_dir, log)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        elif config.resume:
            log(f"--resume: no checkpoint in {run_dir.path}, starting from the beginning")
        state = trainer.fit()
        seconds["train"] = state.train_seconds
        best = max(state.history, key=lambda row: row["valid_auc"])
        results.update(
            best_step=state.best_step,
            stopped_early=state.stopped_early,
            epochs=state.history,
            train_samples_seen=state.trained_samples,
            train_samples_per_second=state.trained_samples / max(state.train_seconds, 1e-9),
            **{k: v for k, v in best.items() if k.startswith("valid_")},
        )
        if processes.is_main:
            run_dir.plot_curve(state.history, f"{config.method} on {config.dataset} ({config.llm})")
    if config.crm_fusion:
        results["crm_fusion"] = choose_fusion(model, parts["valid"], config, processes)
        log(
            f"--crm-fusion: weight {model.fusion_weight} on the LLM's margin, chosen on validation (AUC "
            f"{results['crm_fusion']['auc']:.4f}; the LLM alone {results['crm_fusion']['grid_auc'][-1]:.4f}, "
            f"the CRM alone {results['crm_fusion']['grid_auc'][0]:.4f})"
        )
        metrics, probs = evaluate_fused(model, parts["test"], config, processes)
        labels, users = dataset.samples.label[parts["test"]], dataset.samples.user[parts["test"]]
        results["crm_fusion"]["test_alone"] = {
            part: ctr_metrics(labels, probs[f"{part}_prob"], users=users) for part in ("llm", "crm")
        }
    else:
        metrics, probs = evaluate(model, parts["test"], config, processes, "test")
        probs = {"prob": probs}
    seconds["eval"] = metrics.pop("seconds")
    results.update(metrics, eval_samples_per_second=len(parts["test"]) / max(seconds["eval"], 1e-9))
    if processes.is_main:
        run_dir.write_predictions(dataset, parts["test"], **probs)
    return results


def _readout_logits(model: RecLoRAModel):
    return lambda batch: torch.stack(model.readout_logits(batch), dim=1)  # (B, 2): the LLM's margin, the CRM's logit


def choose_fusion(model: RecLoRAModel, valid: np.ndarray, config: TrainConfig, processes) -> dict:
    """--crm-fusion: the weight of the LLM's margin against the CRM's logit with the best validation AUC
    (reclora.fusion.choose_weight), left in the model; {weight, auc, grid, grid_auc}."""
    logits = predict(model, valid, config, processes, "fusion (valid)", score=_readout_logits(model), columns=2)
    choice = choose_weight(model.dataset.samples.label[valid], logits[:, 0], logits[:, 1])
    model.fusion_weight = choice["weight"]
    return choice


def evaluate_fused(model: RecLoRAModel, samples: np.ndarray, config: TrainConfig, processes) -> tuple:
    """(the fused readout's metrics with the seconds taken, {prob: its P(Yes), llm_prob and crm_prob:
    each logit's alone}) from one pass over samples."""
    data, start = model.dataset.samples, time.perf_counter()
    llm, crm = predict(model, samples, config, processes, "test", score=_readout_logits(model), columns=2).T
    seconds = time.perf_counter() - start
    probs = {
        name: 1 / (1 + np.exp(-logit))
        for name, logit in (("prob", fused_logit(llm, crm, model.fusion_weight)), ("llm_prob", llm), ("crm_prob", crm))
    }
    metrics = ctr_metrics(data.label[samples], probs["prob"], users=data.user[samples])
    return dict(metrics, seconds=seconds, samples=len(samples)), probs


def build_model(config: TrainConfig, dataset, crm, inputs, device) -> RecLoRAModel:
    """The LLM, item embeddings, retriever and adapters a method needs, seeded by config.seed."""
    llm, tokenizer = load_llm(config.llm, device=device, cache_dir=config.cache_dir, seed=config.seed)
    # tiny-llama's weights are drawn from the seed: its embeddings are cached per seed
    model_name = f"{config.llm} seed {config.seed}" if config.llm == TINY_LLAMA else config.llm
    embeddings = item_embeddings(
        dataset,
        config.embedder,
        model=llm,
        tokenizer=tokenizer,
        model_name=model_name,
        cache_dir=cache_folder("embeddings", config.cache_dir),
        device=device,
        progress=config.progress,
    )
    retriever = LongShortRetriever(
        dataset, embeddings, config.k_long, config.k_short, config.history_strategy, backend=_retrieval_backend(config)
    )
    if config.grad_checkpointing:
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapters = AdapterConfig(
        target_modules=tuple(config.target_modules),
        num_loras=config.num_loras,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        mix=config.mix,
        gate_input_dim=config.crm_hidden,
        gate_hidden_dim=config.gate_hidden,
        gate_dropout=config.gate_dropout,
        gate_input_norm=config.gate_input_norm,
        temperature=config.temperature,
        backend=config.backend,
    )
    torch.manual_seed(config.seed)  # adapter and gate initialization
    model = RecLoRAModel(
        config.method,
        dataset,
        llm,
        tokenizer,
        retriever,
        crm,
        inputs,
        adapters,
        config.max_prompt_length,
        gate_input=config.gate_input,
        loss=config.loss,
        rating_format=config.rating_format,
        crm_residual=config.crm_residual,
        crm_fusion=config.crm_fusion,
    ).to(device)
    if config.compile:
        compile_decoder_layers(model.backbone)
    return model


def _retrieval_backend(config):
    """The retriever's tensors live on the CPU: a GPU backend named for the LoRA op does not apply."""
    return config.backend if config.backend in ("torch", "cpu") else None


def _crm_results(config, crm, inputs, parts, crm_info, processes, run_dir, log, seconds) -> dict:
    predict_config = CrmTrainConfig(device=str(processes.device), progress=False)
    data = inputs.dataset.samples
    start = time.perf_counter()
    probs = crm_predict(crm, inputs, parts["test"], predict_config)
    seconds["eval"] = time.perf_counter() - start
    seconds["train"] = crm_info["train_seconds"]
    if processes.is_main:
        run_dir.write_predictions(inputs.dataset, parts["test"], probs)
    valid = crm_predict(crm, inputs, parts["valid"], predict_config)
    valid_metrics = ctr_metrics(data.label[parts["valid"]], valid, users=data.user[parts["valid"]])
    return dict(
        ctr_metrics(data.label[parts["test"]], probs, users=data.user[parts["test"]]),
        **{f"valid_{k}": v for k, v in valid_metrics.items()},
        train_samples_per_second=crm_info["train_samples"]
        * len(crm_info["epochs"])
        / max(crm_info["train_seconds"], 1e-9),
        eval_samples_per_second=len(probs) / max(seconds["eval"], 1e-9),
        trainable_parameters=sum(p.numel() for p in crm.parameters()),
    )


def _run_facts(config, dataset, parts, processes, crm_info, seconds, total) -> dict:
    import transformers

    # what was trained on: a CRM alone, the whole split; an LLM, its subset, or nothing when untuned
    if not config.is_llm_method:
        train_size = crm_info["train_samples"]
    else:
        train_size = len(parts["train"]) if config.method_row.tuned else 0
    return {
        "method": config.method,
        "dataset": config.dataset,
        "llm": config.llm if config.is_llm_method else "",
        "seed": config.seed,
        "eval_seed": config.eval_seed,
        "train_size": train_size,
        "valid_size": len(parts["valid"]),
        "test_size": len(parts["test"]),
        "gauc_weighting": GAUC_WEIGHTING,
        "train_seconds": seconds.get("train", 0.0),
        "eval_seconds": seconds.get("eval", 0.0),
        "stage_seconds": seconds,
        "total_seconds": total,
        "device": _describe_device(processes.device),
        "world_size": processes.world_size,
        "torch_threads": torch.get_num_threads(),
        "crm": None
        if crm_info is None
        else {k: crm_info[k] for k in ("kind", "key", "cached", "best_epoch", "test", "train_seconds")},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "reclora_kernels": getattr(reclora_kernels, "__version__", ""),
        },
        "kernel_backends": {
            op: config.backend or reclora_kernels.default_backend(processes.device.type, op)
            for op in ("gated_lora", "retrieval")
        },
        "config": config.to_dict(),
        "identity": run_identity(config, dataset),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "out": str(config.output_dir),
    }


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # The model too: a run's speed (and whether --bf16 pays) depends on which CPU it had.
    return f"cpu ({os.cpu_count()} cores, {cpu_model()})"


def load_run_dataset(config: TrainConfig, progress: bool = False):
    """The dataset config names, through the cache."""
    return load_dataset(
        config.dataset,
        config.data_dir,
        cache_dir=cache_folder("datasets", config.cache_dir),
        progress=progress,
        **config.dataset_options,
    )
