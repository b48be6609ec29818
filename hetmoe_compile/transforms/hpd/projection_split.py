"""Hybrid projection decomposition (HPD): split a sensitive dense projection into a digital and an analog half.

``W [out, in] = U Σ Vᵀ`` (SVD). The split keeps rank ``r``: ``x -> Vᵀ[:r] x`` runs digitally (``r x in``) and
``(U[:, :r] Σ[:r]) [out, r]`` runs on AIMC tiles. The analog half gets a well-conditioned input (the projection of
``x`` onto the top singular directions) and the digital half absorbs the ill-conditioned basis change. At full
rank the split is exact up to float error; a lower rank truncates the spectrum (error = the SVD tail).

Targets: the LM head (the module of kind ``lm_head``) and the attention output projections (``nn.Linear``
children named ``o_proj`` of modules of kind ``attention``). :func:`~hetmoe_compile.analog.simulate` puts every
``HPDLinear.u_sigma`` on simulated tiles, whatever its ``dense`` argument, and keeps ``v_t`` digital.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn

from ...base.errors import HetMoEError
from ...models.recognize import ModelInfo, recognize

TARGETS = ("lm_head", "attention_output")
"""What :func:`split_projections` can split: the LM head, the attention output projections (``o_proj``)."""

_ROW_CHUNK = 4096  # rows per step when measuring the reconstruction error (bounds float64 scratch memory)


@dataclass
class HPDRecord:
    """One split projection: where, what, its rank and the cost of the split.

    ``rel_error`` is measured on the stored factors, ``||W - U_r Σ_r V_rᵀ||_F / ||W||_F`` (float64 arithmetic on the
    model-dtype weights); ``tail_bound`` is the exact SVD truncation error ``sqrt(Σ_{i>r} σ_i²) / ||W||_F``.
    ``digital_params`` counts ``Vᵀ`` and the bias (added digitally), ``analog_params`` the ``U·Σ`` weight."""

    module: str
    kind: str
    shape: tuple[int, int]
    rank: int
    full_rank: int
    rel_error: float
    tail_bound: float
    digital_params: int
    analog_params: int
    tied: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


class HPDLinear(nn.Module):
    """``nn.Linear`` split as ``u_sigma(v_t(x))``: ``v_t`` (``Vᵀ[:r]``, digital), ``u_sigma`` (``U[:, :r]·Σ[:r]``
    plus the original bias, analog). The original linear is kept for :func:`unsplit_projections` as a plain
    attribute, not a sub-module, so parameters and ``state_dict`` are those of the split."""

    def __init__(self, v_t: nn.Linear, u_sigma: nn.Linear, original: nn.Linear, target: str, kind: str) -> None:
        super().__init__()
        self.v_t = v_t
        self.u_sigma = u_sigma
        self.target, self.kind = target, kind
        self.rank = v_t.out_features
        self.in_features, self.out_features = v_t.in_features, u_sigma.out_features
        self.original_shape = (self.out_features, self.in_features)
        self.full_rank = min(self.original_shape)
        object.__setattr__(self, "_hpd_original", original)  # not registered: no parameters, no state_dict entry
        # A non-persistent marker so that ``recognize`` gives this module (and so v_t / u_sigma) the original kind.
        self.register_buffer("hpd_rank", torch.tensor(self.rank, dtype=torch.long), persistent=False)

    @property
    def original(self) -> nn.Linear:
        """The unsplit ``nn.Linear`` (not a sub-module)."""
        return self.__dict__["_hpd_original"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u_sigma(self.v_t(x))

    def extra_repr(self) -> str:
        return f"target={self.target}, kind={self.kind}, shape={self.original_shape}, rank={self.rank}"


def hpd_modules(model: nn.Module) -> dict[str, HPDLinear]:
    """Module path -> :class:`HPDLinear` of every split projection of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HPDLinear)}


