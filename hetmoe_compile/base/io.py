"""Atomic file output: write to a temporary sibling, then rename, so nothing is left half-written; the siblings a
killed run left behind are removed by the next run that writes the same path."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HetMoEError
from .version import PRODUCER


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


def check_replaceable_dir(
    path: Path, marker: str, keys: tuple[str, ...] = ("producer",), option: str = "--out"
) -> None:
    """Refuse an output directory that :func:`atomic_replace_dir` must not replace (call it before long work).

    Only an absent or empty directory, or one an earlier run of this package wrote, is replaced: its ``marker``
    file must be a JSON object whose ``producer`` names hetmoe-compile and which holds ``keys``. A user's folder
    that merely has a file of that name (a web project's ``manifest.json``) is refused, never deleted."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise HetMoEError(f"{option} {path}: exists and is not a directory; choose a directory path")
    if not any(path.iterdir()):
        return
    fix = "choose a new or empty directory (it would be replaced)"
    if not (path / marker).is_file():
        raise HetMoEError(f"{option} {path}: directory is not empty and holds no {marker}; {fix}")
    if not written_by_us(path / marker, keys):
        raise HetMoEError(
            f"{option} {path}: its {marker} was not written by hetmoe-compile, so the directory is not an earlier "
            f"output of this command; {fix}"
        )


def written_by_us(path: Path, keys: tuple[str, ...] = ("producer",)) -> bool:
    """Whether ``path`` is a JSON object that this package wrote: ``producer`` names hetmoe-compile and every one
    of ``keys`` is there."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(doc, dict) or not all(k in doc for k in keys):
        return False
    producer = doc.get("producer")
    return isinstance(producer, str) and producer.split(" ")[0] == PRODUCER.split(" ")[0]


@contextmanager
def atomic_replace_dir(path: Path, marker: str, keys: tuple[str, ...] = ("producer",)) -> Iterator[Path]:
    """Like :func:`atomic_output_dir`, but the finished directory *replaces* ``path`` as a whole, so no file of an
    earlier run survives beside the new ones. ``path`` must be absent, empty, or hold ``marker`` (an earlier run's
    output, see :func:`check_replaceable_dir`); anything else is refused rather than deleted."""
    path = Path(path)
    check_replaceable_dir(path, marker, keys)
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


def check_inputs_survive(
    inputs: dict[str, str | Path | None],
    files: dict[str, list[Path]] | None = None,
    directories: dict[str, Path] | None = None,
) -> None:
    """Refuse outputs that would replace an input, before any work: no output file may be an input file (or a
    hard link to one) or an existing file inside an input directory, and no directory that is written as a whole
    (an export, a sweep's store) may be or hold an input.

    ``inputs``: option -> path (absent paths and hub ids are skipped); ``files``: option -> the files that option
    writes; ``directories``: option -> a directory that option replaces or owns."""
    given = {option: Path(p).expanduser() for option, p in inputs.items() if p}
    given = {option: p for option, p in given.items() if p.exists()}
    for out_option, targets in (files or {}).items():
        for target in targets:
            target = Path(target).expanduser()
            for option, source in given.items():
                if _same(target, source):
                    raise HetMoEError(
                        f"{out_option} {target}: is the {option} file, and an output may not replace an input; "
                        f"choose another {out_option}"
                    )
                if source.is_dir() and target.exists() and _inside(target, source):
                    raise HetMoEError(
                        f"{out_option} {target}: would replace a file of {option} {source}; write the output "
                        "outside that directory"
                    )
    for out_option, directory in (directories or {}).items():
        directory = Path(directory).expanduser()
        for option, source in given.items():
            if _same(directory, source) or _inside(source, directory):
                raise HetMoEError(
                    f"{out_option} {directory}: holds {option} {source}, which writing this directory would "
                    f"replace; choose an {out_option} that holds none of the inputs"
                )


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` lies at any depth below ``directory`` (symbolic links resolved)."""
    return path.resolve().is_relative_to(directory.resolve()) and path.resolve() != directory.resolve()


def strict_json(doc: object, indent: int | None = 2) -> str:
    """``doc`` as JSON that strict parsers read: a NaN or infinite number (an undefined correlation, say) becomes
    ``null``, never the bare ``NaN`` Python's encoder writes by default."""
    return json.dumps(_finite(doc), indent=indent, allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def finite_json(doc: object, what: str, indent: int | None = 2) -> str:
    """``doc`` as JSON for a file whose schema wants numbers: one line naming the first NaN or infinite value
    (``what``: the file), never a file that strict parsers refuse or one that says ``null`` where a number goes."""
    bad = _first_nonfinite(doc, "")
    if bad is not None:
        raise HetMoEError(f"{what}: the value at {bad or '(top level)'} is not a finite number; nothing was written")
    return json.dumps(doc, indent=indent, allow_nan=False)


def _first_nonfinite(value: object, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_nonfinite(item, f"{where}/{key}")
        if found is not None:
            return found
    return None
