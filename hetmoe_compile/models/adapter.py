"""Family adapters: the few facts that differ between MoE families, as data.

Adding a family is one small file in this package that builds a :class:`FamilyAdapter` and calls
:func:`register`. Everything else (recognition, canonicalisation, scoring, export) is generic.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores its fused routed-expert weights.

    Canonical form (what the project uses internally): ``gate_up [E, 2I, H]`` with the gate rows first, then the
    up rows; ``down [E, H, I]``; one row is one neuron (``[out_features, in_features]``).
    """

    transposed: bool = False
    """Stored as ``[E, in, out]`` (GPT-OSS: ``gate_up [E, H, 2I]``, ``down [E, I, H]``)."""
    interleaved: bool = False
    """Gate and up neurons alternate (gate = even, up = odd) instead of gate block then up block."""
    has_bias: bool = False
    """``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]`` exist."""
    activation: str = "glu"
    """``glu``: act(gate) * up with the config's ``hidden_act``; ``gpt_oss_glu``: GPT-OSS's clamped swiglu."""


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its MoE pieces inside a decoder layer."""

    name: str
    """Short family name used in reports (``olmoe``)."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this adapter serves."""
    block_attrs: tuple[str, ...] = ("mlp",)
    """Attribute of the decoder layer holding the MoE block (or the dense MLP in dense layers)."""
    router_attr: str = "gate"
    """Attribute of the MoE block holding the router (a module with ``weight [E, H]``)."""
    shared_attrs: tuple[str, ...] = ()
    """Attributes of the MoE block holding shared experts and their gate (digital, dense)."""
    layout: ExpertLayout = field(default_factory=ExpertLayout)
    notes: str = ""


_REGISTRY: dict[str, FamilyAdapter] = {}


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make ``adapter`` known to :func:`adapter_for`; returns it for module-level assignment."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def registered() -> dict[str, FamilyAdapter]:
    """All registered adapters by ``model_type``."""
    return dict(_REGISTRY)
