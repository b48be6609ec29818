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
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import HetMoEError

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.core_model_loading import WeightRenaming
    from typing_extensions import Buffer

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
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file


def _read_header(path: Path) -> dict[str, _Entry]:
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
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise HetMoEError(
                f"{path}: tensor {key} has dtype {meta['dtype']}, which scoring from the checkpoint "
                "does not read; load the model instead (--load full)"
            )
        begin, end = meta["data_offsets"]
        entry = _Entry(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + length + begin)
        if 8 + length + end > size:
            raise HetMoEError(
                f"{path}: truncated safetensors file (tensor {key} ends past the end of the file); "
                "re-download or re-save the model"
            )
        out[key] = entry
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

    def read(self, name: str) -> torch.Tensor:
        """The whole parameter ``name`` (a small one: routers, norms)."""
        if name in self.direct:
            return self.checkpoint.read(self.direct[name])
        if name not in self.merged:
            raise HetMoEError(f"the checkpoint has no tensor for {name}; it does not match the model's config")
        return torch.stack([self.expert(name, e) for e in sorted(self.merged[name])])

    def expert(self, name: str, index: int) -> torch.Tensor:
        """Row ``index`` (one expert) of the fused parameter ``name``, as the model stores it."""
        if name in self.direct:
            key = self.direct[name]
            if not 0 <= index < self.checkpoint.shape(key)[0]:
                raise HetMoEError(
                    f"the checkpoint's {key} has {self.checkpoint.shape(key)[0]} experts, not "
                    f"{index + 1} or more; it does not match the model's config"
                )
            return self.checkpoint.read(key, index)
        if name not in self.merged:
            raise HetMoEError(f"the checkpoint has no tensor for {name}; it does not match the model's config")
        parts = self.merged[name].get(index)
        if not parts:
            raise HetMoEError(f"the checkpoint has no expert {index} for {name}; it does not match the model's config")
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
