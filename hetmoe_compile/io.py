"""Atomic file output: write to a temporary sibling, then rename, so nothing is left half-written; the siblings a
killed run left behind are removed by the next run that writes the same path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HetMoEError


def read_text_file(path: str | Path, what: str = "text", option: str = "") -> str:
    """The UTF-8 text of ``path``, with one-line errors for a missing, non-UTF-8 or empty file.

    ``what`` names the file in messages ("calibration" -> "calibration file not found"); ``option`` the flag."""
    path = Path(path)
    to = f" to {option}" if option else ""
    if not path.is_file():
        raise HetMoEError(f"{path}: {what} file not found; pass an existing UTF-8 text file{to}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HetMoEError(f"{path}: {what} file is not UTF-8 text; pass a plain text file{to}") from exc
    if not text.strip():
        noun = "text" if what == "text" else f"{what} text"
        raise HetMoEError(f"{path}: {noun} is empty; give a file with some natural-language text")
    return text


def read_json_file(path: Path, missing: str) -> object:
    """The parsed JSON of ``path``; ``missing`` is the error message (problem and fix) when there is no such file."""
    if not path.is_file():
        raise HetMoEError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HetMoEError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def check_output_path(path: str | Path, option: str = "--out") -> None:
    """Fail before any work when ``path`` cannot be written: a regular file on the way to it, or a directory that
    refuses new files (permissions, a read-only file system). Probes by creating and removing a file."""
    target = Path(path).expanduser().absolute()
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HetMoEError(f"{option} {path}: {ancestor} is a file, not a directory; choose a path outside it")
    try:
        with tempfile.TemporaryFile(dir=ancestor, prefix=".hetmoe-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HetMoEError(
            f"{option} {path}: cannot create files in {ancestor} ({reason}); choose a writable location"
        ) from None


def _temp_prefix(path: Path, kind: str = "tmp") -> str:
    """Hidden sibling names that carry the writer's process id, so a later run can tell abandoned ones."""
    return f".{path.name}.{kind}-{os.getpid()}-"


def remove_stale_temps(path: Path) -> None:
    """Remove the temporary siblings of ``path`` left by runs that were killed (their process is gone)."""
    if not path.parent.is_dir():
        return
    for item in path.parent.glob(f".{path.name}.*-*-*"):
        pid = item.name[len(path.name) + 2 :].split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; creates the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success its files move into ``path`` (created if needed),
    on failure it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, path / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable_dir(path: Path, marker: str) -> None:
    """Refuse an output directory that :func:`atomic_replace_dir` must not replace (call it before long work)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise HetMoEError(f"{path}: exists and is not a directory; choose a directory path")
        if any(path.iterdir()) and not (path / marker).is_file():
            raise HetMoEError(
                f"{path}: directory is not empty and holds no {marker}; choose a new or empty "
                "directory (it would be replaced)"
            )


@contextmanager
def atomic_replace_dir(path: Path, marker: str) -> Iterator[Path]:
    """Like :func:`atomic_output_dir`, but the finished directory *replaces* ``path`` as a whole, so no file of an
    earlier run survives beside the new ones. ``path`` must be absent, empty, or hold ``marker`` (an earlier run's
    output); anything else is refused rather than deleted."""
    path = Path(path)
    check_replaceable_dir(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "old"), dir=path.parent))
            os.replace(path, old / "dir")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / "dir", path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
