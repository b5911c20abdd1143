"""Writing files whole, with the permissions the umask gives, and reading them back with a check.

Every file the trainer and its caches write goes through atomic_write (a temporary file beside
the target, then one rename), so a reader never sees half of one; a full disk becomes a
NoSpaceLeft naming the file. Files that come from a cache are verified on load (a checksum
or a load check); what fails the check is rebuilt or named with what to delete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path

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


def file_digest(path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
