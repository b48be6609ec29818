"""Capture a (canonicalised) causal LM as an FX graph with ``torch.export`` (non-strict, dynamic batch and seq),
and tag its nodes with their placement."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from .errors import HetMoEError
from .models.recognize import ModelInfo, recognize
from .placement.placement import Placement


class LogitsModule(nn.Module):
    """``(input_ids, attention_mask) -> logits`` without a KV cache: the graph we export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


ROOT_PREFIX = "model."
"""Module paths inside the exported graph carry this prefix (the :class:`LogitsModule` attribute)."""


def export_model(model: nn.Module, batch: int = 2, seq: int = 8) -> ExportedProgram:
    """``torch.export`` the model with dynamic batch and sequence dimensions."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    b, s = (
        Dim("batch", min=1, max=1024),
        Dim("seq", min=2, max=int(getattr(model.config, "max_position_embeddings", 4096))),
    )
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
    try:
        with torch.no_grad():
            return torch.export.export(
                LogitsModule(model).eval(), (input_ids, attention_mask), dynamic_shapes=shapes, strict=False
            )
    except Exception as exc:  # surface the first line; the traceback stays chained
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HetMoEError(f"torch.export failed for {type(model).__name__}: {first}") from exc


def tag_graph(model: nn.Module, placement: Placement, info: ModelInfo | None = None) -> ExportedProgram:
    """Canonicalise ``model`` in place to ``placement``, ``torch.export`` it and tag every node's placement."""
    from .canonicalize import canonicalize
    from .passes.annotate_placement_pass import AnnotatePlacementPass

    info = info or recognize(model)
    canonicalize(model, placement.devices(), info)
    info = recognize(model)  # module kinds of the canonical model
    ep = export_model(model)
    sig = ep.graph_signature
    fqns = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    annotate = AnnotatePlacementPass(placement, info, fqns, ROOT_PREFIX)
    result = annotate(ep.graph_module)
    assert result is not None
    return ep
