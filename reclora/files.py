"""The filesystem: where the cache lives, and files and folders written whole.

Every file the trainer and its caches write goes through atomic_write (a temporary file beside
the target, then one rename), every folder through atomic_directory (a staging folder, then one
rename), so a reader never sees half of one; a full disk becomes a NoSpaceLeft naming the file
or folder. Both get the permissions the umask gives, so a team can share one cache. Files that
come from a cache are verified on load (a checksum or a load check); what fails the check is
rebuilt or named with what to delete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


class NoSpaceLeft(OSError):
    """The disk filled up while writing a file; the file itself was left as it was."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports ENOSPC as a RuntimeError chained on the OSError.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_named(path):
    """Within the block, a full disk becomes NoSpaceLeft(path): the file or folder being written."""
    try:
        yield
    except BaseException as error:
        if _is_disk_full(error):
            raise NoSpaceLeft(path) from error
        raise


def shared_permissions(path) -> None:
    """A file's or a directory's mode as the umask makes it (mkstemp and mkdtemp make them private)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_UMASK)


def atomic_write(path, write, mode="w") -> None:
    """write(file) fills a temporary file beside path, which then replaces path in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    shared_permissions(temporary)
    try:
        with disk_full_named(path), os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path, value) -> None:
    """value as indented JSON (anything JSON cannot hold written as str), atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2, default=str) + "\n"))


def save_torch(path, state) -> None:
    """torch.save(state), atomically."""
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


@contextlib.contextmanager
def atomic_directory(path: Union[str, os.PathLike], overwrite: bool = True) -> Iterator[Path]:
    """Yields an empty temporary directory beside path; once the block succeeds it becomes path.

    A reader never sees a half-written path: it is renamed into place whole. An existing path
    is replaced when overwrite is True; otherwise the new content is discarded (another process
    produced the same thing first). On error the temporary directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        with disk_full_named(path):
            yield staging
        retired = None
        if overwrite and path.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            retired = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            path.rename(retired)
        try:
            staging.rename(path)
        except OSError:
            if overwrite or not path.exists():
                raise
            # Another process finished the same directory first: keep theirs.
        if retired is not None:
            shutil.rmtree(retired)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def default_cache_dir() -> Path:
    """The cache of datasets, item embeddings, converted models and trained CRMs (each in its own
    folder): $RECLORA_CACHE_DIR, else $XDG_CACHE_HOME/reclora, else ~/.cache/reclora."""
    if os.environ.get("RECLORA_CACHE_DIR"):
        return Path(os.environ["RECLORA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reclora"


def cache_folder(kind: str, cache_dir=None) -> Path:
    """The folder of one kind of cached thing ("datasets", "embeddings", "crms", ...) under cache_dir
    (default: default_cache_dir())."""
    return Path(cache_dir or default_cache_dir()) / kind


def file_digest(path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
