"""reclora.files: the cache's location, and folders written whole."""

import pytest

from reclora.files import atomic_directory, cache_folder, default_cache_dir


def test_the_cache_is_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECLORA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "reclora"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "reclora"
    monkeypatch.setenv("RECLORA_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert cache_folder("crms") == tmp_path / "mine" / "crms"
    assert cache_folder("crms", tmp_path / "given") == tmp_path / "given" / "crms"


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a").write_text("half")
        raise RuntimeError("failed while writing")
    assert (target / "a").read_text() == "first"
    with atomic_directory(target, overwrite=False) as staging:
        (staging / "a").write_text("late duplicate")
    assert (target / "a").read_text() == "first"
    with atomic_directory(target) as staging:
        (staging / "b").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired copies left
