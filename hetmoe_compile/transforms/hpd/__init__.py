"""Hybrid projection decomposition (HPD): sensitive dense projections split into a digital ``Vᵀ`` and an analog
``U·Σ`` half (see :mod:`.projection_split`)."""

from .projection_split import (
    TARGETS,
    HPDLinear,
    HPDRecord,
    find_projections,
    hpd_modules,
    hpd_output_error,
    require_unsplit,
    resolve_rank,
    split_linear,
    split_projections,
    unsplit_projections,
)

__all__ = [
    "TARGETS",
    "HPDLinear",
    "HPDRecord",
    "find_projections",
    "hpd_modules",
    "hpd_output_error",
    "require_unsplit",
    "resolve_rank",
    "split_linear",
    "split_projections",
    "unsplit_projections",
]
