"""Read a checkpoint's tensors one at a time (or one expert's slice at a time), without loading the model.

A Hugging Face model directory holds ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
The files are read with plain positioned reads (``os.pread``) from the offsets in each file's header, not through a
memory map, so the resident set holds only the tensor being read: scores of a checkpoint far larger than memory
take one expert's weights of memory. Checkpoint keys are mapped to the model's parameter names with the model's
own conversion mapping from transformers (renamings such as ``block_sparse_moe`` -> ``mlp``, and the per-expert
``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` tensors that transformers merges into fused ones).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..base.errors import HetMoEError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightRenaming
    from typing_extensions import Buffer

_log = logging.getLogger(__name__)
_FIX = "re-download the model, or re-save it with save_pretrained"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype | None  # None: a dtype this module does not read (only with ``any_dtype``)
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file


def _read_header(path: Path, any_dtype: bool = False) -> dict[str, _Entry]:
    """The tensors of one safetensors file, checked to lie inside it; unknown dtypes are refused unless
    ``any_dtype``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HetMoEError(f"{path}: truncated safetensors file (no header); re-download or re-save the model")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise HetMoEError(
                f"{path}: truncated safetensors file (header of {length} bytes, file of {size}); "
                "re-download or re-save the model"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise HetMoEError(f"{path}: corrupt safetensors header ({exc}); re-download or re-save the model") from exc
    if not isinstance(header, dict):
        raise HetMoEError(f"{path}: corrupt safetensors header (not a JSON object); re-download or re-save the model")
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(n) for n in meta["shape"])
            begin, end = (int(n) for n in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HetMoEError(
                f"{path}: corrupt safetensors header (entry of tensor {key}); re-download or re-save the model"
            ) from exc
        if dtype not in _DTYPES and not any_dtype:
            raise HetMoEError(
                f"{path}: tensor {key} has dtype {dtype}, which scoring from the checkpoint "
                "does not read; load the model instead (--load full)"
            )
        if 8 + length + end > size:
            raise HetMoEError(
                f"{path}: truncated safetensors file (tensor {key} ends past the end of the file); "
                "re-download or re-save the model"
            )
        out[key] = _Entry(path, _DTYPES.get(dtype), shape, 8 + length + begin)
    return out


def shard_files(directory: Path) -> list[str] | None:
    """The shards a sharded checkpoint's index names (None without an index); missing ones are an error."""
    index = Path(directory) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HetMoEError(f"{index}: not a safetensors index (no weight_map); re-download the model") from exc
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (Path(directory) / f).is_file()]
    if missing:
        raise HetMoEError(
            f"{directory}: {len(missing)} of {len(files)} checkpoint shards are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); download the complete "
            "model"
        )
    return files


def check_files(directory: Path) -> dict[str, _Entry]:
    """The tensors of a model directory's safetensors files (none without such files), every shard present and
    every file's header whole; the problems are errors naming the file (before a loader reads them)."""
    files = shard_files(directory)
    paths = [directory / f for f in files] if files is not None else [directory / SINGLE_NAME]
    entries: dict[str, _Entry] = {}
    for path in paths:
        if path.is_file():  # a directory of .bin weights has none
            entries.update(_read_header(path, any_dtype=True))
    return entries


def _few(items: list[str], n: int = 3) -> str:
    """``a, b, c, ... (N in all)`` for a one-line message."""
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def missing_tensors_error(source: str, names: list[str]) -> HetMoEError:
    """The checkpoint of ``source`` lacks the model's tensors ``names``."""
    names = sorted(names)
    count = f"{len(names)} of the model's tensors are" if len(names) > 1 else "a tensor of the model is"
    return HetMoEError(
        f"{source}: {count} missing from the checkpoint ({_few(names)}); the checkpoint is incomplete or not "
        f"for this config.json: {_FIX}"
    )