def require_unsplit(model: nn.Module, what: str) -> None:
    """Refuse ``what`` on a model with HPD-split projections (the paths that only know analog expert groups would
    run the analog ``U·Σ`` half digitally and say nothing)."""
    if hpd_modules(model):
        raise HetMoEError(
            f"{what} does not support HPD-split projections yet (the analog U·Σ half would run "
            "digitally); HPD is simulation-only: call hetmoe_compile.transforms.hpd.unsplit_projections(model) "
            "first"
        )


def find_projections(model: nn.Module, info: ModelInfo, targets=TARGETS) -> list[tuple[str, str]]:
    """``(module path, target)`` of every ``nn.Linear`` that ``targets`` select, in module order."""
    _check_targets(targets)
    found = []
    for name, module in model.named_modules():
        if not name:
            continue
        parent, _, attr = name.rpartition(".")
        if "lm_head" in targets and info.module_kinds.get(name) == "lm_head":
            target = "lm_head"
        elif "attention_output" in targets and attr == "o_proj" and parent and info.kind_of(parent) == "attention":
            target = "attention_output"
        else:
            continue
        if not isinstance(module, nn.Linear):
            if any(isinstance(m, nn.Linear) for m in module.modules()):  # wrapped, e.g. on simulated tiles
                raise HetMoEError(
                    f"{name} is a {type(module).__name__} around its nn.Linear: restore the digital "
                    "model (analog.restore_digital(model)) before HPD-splitting it"
                )
            continue
        found.append((name, target))
    return found


def _check_targets(targets) -> None:
    if isinstance(targets, str):
        targets = (targets,)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise HetMoEError(f"unknown HPD target(s) {bad or '(none given)'}; valid targets: {', '.join(TARGETS)}")


