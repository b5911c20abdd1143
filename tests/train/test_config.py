"""The settings' rules live beside their help text, in each field's metadata: none can be forgotten."""

import math
import re

import pytest

from reclora.crm import KINDS as CRMS
from reclora.data import SOURCES
from reclora.methods import ALL_PROJECTIONS, CRM_METHODS, GATE_INPUTS, LLM_METHODS, METHODS, PUBLISHED_PROJECTIONS
from reclora.train import ConfigError, make_config
from reclora.train.config import FIELDS, Bound

NUMERIC = [name for name, f in FIELDS.items() if f.type in ("int", "float", "Optional[int]", "Optional[float]")]


def test_every_numeric_setting_declares_its_bound():
    assert len(NUMERIC) > 25
    for name in NUMERIC:
        assert isinstance(FIELDS[name].metadata["bound"], Bound), name
        assert FIELDS[name].metadata["bound"].admits(FIELDS[name].default if FIELDS[name].default is not None else 1)


@pytest.mark.parametrize("name", NUMERIC)
def test_a_value_outside_the_bound_is_named(name):
    bound = FIELDS[name].metadata["bound"]
    outside = [bound.low if bound.low_open else bound.low - 1, math.nan]
    if bound.high is not None:
        outside.append(bound.high)
    for value in outside:
        if FIELDS[name].type in ("int", "Optional[int]") and value != value:
            continue  # an int setting is never NaN
        with pytest.raises(ConfigError, match=re.escape(f"--{name.replace('_', '-')} must be {bound}, got {value}")):
            make_config({name: value})


def test_bounds_read_as_they_check():
    assert str(Bound(1)) == ">= 1" and str(Bound(0, low_open=True)) == "> 0" and str(Bound(0, high=1)) == "in [0, 1)"
    assert Bound(0, high=1).admits(0) and not Bound(0, high=1).admits(1) and not Bound(0, low_open=True).admits(0)


def test_the_choices_come_from_their_owners():
    assert list(FIELDS["method"].metadata["choices"]) == list(METHODS)
    assert list(FIELDS["dataset"].metadata["choices"]) == list(SOURCES)
    assert list(CRM_METHODS) == list(CRMS) and set(FIELDS["crm"].metadata["choices"]) == set(CRMS)
    assert FIELDS["gate_input"].metadata["choices"] == GATE_INPUTS


def test_the_default_loss_is_the_centered_one_and_published_keeps_its_own():
    from reclora.readout import DEFAULT_LOSS, LOSSES
    from reclora.train.config import config_from_args

    assert DEFAULT_LOSS == "yes-no-centered" and FIELDS["loss"].default == DEFAULT_LOSS
    assert FIELDS["loss"].metadata["choices"] == LOSSES
    assert config_from_args(["--config", "configs/published.yaml"]).loss == "answer-ce"


def test_each_method_adapts_its_own_default_projections():
    """The tuned methods adapt every projection of a layer (issue 16 parts 11, 12 and 18), an untuned
    one names the paper's q and v; an explicit --target-modules wins, and the stored config holds the
    list the run used."""
    for name in ("lora", "rella", "reclora"):
        assert make_config({"method": name}).target_modules == list(ALL_PROJECTIONS)
    assert make_config({"method": "zero-shot"}).target_modules == list(PUBLISHED_PROJECTIONS)
    chosen = make_config({"method": "lora", "target_modules": ["q_proj", "v_proj"]})
    assert chosen.target_modules == ["q_proj", "v_proj"] == chosen.to_dict()["target_modules"]
    with pytest.raises(ConfigError, match="--method"):
        make_config({"method": "no-such-method"})


def test_reclora_gates_read_the_crm_without_a_layernorm_by_default():
    """reclora's gates drop their input LayerNorm (issue 16 part 16), every other method keeps the
    published one; --gate-input-norm wins; configs/published.yaml restores the paper's gates."""
    from reclora.train.config import config_from_args

    assert make_config({"method": "reclora"}).gate_input_norm == "none"
    for name in ("lora", "rella", "zero-shot", "sim"):
        assert make_config({"method": name}).gate_input_norm == "layer"
    assert make_config({"method": "reclora", "gate_input_norm": "layer"}).to_dict()["gate_input_norm"] == "layer"
    assert config_from_args(["--config", "configs/published.yaml"]).gate_input_norm == "layer"


def test_a_run_saved_before_a_default_changed_keeps_what_it_ran_with():
    """A reclora run written before --gate-input-norm existed had the LayerNorm: its saved settings
    read back with it, so resuming it with today's default is a change of setting, and a setting
    absent without a changed default counts as its default."""
    from reclora.train.config import as_stored, completed_settings

    saved = as_stored(make_config({"method": "reclora"}).run_fingerprint())
    del saved["gate_input_norm"], saved["gate_lr"]
    assert completed_settings(saved)["gate_input_norm"] == "layer"
    assert make_config(completed_settings(saved)).gate_input_norm == "layer"
    now = make_config({"method": "reclora"})
    assert now.settings_changed_since(saved) == {"gate_input_norm": ("layer", "none")}
    assert make_config({"method": "reclora", "gate_input_norm": "layer"}).settings_changed_since(saved) == {}


