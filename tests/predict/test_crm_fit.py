"""reclora.analysis.crm_fit on the tiny finished runs: the run's CRM on the LLM's samples and on new ones."""

import json

import pytest

from reclora.analysis import crm_fit


def test_the_crm_is_scored_on_the_llm_subset_and_on_validation(runs, tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert crm_fit.main([str(runs["reclora"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["crm"] == "sim" and result["crm_holdout"] is False
    assert result["llm_training_subset"]["samples"] == 24 and result["validation_subset"]["samples"] == 16
    assert result["validation_split"]["samples"] > result["validation_subset"]["samples"]
    assert all(0 <= result[name]["auc"] <= 1 for name in ("llm_training_subset", "validation_split"))
    assert "on the llm training subset (24)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lora", "sim"])
def test_runs_without_a_crm_or_an_llm_subset_are_refused(runs, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        crm_fit.main([str(runs[name])])
    assert exit_info.value.code == 2 and "without a CRM and an LLM training subset" in capsys.readouterr().err
