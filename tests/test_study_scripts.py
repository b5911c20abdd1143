"""The study commands: reclora.analysis.study on a hand-made study directory (intervals, seed
verdicts, ablations, plot), reclora.analysis.prompt_baseline on a tiny synthetic dataset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reclora.analysis import prompt_baseline
from reclora.analysis import study as summarize_study_module
from reclora.metrics import auc

N = 400


@pytest.fixture(scope="module")
def summarize_study():
    return summarize_study_module


def write_run(root: Path, name: str, method: str, quality: float, seed=0, train_size=2000, samples=None):
    """A finished run whose P(Yes) separates the labels by `quality` (0: chance)."""
    rng = np.random.default_rng([seed, int(quality * 1000), len(name)])
    label = np.random.default_rng(7).integers(0, 2, N)  # the shared test samples
    prob = 1 / (1 + np.exp(-(quality * (2 * label - 1) + rng.normal(size=N))))
    run = root / name
    run.mkdir(parents=True)
    np.savez(run / "predictions.npz", sample=np.arange(N) if samples is None else samples, label=label, prob=prob)
    results = dict(
        method=method,
        seed=seed,
        train_size=train_size,
        test_size=N,
        auc=auc(label, prob),
        logloss=0.6,
        accuracy=0.7,
        gauc=0.6,
        train_seconds=10.0,
        eval_seconds=2.0,
        train_samples_per_second=200.0,
        eval_samples_per_second=200.0,
        device="cpu (2 cores)",
    )
    (run / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for seed in range(3):
        write_run(root, f"reclora-seed{seed}", "reclora", 1.5, seed)
        write_run(root, f"lora-seed{seed}", "lora", 0.5, seed)
    write_run(root, "din", "din", 1.5, train_size=70000)
    write_run(root, "ablation-k1", "reclora", 0.5)
    write_run(root, "attempt-elsewhere", "reclora", 1.0, samples=np.arange(N) + 1)  # other test samples
    write_run(root, "attempt-sharp-seed1", "reclora", 3.0, seed=1)  # an attempt at another seed
    write_run(root, "curve-lora-500", "lora", 0.2, train_size=500)
    write_run(root, "curve-reclora-500", "reclora", 0.8, train_size=500)
    gates = {
        "num_loras": 16,
        "temperature": 5.0,
        **{when: dict(entropy=0.9, top=0.1, spread=0.05, usage=0.99) for when in ("initial", "trained")},
    }
    (root / "reclora-seed0" / "gates.json").write_text(json.dumps(gates))
    return root


def test_summary_of_a_study(summarize_study, study, tmp_path, capsys):
    out_json, out_plot = tmp_path / "summary.json", tmp_path / "plot.png"
    assert summarize_study.main([str(study), "--json", str(out_json), "--plot", str(out_plot)]) == 0
    summary = json.loads(out_json.read_text())
    runs = summary["runs"]
    for name, run in runs.items():
        low, high = run["auc_95"]
        assert low < run["auc"] < high, name
    assert "rank_correlation_with_sim" not in runs["din"]  # no sim run here
    assert set(summary["over_seeds"]) == {"reclora", "lora", "attempt-sharp"}
    assert summary["over_seeds"]["lora"]["auc_std"] > 0 and summary["over_seeds"]["attempt-sharp"]["auc_std"] is None
    versus = summary["reclora_vs"]
    assert versus["lora"]["larger_than_both"] is True and versus["lora"]["auc_difference"] > 0.1
    assert versus["din"]["paired_bootstrap_95"][0] < 0 < versus["din"]["paired_bootstrap_95"][1]
    assert versus["din"]["larger_than_both"] is False
    assert versus["attempt-sharp"]["auc_difference"] < 0 and versus["attempt-sharp"]["larger_than_both"] is None
    sharp_vs_din = summary["attempts_vs_crms"]["attempt-sharp"]["din"]  # an attempt over seeds against the CRMs
    assert sharp_vs_din["auc_difference"] > 0 and sharp_vs_din["larger_than_both"] is None
    # ablations and attempts: against reclora at their seed on the same samples; other samples are left out
    against = summary["against_reclora"]
    assert sorted(against) == ["ablation-k1", "attempt-sharp-seed1"]
    assert (
        against["ablation-k1"]["baseline"] == "reclora-seed0" and against["ablation-k1"]["paired_bootstrap_95"][1] < 0
    )
    sharp = against["attempt-sharp-seed1"]
    assert sharp["baseline"] == "reclora-seed1" and sharp["paired_bootstrap_95"][0] > 0
    assert sharp["auc_difference"] == pytest.approx(runs["attempt-sharp-seed1"]["auc"] - runs["reclora-seed1"]["auc"])
    few2many = summary["few2many"]
    assert few2many["seed0"]["reclora"] == [
        [500, runs["curve-reclora-500"]["auc"]],
        [2000, runs["reclora-seed0"]["auc"]],
    ]
    size, mean, sd = few2many["seed_mean"]["reclora"]
    assert size == 2000 and mean == pytest.approx(summary["over_seeds"]["reclora"]["auc_mean"]) and sd > 0
    assert set(few2many["crm"]) == {"din"}
    assert summary["gates"]["reclora-seed0"]["trained"]["spread"] == 0.05
    assert out_plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert (
        "| attempt-sharp vs din |" in printed
        and "| ablation-k1 |" in printed
        and "| reclora-seed0 | 16 | 5 |" in printed
    )
    assert "| reclora | 500 |" in printed and "| reclora | 2000 |" in printed


def test_the_recipe_against_the_published_runs_and_the_crms(summarize_study, tmp_path, capsys):
    for seed in range(2):
        write_run(tmp_path, f"lora-seed{seed}", "lora", 0.3, seed)
        write_run(tmp_path, f"recipe-lora-seed{seed}", "lora", 1.2, seed)
    write_run(tmp_path, "recipe-reclora-seed0", "reclora", 1.0)  # no published partner: the CRMs only
    write_run(tmp_path, "residual-reclora-seed0", "reclora", 1.8)  # paired with recipe-reclora-seed0
    write_run(tmp_path, "steps-lora-seed0", "lora", 1.4)  # paired with recipe-lora-seed0
    write_run(tmp_path, "sim", "sim", 1.5, train_size=70000)
    write_run(tmp_path, "recipe-curve-lora-8000", "lora", 1.6, train_size=8000)  # the recipe's larger budget
    assert summarize_study.main([str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    runs, versus = summary["runs"], summary["recipe_vs"]
    assert sorted(versus) == ["recipe-lora", "recipe-reclora", "residual-reclora", "steps-lora"]
    few2many = summary["few2many"]
    assert few2many["seed0"]["recipe-lora"] == [
        [2000, runs["recipe-lora-seed0"]["auc"]],
        [8000, runs["recipe-curve-lora-8000"]["auc"]],
    ]
    assert few2many["seed0"]["lora"] == [[2000, runs["lora-seed0"]["auc"]]]
    assert few2many["seed_mean"]["recipe-lora"][0] == 2000
    assert sorted(versus["residual-reclora"]) == ["recipe-reclora", "sim"]
    assert sorted(versus["steps-lora"]) == ["recipe-lora", "sim"]
    residual = versus["residual-reclora"]["recipe-reclora"]["auc_difference"]
    assert residual == pytest.approx(runs["residual-reclora-seed0"]["auc"] - runs["recipe-reclora-seed0"]["auc"])
    assert sorted(versus["recipe-lora"]) == ["lora", "sim"] and sorted(versus["recipe-reclora"]) == ["sim"]
    published = np.mean([runs[f"recipe-lora-seed{s}"]["auc"] - runs[f"lora-seed{s}"]["auc"] for s in range(2)])
    assert versus["recipe-lora"]["lora"]["auc_difference"] == pytest.approx(published)
    assert versus["recipe-lora"]["lora"]["auc_difference"] > 0 and versus["recipe-lora"]["sim"]["auc_difference"] < 0
    assert "| recipe-lora vs lora |" in capsys.readouterr().out


def test_one_seed_gives_no_verdict(summarize_study, tmp_path):
    write_run(tmp_path, "reclora-seed0", "reclora", 1.5)
    write_run(tmp_path, "lora-seed0", "lora", 0.5)
    summary = summarize_study.summarize(summarize_study.load_runs(tmp_path))
    assert summary["reclora_vs"]["lora"]["larger_than_both"] is None


def test_a_method_run_with_fewer_seeds_gives_no_verdict(summarize_study, tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"reclora-seed{seed}", "reclora", 1.5, seed)
    write_run(tmp_path, "rella-seed0", "rella", 0.5)
    summary = summarize_study.summarize(summarize_study.load_runs(tmp_path))
    assert summary["reclora_vs"]["rella"]["seed_spread"] is None
    assert summary["reclora_vs"]["rella"]["larger_than_both"] is None


def test_an_empty_directory_is_an_error(summarize_study, tmp_path, capsys):
    assert summarize_study.main([str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_rank_correlation_with_sim(summarize_study, tmp_path):
    write_run(tmp_path, "sim", "sim", 1.5, train_size=70000)
    write_run(tmp_path, "reclora-seed0", "reclora", 1.5)
    write_run(tmp_path, "elsewhere", "lora", 1.5, samples=np.arange(N) + 1)
    runs = summarize_study.summarize(summarize_study.load_runs(tmp_path))["runs"]
    assert runs["sim"]["rank_correlation_with_sim"] == pytest.approx(1)
    assert 0.3 < runs["reclora-seed0"]["rank_correlation_with_sim"] < 1  # both follow the labels, with own noise
    assert "rank_correlation_with_sim" not in runs["elsewhere"]  # other test samples


def test_prompt_baseline_scores_both_prompt_histories(tmp_path):
    from reclora.train import make_config
    from tests.train.helpers import tiny_settings

    config = make_config(tiny_settings(tmp_path, method="lora", eval_size=0))  # the whole test split
    result = prompt_baseline.prompt_baseline(config)
    assert result["test_size"] > 100 and result["k_short"] == 3
    for strategy in ("recent", "semantic"):
        assert 0 <= result[strategy]["mean_rating_auc"] <= 1 and 0 <= result[strategy]["positive_share_auc"] <= 1


def test_prompt_baseline_pairs_runs_with_the_mean_rating(tmp_path):
    from reclora.retriever import LongShortRetriever
    from reclora.train import make_config
    from reclora.train.outputs import RunDirectory
    from reclora.train.pipeline import load_run_dataset, subsets
    from tests.train.helpers import tiny_settings

    config = make_config(tiny_settings(tmp_path, method="lora", eval_size=40))
    dataset = load_run_dataset(config)
    test = subsets(config, dataset)["test"]
    short = LongShortRetriever(
        dataset, np.zeros((len(dataset.items.titles), 1), np.float32), config.k_long, config.k_short, "recent"
    )
    ratings = short.retrieve(test).short
    mean_rating = ratings.ratings.numpy().sum(1) / np.maximum(ratings.lengths.numpy(), 1)
    RunDirectory(tmp_path / "same").write_predictions(dataset, test, mean_rating)  # the baseline itself
    RunDirectory(tmp_path / "better").write_predictions(dataset, test, dataset.samples.label[test] + 0.0)
    # a --crm-fusion run: its LLM alone is paired with the mean rating too
    labels = dataset.samples.label[test] + 0.0
    RunDirectory(tmp_path / "fused").write_predictions(dataset, test, labels, llm_prob=mean_rating, crm_prob=labels)
    result = prompt_baseline.prompt_baseline(config, against=[tmp_path / name for name in ("same", "better", "fused")])
    same, better, fused = (result["recent"]["runs"][str(tmp_path / name)] for name in ("same", "better", "fused"))
    assert same["difference"] == 0 and same["interval"] == [0, 0] and "llm_alone" not in same
    assert fused["auc"] == 1 and fused["llm_alone"]["difference"] == 0 and fused["llm_alone"]["interval"] == [0, 0]
    assert better["auc"] == 1 and better["difference"] == pytest.approx(
        1 - result["recent"]["mean_rating_auc"], abs=0.02
    )
    RunDirectory(tmp_path / "other").write_predictions(dataset, test[:-1], mean_rating[:-1])
    with pytest.raises(ValueError, match="tested on other samples"):
        prompt_baseline.prompt_baseline(config, against=[tmp_path / "other"])
    with pytest.raises(ValueError, match="predictions.npz is unreadable"):
        prompt_baseline.prompt_baseline(config, against=[tmp_path / "missing"])


def test_the_old_report_command_still_answers(tmp_path):
    (tmp_path / "results.csv").write_text("method,auc,out\nlora,0.61,runs/a\nlora,0.65,runs/a\n")
    done = subprocess.run(
        [sys.executable, "-m", "reclora.train.report", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0 and "| lora |" in done.stdout and "0.6500" in done.stdout
    assert "python -m reclora.analysis.report now" in done.stderr


def test_attempts_against_a_base_run(tmp_path, capsys):
    from reclora.analysis import attempts

    for name, quality, lr in (("base", 0.2, 1e-3), ("faster", 1.5, 3e-3), ("elsewhere", 1.5, 1e-3)):
        results = write_run(tmp_path, name, "lora", quality, samples=np.arange(N) + (name == "elsewhere"))
        results["config"] = {"lr": lr, "seed": 1, "out": f"runs/{name}"}
        if name == "elsewhere":  # written after a setting was added, at its default: not a change
            results["config"]["gate_input_norm"] = "layer"
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        metrics = [{"step": 5, "train_loss": 0.9, "valid_auc": 0.5}, {"step": 10, "train_loss": 0.6, "valid_auc": 0.7}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    # a --crm-fusion run keeps its LLM alone beside the fusion: here the base's own scores
    with np.load(tmp_path / "faster" / "predictions.npz") as saved:
        base_prob = np.load(tmp_path / "base" / "predictions.npz")["prob"]
        arrays = dict(saved, llm_prob=base_prob, crm_prob=base_prob)
    np.savez(tmp_path / "faster" / "predictions.npz", **arrays)
    plot = tmp_path / "curves.png"
    assert (
        attempts.main([str(tmp_path), "--base", "base", "--json", str(tmp_path / "a.json"), "--plot", str(plot)]) == 0
    )
    summary = json.loads((tmp_path / "a.json").read_text())
    faster = summary["runs"]["faster"]
    assert faster["llm_alone"]["auc_difference"] == 0 and faster["llm_alone"]["paired_bootstrap_95"] == [0, 0]
    assert "llm_alone" not in summary["runs"]["elsewhere"]
    assert "llm_against_base_llm" not in faster  # the base keeps no LLM alone
    # ... and the CRM inside its readout (here the base's scores again): paired within the run
    assert faster["against_own_crm"]["auc_difference"] == pytest.approx(faster["auc_difference"])
    assert faster["llm_against_own_crm"]["auc_difference"] == 0  # its LLM alone is the CRM's scores here
    # how alike the LLM ranks: with the CRM inside its readout, and with the base (its P(Yes) here)
    assert faster["llm_rank_correlation_with_crm"] == pytest.approx(1)
    assert faster["llm_rank_correlation_with_base"] == pytest.approx(1)
    assert "llm_rank_correlation_with_base" not in summary["runs"]["elsewhere"]  # other test samples
    assert "against_own_crm" not in summary["runs"]["base"]
    assert faster["changed"] == {"lr": 3e-3}  # the output folder is not a setting
    assert summary["runs"]["elsewhere"]["changed"] == {}
    lo, hi = faster["paired_bootstrap_95"]
    assert 0 < lo < faster["auc_difference"] < hi
    assert faster["curve"] == [[5, 0.9, 0.5], [10, 0.6, 0.7]]
    assert summary["runs"]["elsewhere"]["paired_bootstrap_95"] is None  # other test samples: no pairing
    out = capsys.readouterr().out
    assert "(test samples differ)" in out and "its LLM alone" in out and "minus its own CRM" in out
    assert plot.stat().st_size > 0
    assert attempts.main([str(tmp_path), "--base", "missing"]) == 2
    # --runs: only the runs named, beside the base; a name that is no finished run is refused
    assert set(attempts.summarize(tmp_path, "base", ["faster"])["runs"]) == {"base", "faster"}
    assert attempts.main([str(tmp_path), "--base", "base", "--runs", "faster", "missing"]) == 2
    assert "'missing' is not a finished run" in capsys.readouterr().err
    # two fused runs: their LLMs alone are paired with each other as well
    with np.load(tmp_path / "base" / "predictions.npz") as saved:
        arrays = dict(saved, llm_prob=1 - saved["prob"], crm_prob=saved["prob"])
    np.savez(tmp_path / "base" / "predictions.npz", **arrays)
    both = attempts.summarize(tmp_path, "base")["runs"]["faster"]
    assert (
        both["llm_against_base_llm"]["auc_difference"] > 0
        and both["llm_against_base_llm"]["paired_bootstrap_95"][0] > 0
    )
    assert both["llm_rank_correlation_with_base"] == pytest.approx(-1)  # the base's LLM alone is 1 - its prob


def test_probe_fits_on_train_chooses_on_valid(tmp_path):
    from reclora.analysis import probe
    from reclora.train import make_config
    from tests.train.helpers import tiny_settings

    config = make_config(tiny_settings(tmp_path, method="zero-shot", prompt_history="recent", valid_size=16))
    result = probe.probe(config)
    assert result["sizes"] == {"train": 24, "valid": 16, "test": 16} and result["prompt_history"] == "recent"
    assert [row["l2"] for row in result["grid"]] == list(probe.L2_GRID)
    best = max(result["grid"], key=lambda row: row["valid_auc"])
    assert result["chosen_l2"] == best["l2"] and result["test_auc"] == best["test_auc"]
    assert result["grid"][0]["train_auc"] > 0.9  # 24 samples in 64 dimensions: the weakest L2 fits them


def test_logistic_probe_finds_a_linear_signal():
    from reclora.analysis import probe

    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 5)).astype(np.float32)
    labels = (features[:, 2] + 0.3 * rng.normal(size=400) > 0).astype(np.int64)
    linear = probe.fit_logistic(features, labels, l2=1e-3)
    with torch.no_grad():
        scores = linear(torch.from_numpy(features)).squeeze(1).numpy()
    assert auc(labels, scores) > 0.95 and abs(linear.weight[0, 2]) > 3 * abs(linear.weight[0]).sort().values[-2]


def test_margin_gradients_are_per_prompt(tmp_path):
    from reclora.analysis import margin_gradients
    from reclora.train import make_config
    from reclora.train.pipeline import build_model, load_run_dataset, subsets
    from tests.train.helpers import tiny_settings

    config = make_config(tiny_settings(tmp_path, method="lora"))
    dataset = load_run_dataset(config)
    first, second = subsets(config, dataset)["train"][:2]
    model = build_model(config, dataset, None, None, torch.device("cpu"))
    grads = margin_gradients.margin_gradients(model, [first, second, first])
    assert grads.shape == (3, sum(p.numel() for p in model.trainable_parameters()))
    assert grads[0].abs().sum() > 0 and not torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[2], grads[0])  # the same prompt, the same gradient


def test_alignment_splits_shared_remainder_and_label_contrast():
    from reclora.analysis.margin_gradients import alignment

    shared, apart = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.0])
    result = alignment(torch.stack([shared + apart, shared - apart]), np.array([1, 0]))
    assert result["positives"] == 1
    assert result["remainder_over_shared"] == pytest.approx(0.1)
    assert result["label_contrast_over_shared"] == pytest.approx(0.2)
    assert result["cosine"]["mean"] == pytest.approx(0.99 / 1.01)
    assert "label_contrast_over_shared" not in alignment(torch.stack([shared, shared]), np.array([1, 1]))


def test_late_fusion_tells_a_run_with_its_own_signal_from_a_copy_of_the_crm(tmp_path, capsys):
    from reclora.analysis import late_fusion

    write_run(tmp_path, "sim", "sim", 1.0, train_size=70000)
    write_run(tmp_path, "own", "lora", 1.0, seed=1)  # as good, with noise of its own
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "predictions.npz").write_bytes((tmp_path / "sim" / "predictions.npz").read_bytes())
    write_run(tmp_path, "elsewhere", "lora", 1.0, samples=np.arange(N) + 1)
    out = tmp_path / "fusion.json"
    assert late_fusion.main(["--crm", str(tmp_path / "sim"), str(tmp_path / "own"), str(copy), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    own, same = result["runs"]["own"]["fused"], result["runs"]["copy"]["fused"]
    assert set(own) == {"0.25", "0.5"}
    assert own["0.5"]["minus_crm"] > 0.02 and own["0.5"]["interval"][0] > 0  # averaging independent noise
    assert all(abs(f["minus_crm"]) < 1e-12 for f in same.values())  # fusing the CRM with itself adds nothing
    assert "own: AUC" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        late_fusion.main(["--crm", str(tmp_path / "sim"), str(tmp_path / "elsewhere")])
    assert exit_info.value.code == 2 and "other test samples" in capsys.readouterr().err


def _write_valid_scores(path: Path, label, prob):
    rows = ["sample,user,item,label,score"] + [f"{i},1,2,{y},{p}" for i, (y, p) in enumerate(zip(label, prob))]
    path.write_text("\n".join(rows) + "\n")


def test_late_fusion_chooses_the_weight_on_validation(tmp_path, capsys):
    from reclora.analysis import late_fusion

    write_run(tmp_path, "sim", "sim", 1.0, train_size=70000)
    write_run(tmp_path, "own", "lora", 1.0, seed=1)
    write_run(tmp_path, "noise", "lora", 0.0, seed=2)  # knows nothing: the CRM alone is best
    valid = tmp_path / "valid"
    valid.mkdir()
    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, 600)
    signal = 2 * label - 1
    crm_valid = 1 / (1 + np.exp(-(signal + rng.normal(size=600))))
    _write_valid_scores(valid / "sim.csv", label, crm_valid)
    _write_valid_scores(valid / "own.csv", label, 1 / (1 + np.exp(-(signal + rng.normal(size=600)))))
    _write_valid_scores(valid / "noise.csv", label, 1 / (1 + np.exp(-rng.normal(size=600))))
    args = ["--crm", str(tmp_path / "sim"), str(tmp_path / "own"), str(tmp_path / "noise"), "--valid", str(valid)]
    out = tmp_path / "fusion.json"
    assert late_fusion.main(args + ["--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    own, noise = runs["own"]["chosen_on_valid"], runs["noise"]["chosen_on_valid"]
    assert 0.3 <= own["weight"] <= 0.7 and own["valid_auc"] > own["valid_crm_auc"]  # two equal, independent views
    assert own["minus_crm"] > 0.02 and own["interval"][0] > 0
    assert noise["weight"] < 0.2 and abs(noise["minus_crm"]) < 0.01
    assert "weight chosen on validation" in capsys.readouterr().out
    (valid / "noise.csv").unlink()
    with pytest.raises(SystemExit) as exit_info:
        late_fusion.main(args)
    assert exit_info.value.code == 2 and "noise.csv is missing" in capsys.readouterr().err


def _add_columns(run: Path, **parts):
    """Give a written run the user column the trainer writes, and parts (a --crm-fusion run's llm_prob
    and crm_prob)."""
    with np.load(run / "predictions.npz") as saved:
        arrays = dict(saved, user=np.zeros(N, dtype=np.int64), **parts)
    np.savez(run / "predictions.npz", **arrays)


def test_paired_seeds_over_pairs(tmp_path, capsys):
    from reclora.analysis import paired_seeds
    from reclora.analysis.study import paired_bootstrap, scored

    pairs = []
    for seed in range(3):
        write_run(tmp_path, f"base-seed{seed}", "reclora", 0.6, seed)
        write_run(tmp_path, f"changed-seed{seed}", "reclora", 1.2, seed)
        crm = np.load(tmp_path / f"base-seed{seed}" / "predictions.npz")["prob"]  # each seed's CRM
        for name in ("base", "changed"):
            run = tmp_path / f"{name}-seed{seed}"
            _add_columns(run, llm_prob=np.load(run / "predictions.npz")["prob"], crm_prob=crm)  # LLM alone = readout
        pairs.append((f"changed-seed{seed}", f"base-seed{seed}"))
    # what a decision reads: the changed run at seed 0 validated twice and fused on validation
    results_file = tmp_path / "changed-seed0" / "results.json"
    validated = {"epochs": [{"valid_auc": 0.6}, {"valid_auc": 0.7}], "valid_auc": 0.7, "crm_fusion": {"auc": 0.75}}
    results_file.write_text(json.dumps({**json.loads(results_file.read_text()), **validated}))
    args = [str(tmp_path), "--json", str(tmp_path / "s.json")]
    for changed, base in pairs:
        args += ["--pair", changed, base]
    assert paired_seeds.main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    differences = []
    for seed, (row, (changed, base)) in enumerate(zip(summary["pairs"], pairs)):
        a, b = (np.load(tmp_path / n / "predictions.npz") for n in (changed, base))
        differences.append(auc(a["label"], a["prob"]) - auc(b["label"], b["prob"]))
        assert row["readout minus base"]["auc_difference"] == pytest.approx(differences[-1])
        # the base's LLM alone is its CRM here, and the changed run's CRM is the base's readout
        assert row["base's LLM alone minus its own CRM"]["auc_difference"] == pytest.approx(0)
        assert row["LLM alone minus its own CRM"]["auc_difference"] == pytest.approx(differences[-1])
        assert row["seed"] == seed  # read from the run's results
    over = summary["over_pairs"]["readout minus base"]
    assert over["pairs"] == 3 and over["mean_auc_difference"] == pytest.approx(np.mean(differences))
    # the interval is that of the mean of the pairs' draws, each pair drawn with its seed
    draws = [
        paired_bootstrap(*(scored(dict(np.load(tmp_path / n / "predictions.npz")), "prob") for n in pair), seed=s)
        for s, pair in enumerate(pairs)
    ]
    assert over["paired_bootstrap_95"] == pytest.approx(list(np.percentile(np.mean(draws, axis=0), [2.5, 97.5])))
    assert over["paired_bootstrap_95"][0] > 0  # quality 1.2 against 0.6 over 3 x 400 samples
    assert summary["pairs"][0]["changed_valid"] == {"per_validation": [0.6, 0.7], "kept": 0.7, "fused": 0.75}
    assert summary["pairs"][0]["base_valid"] == {"per_validation": [], "kept": None}  # never validated
    llm = summary["auc_over_seeds"]["changed"]["llm"]
    assert llm["mean"] == pytest.approx(np.mean([summary["pairs"][s]["changed_auc"]["llm"] for s in range(3)]))
    assert llm["std"] > 0
    out = capsys.readouterr().out
    assert "**over 3 pairs**" in out and "LLM alone minus its own CRM" in out
    assert "| 0.600, 0.700 (kept 0.700); fused 0.750 / - |" in out
    # not fused: no LLM-alone or CRM rows; other test samples or a missing run: exit 2 with a message
    write_run(tmp_path, "plain-a", "lora", 1.0)
    write_run(tmp_path, "plain-b", "lora", 0.5)
    for name in ("plain-a", "plain-b"):
        _add_columns(tmp_path / name)
    plain = paired_seeds.summarize(tmp_path, [("plain-a", "plain-b")])
    assert set(plain["over_pairs"]) == {"readout minus base"}
    assert plain["auc_over_seeds"]["changed"]["readout"]["std"] is None  # one seed: no spread
    write_run(tmp_path, "elsewhere", "lora", 1.0, samples=np.arange(N) + 1)
    _add_columns(tmp_path / "elsewhere")
    assert paired_seeds.main([str(tmp_path), "--pair", "elsewhere", "base-seed0"]) == 2
    assert paired_seeds.main([str(tmp_path), "--pair", "missing", "base-seed0"]) == 2
    err = capsys.readouterr().err
    assert "share their test samples" in err and "'missing' is not a finished run" in err


def test_few2many_curves_over_seeds(tmp_path, capsys):
    from reclora.analysis import few2many

    def fused_run(name, quality, seed, size):
        write_run(tmp_path, name, "reclora", quality, seed, train_size=size)
        run = tmp_path / name
        llm = np.load(run / "predictions.npz")["prob"]
        crm = 1 / (1 + np.exp(-np.random.default_rng([seed, 9]).normal(size=N)))  # each seed's CRM
        _add_columns(run, llm_prob=llm, crm_prob=crm)
        (run / "config.json").write_text(json.dumps({"crm": "sim", "seed": seed}))
        return run

    runs = {(2000, s): fused_run(f"small-seed{s}", 0.6 + 0.1 * s, s, 2000) for s in range(3)}
    runs[8000, 0] = fused_run("large", 1.5, 0, 8000)
    runs[8000, 1] = fused_run("large-seed1", 1.4, 1, 8000)
    (tmp_path / "large-seed2").mkdir()  # still training: no results.json
    published = tmp_path / "study.json"
    published.write_text(json.dumps({"few2many": {"seed0": {"lora": [[500, 0.5], [2000, 0.6]]}}}))
    args = [str(tmp_path), "--curve", "reclora", "small-seed*", "large*", "--published", str(published)]
    assert few2many.main([*args, "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")]) == 0
    curve = json.loads((tmp_path / "c.json").read_text())["curves"]["reclora"]
    assert [p["size"] for p in curve["points"]] == [2000, 8000]
    assert curve["points"][1]["seeds"] == [0, 1] and curve["unfinished"] == ["large-seed2"]
    for point in curve["points"]:
        llm = [
            auc(*(np.load(runs[point["size"], s] / "predictions.npz")[k] for k in ("label", "llm_prob")))
            for s in point["seeds"]
        ]
        assert point["llm"]["mean"] == pytest.approx(np.mean(llm))
        assert point["llm"]["std"] == pytest.approx(np.std(llm, ddof=1))
    # the CRM does not move with the size: its AUC once a seed
    crm = [auc(*(np.load(runs[2000, s] / "predictions.npz")[k] for k in ("label", "crm_prob"))) for s in range(3)]
    assert curve["crm"] == "sim" and curve["crm_auc_over_seeds"]["mean"] == pytest.approx(np.mean(crm))
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "| reclora | 8000 | 0, 1 |" in capsys.readouterr().out
    # --readout draws the fused readout beside the LLM alone, in the curve's colour; a name that is no curve: exit 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = plt.figure().add_subplot()
    few2many._draw_curves(axis, few2many.summarize(tmp_path, [("reclora", ["small-seed*", "large*"])]), ("reclora",))
    llm, readout = axis.containers
    assert readout.get_label() == "reclora: fused readout, mean ± sd over seeds"
    assert list(readout.lines[0].get_ydata()) == pytest.approx([p["readout"]["mean"] for p in curve["points"]])
    assert readout.lines[0].get_color() == llm.lines[0].get_color()
    assert few2many.main([*args, "--readout", "reclora", "--plot", str(tmp_path / "r.png")]) == 0
    with pytest.raises(SystemExit) as exit_code:
        few2many.main([*args, "--readout", "lora"])
    assert exit_code.value.code == 2 and "--readout names no --curve: lora" in capsys.readouterr().err
    # a typo, two runs at one (size, seed), other test samples, a file that is no study summary: exit 2
    assert few2many.main([str(tmp_path), "--curve", "reclora", "smal-seed*"]) == 2
    assert few2many.main([str(tmp_path), "--curve", "twice", "small-seed0", "large"]) == 0  # sizes differ
    write_run(tmp_path, "small-again", "reclora", 0.6, 0)
    _add_columns(tmp_path / "small-again")
    assert few2many.main([str(tmp_path), "--curve", "twice", "small-seed0", "small-again"]) == 2
    write_run(tmp_path, "elsewhere", "reclora", 0.6, 1, samples=np.arange(N) + 1)
    _add_columns(tmp_path / "elsewhere")
    assert few2many.main([str(tmp_path), "--curve", "moved", "small-seed0", "elsewhere"]) == 2
    assert few2many.main([*args[:5], "--published", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "matches smal-seed*" in err and "both size 2000, seed 0" in err and "different test samples" in err
    assert "not a reclora.analysis.study summary" in err
