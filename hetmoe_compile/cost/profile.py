"""What the cost model needs to know about a model: the shapes of its dense projections, its other parameters, its
attention layers and its MoE layers, read once by walking the modules (original or canonical models alike)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..analog.simulate import DENSE_ANALOG_KINDS
from ..models.recognize import ROUTED_EXPERTS, ModelInfo
from ..transforms.hpd import hpd_modules


@dataclass(frozen=True)
class LinearShape:
    """A dense projection ``[out, in]`` (an ``nn.Linear``, or a router-like module with a 2-D ``weight``).

    ``dense_analog``: on tiles when dense modules are analog (an ``nn.Linear`` of attention, shared experts, dense
    MLPs or the LM head, as :func:`~hetmoe_compile.analog.simulate.simulate` does). ``hpd``: ``"analog"`` for an HPD
    ``u_sigma``, ``"digital"`` for a ``v_t``, else ``None``. ``owner``: the recognised module it belongs to."""

    name: str
    kind: str
    owner: str
    in_features: int
    out_features: int
    bias: int
    dense_analog: bool
    hpd: str | None
    weight_id: int
    bias_id: int | None


@dataclass(frozen=True)
class TensorShape:
    """Any other dense parameter (embeddings, norms, attention sinks); ``row`` is the elements one token reads
    from an embedding table (``None``: the whole tensor, once per batch)."""

    name: str
    kind: str
    numel: int
    row: int | None
    param_id: int


@dataclass(frozen=True)
class AttentionShape:
    """One self-attention layer: query and key/value heads, head dims and sliding window (``None``: full)."""

    name: str
    heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    window: int | None


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: ``E`` experts of ``[2I, H]`` + ``[H, I]`` (+ ``bias`` elements each), top-``K`` routing, and the
    ``(bits, group_size)`` of its digital experts when the model's digital group is quantised."""

    index: int
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    bias: int
    quant: tuple[int, int] | None


@dataclass(frozen=True)
class ModelProfile:
    linears: tuple[LinearShape, ...]
    tensors: tuple[TensorShape, ...]
    attention: tuple[AttentionShape, ...]
    moe: tuple[MoEShape, ...]
    dtype_bytes: int

    @classmethod
    def of(cls, model: nn.Module, info: ModelInfo) -> ModelProfile:
        return profile_model(model, info)


def profile_model(model: nn.Module, info: ModelInfo) -> ModelProfile:
    """Walk ``model``'s modules once; routed experts come from ``info`` (their fused or grouped tensors are skipped)."""
    hpd = set(hpd_modules(model))  # an HPD split's u_sigma child runs on AIMC, its v_t child digitally
    linears, tensors = [], []
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params or info.kind_of(name) == ROUTED_EXPERTS:
            continue
        kind, owner = info.kind_of(name), info.owner_of(name)
        weight = params.get("weight")
        if weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            parent, _, leaf = name.rpartition(".")
            split = ("analog" if leaf == "u_sigma" else "digital") if parent in hpd else None
            bias = params.get("bias")
            if split is not None:
                owner = info.owner_of(parent)
            linears.append(
                LinearShape(
                    name,
                    kind,
                    owner,
                    int(weight.shape[1]),
                    int(weight.shape[0]),
                    0 if bias is None else bias.numel(),
                    isinstance(module, nn.Linear) and kind in DENSE_ANALOG_KINDS,
                    split,
                    id(weight),
                    None if bias is None else id(bias),
                )
            )
            rest = {k: p for k, p in params.items() if k not in ("weight", "bias")}
        else:
            rest = params
        for pname, p in rest.items():
            row = module.embedding_dim if isinstance(module, nn.Embedding) and pname == "weight" else None
            tensors.append(TensorShape(f"{name}.{pname}" if name else pname, kind, p.numel(), row, id(p)))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return ModelProfile(
        tuple(linears),
        tuple(tensors),
        _attention(model, info),
        _moe(model, info),
        torch.empty((), dtype=dtype).element_size(),
    )


def _attention(model: nn.Module, info: ModelInfo) -> tuple[AttentionShape, ...]:
    cfg = cast(Any, model).config  # a Hugging Face config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    qk_dim = int(getattr(cfg, "qk_head_dim", None) or head_dim)
    v_dim = int(getattr(cfg, "v_head_dim", None) or head_dim)
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    out = []
    for name, kind in info.module_kinds.items():
        m = re.search(r"\.(\d+)\.self_attn$", name)
        if kind != "attention" or not m:
            continue
        i = int(m.group(1))
        sliding = i < len(layer_types) and layer_types[i] == "sliding_attention"
        out.append(AttentionShape(name, heads, kv_heads, qk_dim, v_dim, int(window) if sliding and window else None))
    return tuple(out)


def _moe(model: nn.Module, info: ModelInfo) -> tuple[MoEShape, ...]:
    from ..transforms.lowbit import QUANT_ATTR

    out = []
    for layer in info.moe_layers:
        h, i = layer.hidden_size, layer.intermediate_size
        groups = getattr(model.get_submodule(layer.experts), "groups", {})
        quant = getattr(groups["digital"], QUANT_ATTR, None) if "digital" in groups else None
        out.append(
            MoEShape(
                layer.index,
                layer.num_experts,
                layer.top_k,
                h,
                i,
                2 * i + h if info.adapter.layout.has_bias else 0,
                (quant["bits"], quant["group_size"]) if quant else None,
            )
        )
    return tuple(out)