def unused_tensors_warning(source: str, names: list[str]) -> str:
    """One warning line: the checkpoint holds tensors the model has no place for (they are ignored)."""
    return (
        f"{source}: ignoring {len(names)} checkpoint tensor{'s' if len(names) > 1 else ''} the model does not use "
        f"({_few(sorted(names))})"
    )


def shape_mismatch_error(
    source: str,
    mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    where: dict[str, _Entry],
    expected_by: str = "the model's config says",
) -> HetMoEError:
    """Checkpoint tensors ``(name, found, expected)`` of the wrong shape; ``where`` names the file of a tensor,
    ``expected_by`` where the expected shape comes from."""
    mismatches = sorted(mismatches)
    name, found, expected = mismatches[0]
    entry = where.get(name)
    place = f"{entry.path}: tensor {name}" if entry is not None else f"{source}: tensor {name}"
    more = f" ({len(mismatches) - 1} more tensors of the wrong shape)" if len(mismatches) > 1 else ""
    return HetMoEError(
        f"{place} has shape {tuple(found)}, {expected_by} {tuple(expected)}{more}; the checkpoint does "
        f"not match its config.json: {_FIX}"
    )


class Checkpoint:
    """The safetensors tensors of a model directory, by checkpoint key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        files = shard_files(self.directory)
        if files is not None:
            paths = [self.directory / f for f in files]
        elif (self.directory / SINGLE_NAME).is_file():
            paths = [self.directory / SINGLE_NAME]
        else:
            raise HetMoEError(
                f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}; scoring without loading needs "
                "safetensors weights (or load the model: --load full)"
            )
        self.entries: dict[str, _Entry] = {}
        for path in paths:
            self.entries.update(_read_header(path))
        self.nbytes = sum(p.stat().st_size for p in paths)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``key``, or its ``index``-th slice along the first dimension, into fresh host memory."""
        entry = self.entries[key]
        shape = entry.shape if index is None else entry.shape[1:]
        assert entry.dtype is not None  # Checkpoint refuses unknown dtypes when it reads the headers
        out = torch.empty(shape, dtype=entry.dtype)
        nbytes = out.numel() * out.element_size()
        offset = entry.begin + (0 if index is None else index * nbytes)
        if index is not None and not 0 <= index < entry.shape[0]:
            raise IndexError(f"{key}: index {index} out of range for {entry.shape[0]}")
        view = memoryview(cast("Buffer", out.view(torch.uint8).numpy())).cast("B") if nbytes else b""
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise HetMoEError(f"{entry.path}: short read of {key}; the file is truncated, re-download it")
                done += n
        finally:
            os.close(fd)
        return out


