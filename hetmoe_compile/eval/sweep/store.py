"""A resumable sweep directory: ``sweep.json`` holds the settings its units were computed under (and the model
they ran on), ``units/<key>.json`` one finished unit each, written atomically as it finishes. A rerun with the same
settings skips the finished units; a rerun with settings that would change a unit's numbers is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...base.errors import HetMoEError
from ...base.io import atomic_write_text
from .jobs import Unit, binding

SETTINGS = "sweep.json"
UNITS = "units"
UNIT_FIELDS = ("label", "seed", "metrics", "skipped", "cost", "peer_summary", "seconds", "worker")


class SweepStore:
    """``settings``: what a unit's numbers depend on, ``{name: value}`` (names as the user knows them, e.g. CLI
    flags). What only selects units (fractions, selectors, seeds, peers) is not a setting: a rerun may add or drop
    units and reuses the ones it shares with the earlier run."""

    def __init__(self, directory: str | Path, settings: dict) -> None:
        self.dir = Path(directory)
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.model: dict | None = None
        self._lock: int | None = None
        self._holds = 0  # lock() calls not yet released: the caller around a sweep may hold it too
        self._created = False

    @property
    def settings_sha256(self) -> str:
        """sha256 of the settings, which every unit file carries: a unit is bound to the settings it ran under."""
        return _digest(self.settings)

    def lock(self) -> None:
        """Become the directory's one writer (an exclusive lock on it, released by :meth:`release` or when this
        process ends, however it ends); one line if another sweep holds it. Creates the directory if needed."""
        import fcntl
        import os

        if self._lock is not None:
            self._holds += 1
            return
        self._created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HetMoEError(
                f"--out {self.dir}: another sweep is writing there, and two at once would mix their units; wait for "
                "it to finish, or choose another --out"
            ) from None
        self._lock, self._holds = fd, 1

    def release(self) -> None:
        """Give up the lock; a directory this run created and left empty is removed."""
        import os

        if self._lock is None:
            return
        self._holds -= 1
        if self._holds:
            return
        os.close(self._lock)
        self._lock = None
        if self._created and self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()

    @property
    def units_dir(self) -> Path:
        return self.dir / UNITS

    def open(self) -> dict[str, dict]:
        """Check the directory against the settings (refused in one line when it holds finished units made under
        others) and return the finished units' results by key. Nothing is written until a worker is ready
        (:meth:`bind_model`), so a run that fails before leaves the directory as it was."""
        path = self.dir / SETTINGS
        if not path.is_file():
            if self._unit_files():
                raise HetMoEError(
                    f"--out {self.dir}: {UNITS}/ holds results but {SETTINGS} is missing, so they cannot be checked; "
                    f"choose a new --out, or delete {self.units_dir} to start over"
                )
            return {}
        try:
            old = json.loads(path.read_text())
            stored, model = old["settings"], old.get("model")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HetMoEError(
                f"{path}: not a sweep record; choose a new --out, or delete {self.dir} to start over"
            ) from None
        finished = self._finished(_digest(stored))  # each unit under the settings the record says it ran under
        if not finished:  # nothing measured under the old settings: start afresh
            return finished
        diff = _differences(stored, self.settings)
        if diff:
            raise HetMoEError(
                f"--out {self.dir} holds a sweep made with other settings ({'; '.join(diff)}); rerun with its "
                "settings to resume it, or choose a new --out"
            )
        self.model = model
        return finished

    def bind_model(self, identity: dict) -> None:
        """What the units run on (a :class:`~.jobs.SweepContext`'s identity), as a worker reports it:
        recorded by the first run, refused when a later run's model or input ranges differ."""
        identity = json.loads(json.dumps(identity))
        if self.model is None:
            self.model = identity
        elif binding(self.model) != binding(identity):
            diff = _differences(binding(self.model), binding(identity))
            raise HetMoEError(
                f"--out {self.dir} holds a sweep of another model or its inputs ({'; '.join(diff)}); choose a new "
                "--out, or delete it to start over"
            )
        self._write()

    def save(self, unit: Unit, result: dict) -> None:
        """Write a finished unit, bound to its key and the settings, with the sha256 of its content."""
        doc = {**result, "key": unit.key, "settings_sha256": self.settings_sha256}
        doc["sha256"] = _digest(doc)
        atomic_write_text(self.units_dir / f"{unit.key}.json", json.dumps(doc, indent=1) + "\n")

    def _write(self) -> None:
        doc = {"settings": self.settings, "model": self.model}
        atomic_write_text(self.dir / SETTINGS, json.dumps(doc, indent=2) + "\n")

    def _unit_files(self) -> list[Path]:
        return sorted(self.units_dir.glob("*.json")) if self.units_dir.is_dir() else []

    def _finished(self, settings_sha256: str) -> dict[str, dict]:
        """The finished units' results, each checked: its content against its sha256, its name against its key,
        its settings against ``settings_sha256``."""
        out: dict[str, dict] = {}
        for path in self._unit_files():
            try:
                result = json.loads(path.read_text())
                ok = isinstance(result, dict) and all(k in result for k in UNIT_FIELDS)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise HetMoEError(f"{path}: not a sweep unit result; delete it to measure that unit again")
            fix = "delete it to measure that unit again"
            claimed = result.pop("sha256", None)
            if claimed != _digest(result):
                raise HetMoEError(f"{path}: edited after the sweep wrote it (its sha256 does not match); {fix}")
            if result.pop("key", None) != path.stem:
                raise HetMoEError(f"{path}: holds another unit's result (renamed or copied); {fix}")
            if result.pop("settings_sha256", None) != settings_sha256:
                raise HetMoEError(f"{path}: measured under other settings than {self.dir / SETTINGS} records; {fix}")
            out[path.stem] = result
        return out


def _digest(doc: dict) -> str:
    """sha256 of a JSON document in canonical form (sorted keys, as it reads back from the file)."""
    return hashlib.sha256(json.dumps(json.loads(json.dumps(doc)), sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            digest.update(str(p.relative_to(path)).encode() + b"\0")
        try:
            with p.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    """``name: A there, B here`` for every setting that differs (absent ones as 'unset')."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "unset"), new.get(k, "unset")
        if a != b:
            out.append(f"{k}: {_short(a)} there, {_short(b)} here")
    return out


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