def resolve_rank(rank: int | float | None, full: int, module: str = "projection") -> int:
    """``None`` -> ``full``; an int -> itself; a float in (0, 1] -> that fraction of ``full``, rounded up."""
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise HetMoEError(f"HPD rank must be None (full rank), an int or a float in (0, 1]; got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise HetMoEError(f"HPD rank fraction must be in (0, 1], got {rank}; pass an int for an absolute rank")
        return max(1, math.ceil(rank * full - 1e-9))
    if not 0 < rank <= full:
        raise HetMoEError(
            f"HPD rank {rank} is out of range for {module} (full rank {full}): use 1..{full}, "
            "a fraction in (0, 1], or None for full rank"
        )
    return int(rank)


@torch.no_grad()
def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (CPU) or float32 (CUDA, where float64 is slow)."""
    w = weight.detach().to(torch.float32 if weight.is_cuda else torch.float64)
    return torch.linalg.svd(w, full_matrices=False)


@torch.no_grad()
def _rel_error(weight: torch.Tensor, u_sigma: torch.Tensor, v_t: torch.Tensor) -> float:
    """``||W - u_sigma @ v_t||_F / ||W||_F`` in float64, ``_ROW_CHUNK`` rows at a time."""
    v = v_t.to(torch.float64)
    err = ref = 0.0
    for i in range(0, weight.shape[0], _ROW_CHUNK):
        w = weight[i : i + _ROW_CHUNK].to(torch.float64)
        err += float(torch.sum((w - u_sigma[i : i + _ROW_CHUNK].to(torch.float64) @ v) ** 2))
        ref += float(torch.sum(w**2))
    return math.sqrt(err / ref) if ref > 0 else 0.0


@torch.no_grad()
def split_linear(linear: nn.Linear, rank: int, target: str = "", kind: str = "") -> tuple[HPDLinear, HPDRecord]:
    """Split one ``nn.Linear`` at ``rank`` (an int in 1..min(out, in)); the linear itself is not modified."""
    weight = linear.weight
    out_f, in_f = weight.shape
    full = min(out_f, in_f)
    rank = resolve_rank(rank, full, target or "this projection")
    u, s, vh = _svd(weight)
    dtype, device = weight.dtype, weight.device
    v_t = nn.Linear(in_f, rank, bias=False, device=device, dtype=dtype)
    u_sigma = nn.Linear(rank, out_f, bias=linear.bias is not None, device=device, dtype=dtype)
    v_t.weight.copy_(vh[:rank].to(dtype))
    u_sigma.weight.copy_((u[:, :rank] * s[:rank]).to(dtype))
    if linear.bias is not None:
        u_sigma.bias.copy_(linear.bias)
    s2 = s.to(torch.float64) ** 2
    total = float(s2.sum())
    tail = math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0
    module = HPDLinear(v_t, u_sigma, linear, target, kind)
    record = HPDRecord(
        module=target,
        kind=kind,
        shape=(out_f, in_f),
        rank=rank,
        full_rank=full,
        rel_error=_rel_error(weight, u_sigma.weight, v_t.weight),
        tail_bound=tail,
        digital_params=v_t.weight.numel() + (0 if linear.bias is None else linear.bias.numel()),
        analog_params=u_sigma.weight.numel(),
    )
    return module, record


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _shared_params(model: nn.Module, module: nn.Module) -> bool:
    """Whether a parameter of ``module`` is also reachable from elsewhere in ``model`` (tied weights)."""
    own = {id(p) for p in module.parameters()}
    counts: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return any(counts.get(i, 0) > 1 for i in own)


@torch.no_grad()
def split_projections(
    model: nn.Module, info: ModelInfo | None = None, targets=TARGETS, rank: int | float | None = None
) -> list[HPDRecord]:
    """HPD-split, in place, every projection of ``model`` that ``targets`` select (see :data:`TARGETS`).

    ``rank``: ``None`` = full rank ``min(out, in)`` (exact up to float error), an int = that rank for every
    projection, a float in (0, 1] = that fraction of each projection's full rank (rounded up). Works on the original
    or the canonical model. A tied LM head gets its own factors; the input embedding is untouched."""
    if isinstance(targets, str):
        targets = (targets,)
    _check_targets(targets)
    if hpd_modules(model):
        raise HetMoEError("model is HPD-split already; call hpd.unsplit_projections(model) before splitting again")
    info = info or recognize(model)
    found = find_projections(model, info, targets)
    if not found:
        raise HetMoEError(
            f"found no projection to HPD-split for target(s) {', '.join(targets)} (no nn.Linear "
            f"LM head / attention o_proj); valid targets: {', '.join(TARGETS)}"
        )
    ranks = {}
    for path, _ in found:  # validate every rank before touching the model
        linear = cast(nn.Linear, model.get_submodule(path))  # find_projections finds nn.Linear modules only
        ranks[path] = resolve_rank(rank, min(linear.weight.shape), path)
    records = []
    for path, kind in found:
        linear = cast(nn.Linear, model.get_submodule(path))
        tied = _shared_params(model, linear)
        module, record = split_linear(linear, ranks[path], path, kind)
        record.tied = tied
        _set_module(model, path, module)
        records.append(record)
    return records


def unsplit_projections(model: nn.Module) -> list[str]:
    """Undo :func:`split_projections` in place: every :class:`HPDLinear` is replaced by its original ``nn.Linear``
    (the same module object, so the model computes bit-identically to before the split). Returns the paths."""
    restored = []
    for path, module in hpd_modules(model).items():
        original = module.original
        ref = module.v_t.weight
        if original.weight.device != ref.device or original.weight.dtype != ref.dtype:
            original.to(device=ref.device, dtype=ref.dtype)  # the model was moved after the split
        _set_module(model, path, original)
        restored.append(path)
    return restored


@torch.no_grad()
def hpd_output_error(module: HPDLinear, x: torch.Tensor) -> float:
    """``||hpd(x) - W x||_F / ||W x||_F`` on inputs ``x [..., in]``: the split's output error, including analog
    noise when ``u_sigma`` is simulated (call :func:`~hetmoe_compile.analog.simulate` first)."""
    if not isinstance(module, HPDLinear):
        raise HetMoEError(
            f"hpd_output_error needs an HPDLinear, got {type(module).__name__}; split with "
            "hpd.split_projections(model) first"
        )
    ref = module.original(x).to(torch.float64)
    y = module(x).to(torch.float64)
    norm = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(y - ref)) / norm if norm > 0 else 0.0
