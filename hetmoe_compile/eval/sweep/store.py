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

    @property
    def units_dir(self) -> Path:
        return self.dir / UNITS

    def open(self) -> dict[str, dict]:
        """Check the directory against the settings (refused in one line when it holds finished units made under
        others) and return the finished units' results by key. Nothing is written until a worker is ready
        (:meth:`bind_model`), so a run that fails before leaves the directory as it was."""
        path = self.dir / SETTINGS
        finished = self._finished()
        if not path.is_file():
            if finished:
                raise HetMoEError(
                    f"--out {self.dir}: {UNITS}/ holds results but {SETTINGS} is missing, so they cannot be checked; "
                    f"choose a new --out, or delete {self.units_dir} to start over"
                )
            return finished
        try:
            old = json.loads(path.read_text())
            stored, model = old["settings"], old.get("model")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HetMoEError(
                f"{path}: not a sweep record; choose a new --out, or delete {self.dir} to start over"
            ) from None
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
        atomic_write_text(self.units_dir / f"{unit.key}.json", json.dumps(result, indent=1) + "\n")

    def _write(self) -> None:
        doc = {"settings": self.settings, "model": self.model}
        atomic_write_text(self.dir / SETTINGS, json.dumps(doc, indent=2) + "\n")

    def _finished(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.units_dir.is_dir():
            return out
        for path in sorted(self.units_dir.glob("*.json")):
            try:
                result = json.loads(path.read_text())
                ok = isinstance(result, dict) and all(k in result for k in UNIT_FIELDS)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise HetMoEError(f"{path}: not a sweep unit result; delete it to measure that unit again")
            out[path.stem] = result
        return out


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
