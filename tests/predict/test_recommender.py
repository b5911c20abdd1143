"""reclora.Recommender on tiny finished runs: train -> load -> score, the history rule, bad input, bad folders."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from reclora import Recommender
from reclora.inference import RunFolderError, UnknownItemError
from reclora.inference.run_folder import RunFolder
from reclora.train.pipeline import load_run_dataset
from tests.predict.conftest import METHODS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def loaded(runs):
    return {name: Recommender.load(runs[name]) for name in METHODS}


def _test_requests(recommender):
    """The run's own test samples as raw (user, item, timestamp) requests, and predictions.npz."""
    saved = np.load(recommender.run.predictions)
    described = recommender.describe_samples(saved["sample"])
    timestamps = recommender.table.run_samples.timestamp[saved["sample"]]
    return described["user"], described["item"], timestamps, saved


@pytest.mark.parametrize("name", METHODS)
def test_scores_of_the_test_samples_equal_predictions_npz(loaded, name):
    recommender = loaded[name]
    users, items, timestamps, saved = _test_requests(recommender)
    by_index = recommender.score_samples(saved["sample"])
    by_request = recommender.score(users, items, timestamps)
    assert by_request.dtype == np.float32 and by_request.shape == (len(users),)
    np.testing.assert_allclose(by_index, saved["prob"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_request, saved["prob"], rtol=0, atol=1e-5)


def test_compiled_layers_score_as_the_run_did(runs):
    recommender = Recommender.load(runs["reclora"], compile=True)
    assert all(layer._compiled_call_impl is not None for layer in recommender.model.backbone.get_decoder().layers)
    _, _, _, saved = _test_requests(recommender)
    np.testing.assert_allclose(recommender.score_samples(saved["sample"]), saved["prob"], rtol=0, atol=1e-5)


def test_scores_do_not_depend_on_batching(loaded):
    recommender = loaded["reclora"]
    users, items, timestamps, _ = _test_requests(recommender)
    together = recommender.score(users, items, timestamps)
    alone = np.concatenate(
        [recommender.score(users[i : i + 1], items[i : i + 1], timestamps[i : i + 1]) for i in range(len(users))]
    )
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["reclora", "sim"])
def test_rank_returns_the_candidates_by_score(loaded, name):
    recommender = loaded[name]
    user = recommender.table.dataset.users.raw_ids[3]
    candidates = recommender.table.dataset.items.raw_ids[:12].tolist()
    scores = recommender.score([user] * 12, candidates)
    top = recommender.rank(user, candidates, k=5)
    assert len(top) == 5 and [item for item, _ in top] == [
        candidates[i] for i in np.argsort(-scores, kind="stable")[:5]
    ]
    assert [score for _, score in top] == sorted((score for _, score in top), reverse=True)
    np.testing.assert_allclose([score for _, score in top], np.sort(scores)[::-1][:5], atol=1e-6)
    assert len(recommender.rank(user, candidates, k=50)) == 12
    with pytest.raises(ValueError, match="k must be >= 1"):
        recommender.rank(user, candidates, k=0)


def test_history_is_what_came_strictly_before(loaded):
    recommender = loaded["reclora"]
    table = recommender.table
    sequences = table.dataset.sequences
    user = 5
    first, end = sequences.offsets[user], sequences.offsets[user + 1]
    raw_user, raw_item = table.dataset.users.raw_ids[user], table.dataset.items.raw_ids[sequences.item[first]]
    first_time, last_time = sequences.timestamp[first], sequences.timestamp[end - 1]
    middle = sequences.timestamp[first + 10]
    samples, cold = table.resolve([raw_user] * 4, [raw_item] * 4, [first_time - 1, middle, last_time + 1, None])
    assert cold == 0
    assert samples.history_length[0] == 0  # before the first interaction: the empty history
    assert samples.history_length[1] == int((sequences.timestamp[first:end] < middle).sum()) + int(
        ((sequences.timestamp[first:end] == middle) & (sequences.item[first:end] < sequences.item[first])).sum()
    )
    assert samples.history_length[2] == samples.history_length[3] == end - first  # no timestamp: after the last
    empty_history = recommender.score([raw_user], [raw_item], [first_time - 1])
    assert np.isfinite(empty_history).all()


def test_unknown_item_is_an_error_naming_it(loaded):
    recommender = loaded["reclora"]
    items = recommender.table.dataset.items.raw_ids
    with pytest.raises(UnknownItemError, match="unknown item id 987654") as error:
        recommender.score([recommender.table.dataset.users.raw_ids[0]] * 2, [items[0], 987654])
    assert error.value.position == 1


