"""Atomic file output: write to a temporary sibling, then rename, so nothing is left half-written."""

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
        raise HetMoEError(f"{path}: {what} text is empty; give a file with some natural-language text")
    return text


def read_json_file(path: Path, missing: str) -> object:
    """The parsed JSON of ``path``; ``missing`` is the error message (problem and fix) when there is no such file."""
    if not path.is_file():
        raise HetMoEError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HetMoEError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; creates the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
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
