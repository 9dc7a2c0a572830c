"""Saves that are complete or absent, never half-written.

A file is written to a temporary sibling, flushed to disk and renamed over its target (`os.replace`
is atomic on POSIX). A folder is written into a temporary sibling folder and renamed into place when
the target does not exist yet. When the target already exists (a model saved into a training run's
folder, beside its checkpoints and logs), its files are replaced one by one with one *commit file*
(a model's `config.json`) removed first and put back last: a reader that requires the commit file
sees the old set, nothing, or the new set. Files and folders get the usual permissions (0666/0777
less the umask), not the private ones of temporary files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".tmp-"  # in the names of temporary siblings: `.NAME.tmp-XXXX`


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def _public_modes(folder: Path) -> None:
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def temp_sibling(target: str | os.PathLike) -> Path:
    """An empty temporary folder beside `target`, under a dot-name that readers skip."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))


def commit_folder(tmp: Path, target: str | os.PathLike, commit_file: str | None = None) -> None:
    """Make the files of `tmp` (a `temp_sibling` of `target`) `target`'s: flushed to disk, then
    renamed into place (or, for an existing `target`, moved in with `commit_file` last)."""
    target = Path(target)
    _public_modes(tmp)
    _fsync_tree(tmp)
    if not target.exists():
        try:
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return
        except OSError:
            if not target.is_dir():  # not a folder that appeared meanwhile: a real failure
                raise
    _merge_into(tmp, target, commit_file)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, commit_file: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block ends without an error, its
    files become `target`'s. If the block fails (or the process dies) `target` is untouched and the
    temporary folder is removed (or, after a kill, left under a dot-name that readers skip).

    `commit_file`: for an existing `target`, the file removed first and written last, so that a
    reader that requires it never sees old and new files mixed.
    """
    tmp = temp_sibling(target)
    try:
        yield tmp
        commit_folder(tmp, target, commit_file)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(tmp: Path, target: Path, commit_file: str | None) -> None:
    names = sorted(p.name for p in tmp.iterdir())
    if commit_file in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target / commit_file)
        _fsync_dir(target)
        names.remove(commit_file)
        names.append(commit_file)
    for name in names:
        src, dst = tmp / name, target / name
        if src.is_dir() and dst.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{name}{TEMP_MARK}", dir=target))
            os.rename(dst, old / name)
            os.rename(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, dst)
    _fsync_dir(target)


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove what a killed save left in `folder`: its dot-named temporary siblings."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(f".*{TEMP_MARK}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