@pytest.mark.parametrize("name", ["reclora", "lora", "sim", "reclora-user-embedding"])
def test_unknown_user_is_a_counted_cold_start(loaded, name):
    recommender = loaded[name]
    item = recommender.table.dataset.items.raw_ids[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = recommender.score([10**9, 10**9 + 1, recommender.table.dataset.users.raw_ids[0]], [item] * 3)
    assert [str(w.message).split(" requests")[0] for w in caught] == ["2 of 3"]
    assert np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # two strangers look alike


def test_a_cold_start_prompt_has_no_user_sentence(loaded):
    recommender = loaded["lora"]
    samples, _ = recommender.table.resolve([10**9], [recommender.table.dataset.items.raw_ids[0]])
    recommender.table.serve(samples)
    prompt = recommender.model.prompts.tokenizer.decode(recommender.model.prompt_token_ids([0])[0])
    assert "The user is" not in prompt and "watched the following" not in prompt


def test_bad_request_arrays(loaded):
    recommender = loaded["reclora"]
    user, item = recommender.table.dataset.users.raw_ids[0], recommender.table.dataset.items.raw_ids[0]
    with pytest.raises(ValueError, match="same length"):
        recommender.score([user, user], [item])
    with pytest.raises(ValueError, match="one entry per request"):
        recommender.score([user], [item], [1, 2])
    with pytest.raises(ValueError, match="user id 'abc'.*not an integer"):
        recommender.score(["abc"], [item])
    with pytest.raises(ValueError, match="timestamps must be numbers"):
        recommender.score([user], [item], ["yesterday"])


def test_split_samples(loaded, runs):
    recommender = loaded["rella"]
    np.testing.assert_array_equal(
        recommender.split_samples("test"), np.load(runs["rella"] / "predictions.npz")["sample"]
    )
    assert len(recommender.split_samples("valid")) == 16
    with pytest.raises(ValueError, match="split"):
        recommender.split_samples("train")


def test_missing_best_adapters(copy_run):
    folder = copy_run("lora")
    (folder / "checkpoints" / "last.pt").unlink()
    with pytest.raises(RunFolderError, match="best adapters.*missing"):
        Recommender.load(folder)


def test_a_checkpoint_without_best_adapters(copy_run):
    folder = copy_run("reclora")
    checkpoint = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    checkpoint["state"]["best_adapters"] = None
    torch.save(checkpoint, folder / "checkpoints" / "last.pt")
    with pytest.raises(RunFolderError, match="holds no best adapters"):
        Recommender.load(folder)


def test_the_best_adapters_are_loaded_not_the_last(runs, loaded):
    checkpoint = torch.load(runs["reclora"] / "checkpoints" / "last.pt", weights_only=False)
    best, last = checkpoint["state"]["best_adapters"], checkpoint["adapters"]
    model_state = dict(loaded["reclora"].model.named_parameters())
    differs = [name for name in best if not torch.equal(best[name], last[name])]
    if not differs:
        pytest.skip("this tiny run's best step is its last")
    assert all(torch.equal(model_state[name].cpu(), best[name]) for name in best)


def _edit_json(path, edit):
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "results.json").unlink(), "not finished"),
        (lambda folder: (folder / "config.json").unlink(), "not a run folder"),
        (lambda folder: (folder / "predictions.npz").unlink(), "predictions.npz is missing"),
        (lambda folder: (folder / "crm" / "crm.pt").unlink(), "trained CRM.*missing"),
        (
            lambda folder: _edit_json(folder / "results.json", lambda r: r["versions"].update(reclora_kernels="0.0.1")),
            "written by reclora '0.0.1'",
        ),
        (lambda folder: _edit_json(folder / "config.json", lambda c: c.update(lr=0.5)), "mixes two runs"),
        (
            lambda folder: [
                _edit_json(folder / name, lambda c: (c.get("config", c)).update(gate_sharpness=2))
                for name in ("config.json", "results.json")
            ],
            "settings this version cannot use",
        ),
        (lambda folder: (folder / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint"), "cannot be read"),
    ],
)
def test_bad_run_folders(copy_run, damage, message):
    folder = copy_run("reclora")
    damage(folder)
    with pytest.raises(RunFolderError, match=message):
        Recommender.load(folder)


@pytest.mark.parametrize(
    "name, added_later",
    [
        ("lora", ("crm_holdout", "crm_holdout_users", "crm_residual", "crm_fusion")),
        # reclora's default became no LayerNorm after runs without the setting had theirs
        ("reclora-gate-layernorm", ("gate_input_norm", "gate_lr")),
    ],
)
def test_a_run_written_before_a_setting_existed_loads(copy_run, loaded, name, added_later):
    """An older version's run lacks the settings added since: they read as what runs did then, their
    defaults but where a default changed later (what the trainer's --resume does too)."""
    folder = copy_run(name)
    for file in ("config.json", "results.json"):
        _edit_json(folder / file, lambda c: [c.get("config", c).pop(key) for key in added_later])
    checkpoint = torch.load(folder / "checkpoints" / "last.pt", weights_only=False)
    for key in added_later:
        del checkpoint["identity"]["settings"][key]
    torch.save(checkpoint, folder / "checkpoints" / "last.pt")
    recommender = Recommender.load(folder)
    samples = recommender.split_samples("test")[:4]
    assert np.allclose(recommender.score_samples(samples), loaded[name].score_samples(samples), atol=1e-6)


def test_moved_data_directory(runs, tmp_path):
    with pytest.raises(RunFolderError, match="data directory .* is not found"):
        Recommender.load(runs["din"], data_dir=tmp_path / "elsewhere")


def test_no_such_folder(tmp_path):
    with pytest.raises(RunFolderError, match="no such run folder"):
        Recommender.load(tmp_path / "nowhere")


def test_other_data_than_the_run_was_evaluated_on(runs):
    run = RunFolder(runs["din"])
    other = load_run_dataset(
        dataclasses.replace(run.settings, dataset_options={"n_users": 41, "n_items": 60, "n_ratings": 2000})
    )
    with pytest.raises(RunFolderError, match="not the data this run was evaluated on"):
        run.check_dataset(other)
