"""Recognise the MoE structure of a Hugging Face causal LM: per decoder layer, the router, the routed experts,
shared experts, attention, norms and dense MLPs; plus embeddings and the LM head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.errors import UnsupportedModelError
from ..ir.expert_group import HetExperts
from .adapter import FamilyAdapter, registered

# Module kinds. Everything but ROUTED_EXPERTS is a densely activated module.
ROUTED_EXPERTS = "routed_experts"
DENSE_KINDS = ("embedding", "attention", "norm", "router", "shared_expert", "dense_mlp", "lm_head", "other")


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block, by module path."""

    index: int
    block: str
    router: str
    experts: str
    shared: tuple[str, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int


@dataclass
class ModelInfo:
    """What the front end recognised in a model."""

    architecture: str
    model_type: str
    adapter: FamilyAdapter
    num_layers: int
    moe_layers: list[MoELayer]
    module_kinds: dict[str, str] = field(default_factory=dict)
    """Every module that owns parameters or buffers -> its kind (``routed_experts`` or one of DENSE_KINDS)."""

    @property
    def family(self) -> str:
        return self.adapter.name

    def layer(self, index: int) -> MoELayer:
        for layer in self.moe_layers:
            if layer.index == index:
                return layer
        raise KeyError(f"decoder layer {index} has no MoE block")

    def kind_of(self, module_path: str) -> str:
        """Kind of the module at ``module_path`` or of its nearest recognised ancestor."""
        path = module_path
        while True:
            if path in self.module_kinds:
                return self.module_kinds[path]
            if "." not in path:
                return self.module_kinds.get(path, "other")
            path = path.rsplit(".", 1)[0]

    def owner_of(self, module_path: str) -> str:
        """The nearest recognised module at or above ``module_path`` (``module_path`` itself if none is)."""
        path = module_path
        while path:
            if path in self.module_kinds:
                return path
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return module_path


def supported_architectures() -> list[str]:
    """The ``model_type`` values that have an adapter."""
    return sorted(registered())


def _adapter_for(model: nn.Module) -> FamilyAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    adapter = registered().get(model_type or "")
    if adapter is None:
        raise UnsupportedModelError(
            f"architecture {archs[0]} (model_type '{model_type}') is not supported; supported model types: "
            f"{', '.join(supported_architectures())}. To add a family, write hetmoe_compile/models/<family>.py "
            "with a FamilyAdapter (see models/olmoe.py) and import it in hetmoe_compile/models/__init__.py"
        )
    return adapter


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise UnsupportedModelError(
        f"{type(model).__name__}: found no decoder layer list (an nn.ModuleList named 'layers'); "
        "only decoder-only causal LMs are supported"
    )


def _is_het(module: nn.Module | None) -> bool:
    return isinstance(module, HetExperts)


def _is_experts(module: nn.Module | None) -> bool:
    return _is_het(module) or (
        module is not None
        and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(module, "down_proj", None), torch.Tensor)
    )


def recognize(model: nn.Module) -> ModelInfo:
    """Find the MoE structure of ``model``; raise :class:`UnsupportedModelError` if there is none."""
    adapter = _adapter_for(model)
    config: Any = model.config  # a transformers config
    layers_path, layers = _decoder_layers(model)
    moe_layers: list[MoELayer] = []
    kinds: dict[str, str] = {}
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}"
        if hasattr(layer, "self_attn"):
            kinds[f"{prefix}.self_attn"] = "attention"
        for attr in adapter.block_attrs:
            block = getattr(layer, attr, None)
            if block is None:
                continue
            block_path = f"{prefix}.{attr}"
            experts = getattr(block, "experts", None)
            if not _is_experts(experts):
                kinds[block_path] = "dense_mlp"
                continue
            assert experts is not None  # _is_experts(None) is False
            router = getattr(block, adapter.router_attr, None)
            if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
                raise UnsupportedModelError(
                    f"{block_path}: expected a router at '.{adapter.router_attr}' with a weight [E, H]; "
                    f"the {adapter.name} adapter does not match this model"
                )
            shared = tuple(f"{block_path}.{a}" for a in adapter.shared_attrs if getattr(block, a, None) is not None)
            if _is_het(experts):  # already canonical: groups hold [n, H, I] down weights
                num_experts = experts.num_experts
                hidden, inter = next(iter(experts.groups.values())).down.shape[1:]
            else:
                num_experts = experts.gate_up_proj.shape[0]
                down = experts.down_proj
                inter = down.shape[1] if adapter.layout.transposed else down.shape[2]
                hidden = down.shape[2] if adapter.layout.transposed else down.shape[1]
            top_k = getattr(router, "top_k", None) or config.num_experts_per_tok
            moe_layers.append(
                MoELayer(
                    index=i,
                    block=block_path,
                    router=f"{block_path}.{adapter.router_attr}",
                    experts=f"{block_path}.experts",
                    shared=shared,
                    num_experts=int(num_experts),
                    top_k=int(top_k),
                    hidden_size=int(hidden),
                    intermediate_size=int(inter),
                )
            )
            kinds[f"{block_path}.experts"] = ROUTED_EXPERTS
            kinds[f"{block_path}.{adapter.router_attr}"] = "router"
            for path in shared:
                kinds[path] = "shared_expert"
    if not moe_layers:
        archs = getattr(config, "architectures", None) or [type(model).__name__]
        raise UnsupportedModelError(
            f"model {archs[0]} has no MoE layer (no decoder layer has routed experts at "
            f"{'/'.join(adapter.block_attrs)}.experts); hetmoe-compile places routed experts, so a dense model "
            "has nothing to place: run it digitally as it is"
        )
    # Every remaining module that owns tensors: embeddings, norms, LM head, anything else.
    for name, module in model.named_modules():
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if not owns or _recognised_ancestor(name, kinds):
            continue
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif name.split(".")[-1] == "lm_head":
            kinds[name] = "lm_head"
        elif "norm" in type(module).__name__.lower():
            kinds[name] = "norm"
        else:
            kinds[name] = "other"
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        architecture=archs[0],
        model_type=config.model_type,
        adapter=adapter,
        num_layers=len(layers),
        moe_layers=moe_layers,
        module_kinds=kinds,
    )


def _recognised_ancestor(name: str, kinds: dict[str, str]) -> bool:
    path = name
    while path:
        if path in kinds:
            return True
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return False
