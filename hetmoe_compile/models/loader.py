"""Load a causal LM from a local directory or a Hugging Face hub id."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..errors import HetMoEError


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def resolve_source(source: str) -> str:
    """A local directory (validated) or a hub id ``owner/name``; anything else is an error that says why."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HetMoEError(f"{source}: directory has no config.json; point MODEL at a Hugging Face model directory")
        return str(path)
    if path.exists():
        raise HetMoEError(f"{source}: is a file, not a model directory; point MODEL at a directory with config.json")
    if _looks_like_path(source):
        raise HetMoEError(
            f"{source}: no such model directory; give an existing directory or a hub id like 'owner/name'"
        )
    return source


def _cpu_dtype(resolved: str) -> str | torch.dtype:
    """float16 checkpoints run in float32 on CPU (CPU half matmuls are slow and lose precision); else as stored."""
    from transformers import AutoConfig

    try:
        stored = getattr(AutoConfig.from_pretrained(resolved), "dtype", None)
    except (OSError, ValueError):
        return "auto"
    return torch.float32 if str(stored).replace("torch.", "") == "float16" else "auto"


def load_model(
    source: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
) -> nn.Module:
    """Load ``AutoModelForCausalLM`` from a directory or hub id, in eval mode.

    ``dtype="auto"`` follows the checkpoint (float16 checkpoints load as float32 on CPU); a hub id needs network
    access (or a filled HF cache). ``device_map`` (``"auto"``, another accelerate strategy, or a dict of module name
    -> device) shards the model over devices instead of putting it on ``device``, with ``max_memory`` per device and
    ``offload_folder`` for layers offloaded to disk (see :mod:`.device_map`).
    """
    from transformers import AutoModelForCausalLM

    from .device_map import check_dtype_on_device

    resolved = resolve_source(source)
    if Path(resolved).is_dir():
        from .checkpoint import shard_files

        shard_files(Path(resolved))  # a missing shard is named before transformers starts loading
    on_cpu = torch.device(device).type == "cpu" if device_map is None else not torch.cuda.is_available()
    if dtype == "auto" and on_cpu:
        dtype = _cpu_dtype(resolved)
    if isinstance(dtype, torch.dtype):
        check_dtype_on_device(dtype, device if device_map is None else ("cpu" if on_cpu else "cuda"))
    kwargs = (
        {} if device_map is None else dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if device_map is not None and "offload_folder" in first:
            raise HetMoEError(
                f"{source}: the devices of --device-map {_describe(device_map)} cannot hold the model, "
                "and the rest would go to disk; pass --offload-folder DIR (or more memory with "
                "--max-memory, or more devices)"
            ) from exc
        raise HetMoEError(
            f"{source}: could not load the model ({first}); check the path or hub id, and network access for hub ids"
        ) from exc
    # cast: transformers types PreTrainedModel.to as the unbound nn.Module.to (``@wraps``); the call is the same
    return (model if device_map is not None else cast(nn.Module, model).to(device)).eval()


def _describe(device_map: str | dict) -> str:
    return device_map if isinstance(device_map, str) else f"({len(device_map)} entries)"


def load_meta_model(source: str, dtype: str | torch.dtype = "auto"):
    """``(model, parameters)``: the model of a local directory built on the meta device (its structure, no weights)
    and a :class:`~.checkpoint.ParameterSource` that reads its parameters from the safetensors files on demand.
    ``dtype`` as in :func:`load_model` (the meta model's dtype is the one the loaded model would have)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import Checkpoint, ParameterSource

    resolved = resolve_source(source)
    if not Path(resolved).is_dir():
        raise HetMoEError(
            f"{source}: scoring without loading reads a local directory's safetensors files; download "
            "the model first, or load it (--load full)"
        )
    checkpoint = Checkpoint(resolved)
    config = AutoConfig.from_pretrained(resolved)
    if dtype == "auto":
        dtype = _cpu_dtype(resolved)
    if dtype == "auto":
        stored = getattr(config, "dtype", None)
        dtype = getattr(torch, str(stored).replace("torch.", "")) if stored else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), ParameterSource(checkpoint, model)


def load_tokenizer(source: str):
    """The tokenizer saved with the model (``tokenizer.json``); error if the model has none."""
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as exc:
        raise HetMoEError(
            f"{source}: no tokenizer found beside the model; calibration text needs one (save tokenizer.json there)"
        ) from exc
