"""Shared pass plumbing: ``torch.fx`` infra's PassBase/PassResult, and errors that name the failing pass."""
from __future__ import annotations

from typing import NamedTuple

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import HetMoEError

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


def is_expert_group(node) -> bool:
    """True for a call of the ``hetmoe::expert_group`` op (aten overload or the op packet)."""
    return node.op == "call_function" and str(node.target).startswith(EXPERT_GROUP_OP)


__all__ = ["PLACEMENT_META", "NodePlacement", "PassBase", "PassError", "PassResult", "is_expert_group"]
