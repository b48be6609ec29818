"""Models sharded over devices with accelerate's device maps (``device_map="auto"``, or a dict), offload included.

A sharded model's decoder layers sit on several devices; accelerate's hooks move activations between them. A layer
offloaded to host memory or disk keeps its weights in the hook's store and on the meta device in the module,
loading them for the time of its forward. This module holds what the pipeline needs to work on such a model:

- :func:`execution_device` / :func:`input_device`: where a module computes, where the input ids go;
- :func:`onloaded`: a module's offloaded weights, loaded for a block (scoring and canonicalising read them);
- :func:`require_resident`: a clear error for the steps that need every weight in memory (export, HPD, ROMER,
  the dense-on-analog ablation).

Canonicalising an offloaded layer builds its expert groups from the loaded weights on the layer's execution
device, so its routed experts become resident there (its attention and norms stay offloaded); every expert group
is programmed on its own group's device.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ..base.errors import HetMoEError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else its first resident
    parameter's device, else the CPU."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a causal LM's input ids go: the execution device of its input embeddings."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return execution_device(embeddings if embeddings is not None else model)


def is_offloaded(module: nn.Module) -> bool:
    """True if ``module`` itself has weights offloaded by an accelerate hook (they sit on the meta device)."""
    return any(getattr(h, "offload", False) for h in _hooks(module))


def onloaded(module: nn.Module):
    """Context: ``module``'s offloaded weights loaded on its execution device for the block (no-op otherwise)."""
    if not is_offloaded(module):
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module)


def offloaded_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_offloaded(m)]


def require_resident(model: nn.Module, what: str) -> None:
    """Refuse ``what`` on a model with offloaded weights, naming them and the fix."""
    names = offloaded_modules(model)
    if names:
        raise HetMoEError(
            f"{what} needs every weight in memory, but {len(names)} modules are offloaded by the "
            f"device map (e.g. {names[0]}); load the model without offload (more devices or memory, "
            "or no --device-map)"
        )


def parse_device_map(value: str) -> str | dict:
    """``--device-map``: a strategy (auto, balanced, balanced_low_0, sequential), a JSON object, or a JSON file."""
    if value in STRATEGIES:
        return value
    text = value
    path = Path(value).expanduser()
    if not value.lstrip().startswith("{"):
        if not path.is_file():
            raise HetMoEError(
                f"--device-map {value}: not a strategy ({', '.join(STRATEGIES)}), a JSON object or a "
                "JSON file; e.g. --device-map auto"
            )
        text = path.read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HetMoEError(
            f"--device-map {value}: not valid JSON ({exc.msg} at line {exc.lineno}); give "
            '{"module name": "cuda:0" | "cpu" | "disk", ...}'
        ) from exc
    if not isinstance(mapping, dict) or not mapping:
        raise HetMoEError(f"--device-map {value}: expected a JSON object of module name -> device")
    for key, device in mapping.items():
        if not isinstance(device, (str, int)) or (
            isinstance(device, str) and device not in ("cpu", "disk", "meta") and not _is_device(device)
        ):
            raise HetMoEError(f"--device-map: module {key!r} has device {device!r}; use cuda:N, N, cpu or disk")
    return mapping


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


def check_dtype_on_device(dtype: torch.dtype, device: torch.device | str) -> None:
    """A dtype the device has no fast kernels for is an error, not a silently slow or wrong run."""
    device = torch.device(device)
    if (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise HetMoEError(
            f"{torch.cuda.get_device_name(device)} has no bfloat16 kernels; use --dtype float16 or float32"
        )
