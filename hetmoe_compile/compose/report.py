"""Readable reports: node counts and parameter share per device, and a per-node placement listing."""

from __future__ import annotations

from collections import Counter

from torch import fx

from ..base.tables import format_table
from ..graph.passes.pass_base import PLACEMENT_META
from ..placement.placement import Placement


def node_counts(graph_module: fx.GraphModule) -> dict[str, dict[str, int]]:
    """``{device: {kind: count}}`` over tagged nodes."""
    counts: dict[str, Counter] = {"digital": Counter(), "analog": Counter()}
    for node in graph_module.graph.nodes:
        tag = node.meta.get(PLACEMENT_META)
        if tag is not None:
            counts[tag.device][tag.kind] += 1
    return {dev: dict(sorted(c.items())) for dev, c in counts.items()}


def placement_report(placement: Placement, graph_module: fx.GraphModule | None = None, verbose: bool = False) -> str:
    """Parameter share per device, experts per layer and (with a tagged graph) node counts per device."""
    share = placement.parameter_share
    policy = placement.policy
    how = f"digital fraction {policy.digital_fraction:g}"
    if policy.budget is not None:
        from ..cost.units import format_budget

        kind, value = policy.budget
        n = sum(len(l.experts) for l in placement.layers)
        how = (
            f"{kind.replace('_', ' ')} budget {format_budget(kind, value)} (replaces --digital-fraction: "
            f"{round(policy.digital_fraction * n)}/{n} experts digital)"
        )
    out = [
        f"placement of {placement.model['architecture']} ({placement.model['source'] or 'in memory'}): "
        f"{how}, selector {policy.selector}, scope {policy.scope}, dense modules {policy.dense}",
        "",
        format_table(
            ["device", "parameters", "share"],
            [[d, f"{share[d]['params']:,}", f"{100 * share[d]['share']:.1f}%"] for d in ("digital", "analog")],
        ),
        "",
        format_table(
            ["layer", "digital experts", "analog"],
            [[l.index, " ".join(map(str, l.ids("digital"))) or "-", len(l.ids("analog"))] for l in placement.layers],
        ),
    ]
    if graph_module is not None:
        counts = node_counts(graph_module)
        kinds = sorted({k for c in counts.values() for k in c})
        rows = [[k, counts["digital"].get(k, 0), counts["analog"].get(k, 0)] for k in kinds]
        rows.append(["total", sum(counts["digital"].values()), sum(counts["analog"].values())])
        out += ["", format_table(["graph nodes by kind", "digital", "analog"], rows)]
        if verbose:
            out.append("")
            for node in graph_module.graph.nodes:
                tag = node.meta.get(PLACEMENT_META)
                if tag is not None:
                    out.append(f"{node.name:<48} {tag.device:<8} {tag.reason}")
    return "\n".join(out)
