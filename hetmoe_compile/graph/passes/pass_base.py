"""Shared pass plumbing: ``torch.fx`` infra's PassBase/PassResult, and errors that name the failing pass."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ...base.errors import HetMoEError

PLACEMENT_META = "hetmoe_placement"
"""``node.meta`` key holding a :class:`NodePlacement`."""
EXPERT_GROUP_OP = "hetmoe.expert_group"


class NodePlacement(NamedTuple):
    """Where one FX node runs and why."""

    device: str
    kind: str
    module: str
    reason: str


class PassError(HetMoEError):
    """A graph pass could not run; the message names the pass."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"{pass_name}: {message}")


def attr_value(graph_module, target: str) -> Any:
    """The object a ``get_attr`` target (``a.b.c``) names on ``graph_module``."""
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def drop_unused_attrs(graph_module) -> None:
    """Erase the ``get_attr`` nodes no node uses any more (weights a rewrite replaced). Nothing else: FX's plain
    ``eliminate_dead_code`` would also erase in-place calls whose results go unused (``scatter_``, ``copy_``,
    ``setitem`` in the families' routers and attention), silently changing the numbers."""
    graph_module.graph.eliminate_dead_code(is_impure_node=lambda node: node.op != "get_attr")


def is_expert_group(node) -> bool:
    """True for a call of the ``hetmoe::expert_group`` op (aten overload or the op packet)."""
    return node.op == "call_function" and str(node.target).startswith(EXPERT_GROUP_OP)


__all__ = [
    "PLACEMENT_META",
    "NodePlacement",
    "PassBase",
    "PassError",
    "PassResult",
    "attr_value",
    "drop_unused_attrs",
    "is_expert_group",
]