def test_the_centered_loss_refuses_micro_batches_of_one():
    from reclora.train.config import config_from_args

    with pytest.raises(ConfigError, match="at least 2 samples per micro-batch.*got 4 / \\(1 x 4\\)"):
        config_from_args(["--method", "lora", "--batch-size", "4", "--grad-accum", "4"])
    config = config_from_args(["--method", "lora", "--batch-size", "4", "--grad-accum", "2"])
    with pytest.raises(ConfigError, match="got 4 / \\(2 x 2\\)"):
        config.check_micro_batch(processes=2)  # each of 2 DDP processes would get 1 sample per micro-step
    config_from_args(["--method", "lora", "--batch-size", "4", "--grad-accum", "4", "--loss", "yes-no"])
    config_from_args(["--method", "sim", "--batch-size", "1"])  # no LLM, no loss


def test_crm_residual_loads_the_crm_and_needs_a_margin_loss():
    from reclora.train.config import config_from_args

    assert config_from_args(["--method", "lora", "--crm-residual"]).needs_crm
    assert not config_from_args(["--method", "lora"]).needs_crm
    assert config_from_args(["--method", "reclora", "--gate-input", "uniform", "--crm-residual"]).needs_crm
    with pytest.raises(ConfigError, match="--crm-residual .*--loss must be one of.*got 'answer-ce'"):
        config_from_args(["--method", "reclora", "--crm-residual", "--loss", "answer-ce"])
    with pytest.raises(ConfigError, match="--crm-residual needs a tuned LLM method"):
        config_from_args(["--method", "zero-shot", "--crm-residual"])


def test_crm_fusion_loads_the_crm_for_a_tuned_method():
    from reclora.train.config import config_from_args

    assert not config_from_args(["--method", "lora"]).needs_crm
    assert config_from_args(["--method", "lora", "--crm-fusion"]).needs_crm
    assert config_from_args(["--method", "rella", "--crm-fusion", "--loss", "answer-ce"]).needs_crm
    with pytest.raises(ConfigError, match="--crm-fusion needs a tuned LLM method"):
        config_from_args(["--method", "zero-shot", "--crm-fusion"])
    with pytest.raises(ConfigError, match="--crm-fusion and --crm-residual .* give one of them"):
        config_from_args(["--method", "lora", "--crm-fusion", "--crm-residual"])
    with pytest.raises(ConfigError, match="--crm-holdout .*with --train-size 0"):
        config_from_args(["--method", "reclora", "--crm-holdout", "--train-size", "0"])
    for options in (["--crm-holdout", "--train-size", "100"], ["--train-size", "0"]):
        with pytest.raises(ConfigError, match="--crm-holdout-users .*needs --train-size, and replaces --crm-holdout"):
            config_from_args(["--method", "reclora", "--crm-holdout-users", *options])


def test_what_each_method_is_made_of():
    made_of = {
        name: (m.llm, m.adapters, m.needs_crm("crm"), m.needs_crm("user-embedding")) for name, m in METHODS.items()
    }
    assert made_of == {
        "reclora": (True, "gated", True, False),
        "lora": (True, "shared", False, False),
        "rella": (True, "shared", False, False),
        "zero-shot": (True, None, False, False),
        **{crm: (False, None, True, True) for crm in CRMS},
    }
    assert {name: m.prompt_history for name, m in LLM_METHODS.items()} == {
        "reclora": "semantic",
        "lora": "recent",
        "rella": "semantic",
        "zero-shot": "semantic",
    }
    assert make_config({"method": "lora"}).history_strategy == "recent"
    assert make_config({"method": "lora", "prompt_history": "semantic"}).history_strategy == "semantic"


def test_a_crm_alone_trains_that_crm():
    assert make_config({"method": "gru4rec", "crm": "sim"}).crm == "gru4rec"
    assert make_config({"method": "reclora", "crm": "sasrec"}).crm == "sasrec"


def test_the_data_directory_may_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("RECLORA_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="--dataset ml-100k: .*--data-dir.*RECLORA_DATA_DIR"):
        make_config({"dataset": "ml-100k"})
    monkeypatch.setenv("RECLORA_DATA_DIR", str(tmp_path))
    assert make_config({"dataset": "ml-100k"}).data_dir is None  # load_dataset reads $RECLORA_DATA_DIR/ml-100k
    with pytest.raises(ConfigError, match="generated: it takes no data_dir"):
        make_config({"dataset": "synthetic", "data_dir": str(tmp_path)})


def test_published_settings_load_and_hold_the_papers_values():
    """configs/published.yaml: every key a known setting; the paper's ML-1M recipe (../shared/docs/RECLORA.md)."""
    from reclora.train.config import config_from_args

    config = config_from_args(["--config", "configs/published.yaml"])
    expected = dict(
        method="reclora",
        num_loras=16,
        rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        temperature=5.0,
        mix="weight",
        gate_hidden=60,
        target_modules=["q_proj", "v_proj"],
        k_short=10,
        k_long=60,
        epochs=1,
        batch_size=256,
        lr=1e-3,
        weight_decay=0.0,
        loss="answer-ce",
        rating_format="stars",
    )
    assert {name: getattr(config, name) for name in expected} == expected
