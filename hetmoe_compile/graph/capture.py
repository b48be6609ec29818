"""Capture a (canonicalised) causal LM as an FX graph with ``torch.export`` (non-strict, dynamic batch and seq),
and tag its nodes with their placement."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from ..base.errors import HetMoEError
from ..models.recognize import ModelInfo, recognize
from ..placement.placement import Placement


class LogitsModule(nn.Module):
    """``(input_ids, attention_mask) -> logits`` without a KV cache: the graph we export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


ROOT_PREFIX = "model."
"""Module paths inside the exported graph carry this prefix (the :class:`LogitsModule` attribute)."""


def export_model(model: nn.Module, batch: int = 2, seq: int = 8, kv_cache: bool = False) -> ExportedProgram:
    """``torch.export`` the model with dynamic batch and sequence dimensions; with ``kv_cache``, the
    :class:`~hetmoe_compile.graph.kv_cache.CachedLogitsModule` graph with dynamic past and total lengths too."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2))
    context = int(getattr(model.config, "max_position_embeddings", 4096))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    b = Dim("batch", min=1, max=1024)
    module: nn.Module
    if kv_cache:
        from .kv_cache import CachedLogitsModule, cache_shapes

        past_len, s = 6, Dim("seq", min=1, max=context)  # example sizes >= 2; the minima 0 and 1 still hold
        dtype = next(model.parameters()).dtype
        past = [torch.zeros(batch, h, past_len, w, dtype=dtype, device=device) for h, w in cache_shapes(model)]
        attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
        position_ids = torch.arange(past_len, past_len + seq, device=device).expand(batch, -1)
        args: tuple = (input_ids, attention_mask, position_ids, past)
        p = Dim("past", min=0, max=context)
        shapes: dict = {
            "input_ids": {0: b, 1: s},
            "attention_mask": {0: b, 1: Dim("total", min=1, max=2 * context)},  # solved as past + seq
            "position_ids": {0: b, 1: s},
            "past_key_values": [{0: b, 2: p}] * len(past),
        }
        module = CachedLogitsModule(model)
    else:
        s = Dim("seq", min=2, max=context)
        shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
        args, module = (input_ids, attention_mask), LogitsModule(model)
    try:
        with torch.no_grad():
            return torch.export.export(module.eval(), args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # surface the first line; the traceback stays chained
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HetMoEError(f"torch.export failed for {type(model).__name__}: {first}") from exc


def export_placed(
    model: nn.Module, placement: Placement, info: ModelInfo | None = None, kv_cache: bool = False
) -> ExportedProgram:
    """Canonicalise ``model`` in place to ``placement``, ``torch.export`` it (with a KV cache when ``kv_cache``)
    and tag every node's placement."""
    from ..transforms.canonicalize import canonicalize
    from .passes.annotate_placement_pass import AnnotatePlacementPass

    info = info or recognize(model)
    canonicalize(model, placement.devices(), info)
    info = recognize(model)  # module kinds of the canonical model
    ep = export_model(model, kv_cache=kv_cache)
    sig = ep.graph_signature
    fqns = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    annotate = AnnotatePlacementPass(placement, info, fqns, ROOT_PREFIX)
    result = annotate(ep.graph_module)
    assert result is not None
    return ep