class ParameterSource:
    """Where each model parameter's values live in a checkpoint: the key of a tensor stored as the model stores
    it, or, for fused expert tensors that transformers builds from per-expert tensors, those tensors per expert."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self.checkpoint = checkpoint
        transforms = get_model_conversion_mapping(cast("PreTrainedModel", model))  # a transformers model
        # every transform is a renaming or a converter
        renamings = cast("list[WeightRenaming]", [t for t in transforms if not isinstance(t, WeightConverter)])
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        prefix = getattr(model, "base_model_prefix", "")
        self.direct: dict[str, str] = {}
        self.merged: dict[str, dict[int, dict[int, str]]] = {}  # param -> expert -> source pattern index -> key
        self.ops: dict[str, list] = {}
        self.patterns: dict[str, list[str]] = {}  # param -> the converter's source patterns
        for key in checkpoint.entries:
            target, pattern = rename_source_key(key, renamings, converters)
            target = _with_prefix(target, names, prefix)
            if pattern is None:
                self.direct[target] = key
                continue
            converter = by_pattern[pattern]
            numbers = re.findall(r"experts\.(\d+)\.", key)
            if not numbers:
                raise HetMoEError(
                    f"{key}: merged by transformers in a way scoring from the checkpoint does not read; "
                    "load the model instead (--load full)"
                )
            self.merged.setdefault(target, {}).setdefault(int(numbers[-1]), {})[
                converter.source_patterns.index(pattern)
            ] = key
            self.ops[target] = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
            self.patterns[target] = list(converter.source_patterns)

    def check(self, model: nn.Module, source: str) -> None:
        """Refuse a checkpoint that does not hold every tensor of ``model`` in its shape, from the headers alone:
        what loading the model would refuse (:func:`~.loader.load_model`), named the same way. Tensors that are
        legitimately absent (tied weights, the model's ignore patterns, non-persistent buffers) are not asked for."""
        from transformers.utils.loading_report import LoadStateDictInfo

        state = model.state_dict()  # parameters and persistent buffers (meta tensors: no memory)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source, tied after loading
        present = set(self.direct) | set(self.merged)
        missing = set(state) - set(tied) - present
        missing -= {s for t, s in tied.items() if t in present}  # transformers ties the other way round then
        info = LoadStateDictInfo(
            missing_keys=missing,
            unexpected_keys=present - set(state),
            mismatched_keys=set(),
            error_msgs=[],
            conversion_errors={},
            skipped_pp_keys=set(),
        )
        adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
        if adjust is not None:  # the model's own exceptions (old inv_freq, position_ids, ignore patterns)
            adjust(info)
        expected = set(state) - set(tied)
        absent = sorted(info.missing_keys) + [
            self._part_key(name, e, i)
            for name in sorted(set(self.merged) & expected)
            for e, parts in sorted(self.merged[name].items())
            for i in range(len(self.patterns[name]))
            if i not in parts
        ]
        if absent:
            raise missing_tensors_error(source, absent)
        for name in [n for n in state if n in self.merged and n in expected]:  # the model's order
            self._check_experts(source, name, tuple(state[name].shape))
        mismatched = [
            (key, self.checkpoint.shape(key), tuple(state[name].shape))
            for name, key in self.direct.items()
            if name in expected and self.checkpoint.shape(key) != tuple(state[name].shape)
        ]
        if mismatched:
            raise shape_mismatch_error(source, mismatched, self.checkpoint.entries)
        if info.unexpected_keys:
            unused = [self.direct[t] for t in info.unexpected_keys if t in self.direct]
            unused += [
                k for t in info.unexpected_keys if t in self.merged for p in self.merged[t].values() for k in p.values()
            ]
            _log.warning(unused_tensors_warning(source, unused))

    def _check_experts(self, source: str, name: str, shape: tuple[int, ...]) -> None:
        """Every expert of the fused ``name`` present once, of the shape the model's config gives it."""
        experts = self.merged[name]
        missing = [e for e in range(shape[0]) if e not in experts]
        if missing:
            raise HetMoEError(
                f"{source}: the checkpoint has no expert {missing[0]} for {name}; it does not match the model's config "
                f"({_FIX})"
            )
        if max(experts) >= shape[0]:
            raise HetMoEError(
                f"{source}: the checkpoint has {max(experts) + 1} experts for {name}, the model's config says "
                f"{shape[0]}; the checkpoint does not match its config.json ({_FIX})"
            )
        common = {  # the shape most experts' part i has
            i: Counter(self.checkpoint.shape(p[i]) for p in experts.values()).most_common(1)[0][0]
            for i in range(len(self.patterns[name]))
        }
        for e in sorted(experts):
            found = self._expert_shape(name, e)
            if found is not None and found != shape[1:]:
                odd = [(k, self.checkpoint.shape(k), common[i]) for i, k in experts[e].items()]
                odd = [m for m in odd if m[1] != m[2]]
                if odd:  # one expert unlike the others: a damaged tensor, named
                    raise shape_mismatch_error(source, odd, self.checkpoint.entries, "the other experts' have")
                raise HetMoEError(
                    f"{source}: the checkpoint's expert {e} of {name} has shape {found}, the model's config says "
                    f"{shape[1:]}; the checkpoint does not match its config.json ({_FIX})"
                )

    def _expert_shape(self, name: str, index: int) -> tuple[int, ...] | None:
        """The shape :meth:`expert` returns, from the headers (None: a conversion :meth:`expert` does not read)."""
        shapes = [self.checkpoint.shape(self.merged[name][index][i]) for i in sorted(self.merged[name][index])]
        ops = self.ops[name]
        if ops == [("MergeModulelist", 0)] and len(shapes) == 1:
            return shapes[0]
        if ops[:1] == [("MergeModulelist", 0)] and len(ops) == 2 and ops[1][0] == "Concatenate":
            dim = ops[1][1] - 1
            if any(
                len(s) != len(shapes[0]) or s[:dim] + s[dim + 1 :] != shapes[0][:dim] + shapes[0][dim + 1 :]
                for s in shapes
            ):
                return tuple(shapes[0][:dim]) + (-1,)  # parts that do not concatenate: never the config's shape
            return shapes[0][:dim] + (sum(s[dim] for s in shapes),) + shapes[0][dim + 1 :]
        return None

    def _part_key(self, name: str, index: int, part: int) -> str:
        """The checkpoint key of the missing ``part`` of expert ``index`` of ``name``, after a present sibling's."""
        parts = self.merged[name][index]
        sibling_index = min(parts)
        sibling = parts[sibling_index]
        have = self.patterns[name][sibling_index].replace("*", str(index))
        want = self.patterns[name][part].replace("*", str(index))
        return sibling.replace(have, want) if have in sibling else f"{name} (expert {index}: {want})"

    def read(self, name: str) -> torch.Tensor:
        """The whole parameter ``name`` (a small one: routers, norms)."""
        if name in self.direct:
            return self.checkpoint.read(self.direct[name])
        if name not in self.merged:
            raise missing_tensors_error(str(self.checkpoint.directory), [name])
        return torch.stack([self.expert(name, e) for e in sorted(self.merged[name])])

    def expert(self, name: str, index: int) -> torch.Tensor:
        """Row ``index`` (one expert) of the fused parameter ``name``, as the model stores it."""
        if name in self.direct:
            key = self.direct[name]
            if not 0 <= index < self.checkpoint.shape(key)[0]:
                raise HetMoEError(
                    f"the checkpoint's {key} has {self.checkpoint.shape(key)[0]} experts, not "
                    f"{index + 1} or more; it does not match the model's config ({_FIX})"
                )
            return self.checkpoint.read(key, index)
        if name not in self.merged:
            raise missing_tensors_error(str(self.checkpoint.directory), [name])
        parts = self.merged[name].get(index)
        if not parts:
            raise HetMoEError(
                f"{self.checkpoint.directory}: the checkpoint has no expert {index} for {name}; it does not match "
                f"the model's config ({_FIX})"
            )
        if len(parts) < len(self.patterns[name]):
            missing = [self._part_key(name, index, i) for i in range(len(self.patterns[name])) if i not in parts]
            raise missing_tensors_error(str(self.checkpoint.directory), missing)
        ops = self.ops[name]
        tensors = [self.checkpoint.read(parts[i]) for i in sorted(parts)]
        if ops == [("MergeModulelist", 0)] and len(tensors) == 1:
            return tensors[0]
        if ops[:1] == [("MergeModulelist", 0)] and ops[1:] and ops[1][0] == "Concatenate" and len(ops) == 2:
            return torch.cat(tensors, dim=ops[1][1] - 1)  # Concatenate(dim=d) of the merged [E, ...] stacks
        raise HetMoEError(
            f"{name}: transformers builds it with {ops}, which scoring from the checkpoint does not "
            "read; load the model instead (--load full)"
        )


def _with_prefix(key: str, names: set[str], prefix: str) -> str:
    """Checkpoints of a base model lack the ``model.`` prefix of a causal-LM's names (and the other way round)."""
    if key in names or not prefix:
        return key
    if f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:
        return key[len(prefix) + 1 :]
    return key
