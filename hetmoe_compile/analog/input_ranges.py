"""Input ranges of the analog experts' tiles, calibrated on text: aihwkit's constant noise management.

With ``noise_management="constant"`` (aihwkit's ``NoiseManagementType.CONSTANT`` with ``pre_post.input_range``,
as in its ``StandardHWATrainingPreset``) a tile does not rescale each input vector by its abs-max: it divides the
inputs by one fixed range ``r`` per (matrix, input tile), the DAC clips them to [-1, 1], and the outputs are
multiplied by ``r`` again. Inputs beyond ``r`` saturate; small inputs use few DAC levels.

:func:`calibrate_input_ranges` sets ``r`` as aihwkit's ``calibrate_input_ranges`` does with its
``CACHE_QUANTILE`` strategy: the ``quantile`` (default 0.99995) of ``|x|`` over the inputs each tile receives on
calibration text, on the digital model. Differences, each for determinism or for experts: every routed row is
used (aihwkit keeps a random subset of 1000 rows per tile), the padding of a last, narrower tile is left out
(aihwkit's last tile is narrower), and an expert routed fewer than :data:`MIN_ROWS` calibration tokens is
calibrated on all the layer's calibration tokens (aihwkit leaves such a tile at its initial range, 3.0); the
file records how many rows each expert saw and which ones fell back.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..base.errors import HetMoEError
from ..base.io import atomic_write_text
from ..ir.expert_group import ExpertGroup, HetExperts, activate
from ..models.calibration import Calibration
from ..models.identity import config_hash
from ..models.recognize import ModelInfo
from .config import AnalogConfig
from .tiles import split_sizes

FORMAT = "hetmoe-input-ranges"
VERSION = 1
DEFAULT_QUANTILE = 0.99995
"""aihwkit's ``calibrate_input_ranges`` default."""
MIN_ROWS = 16
"""An expert routed fewer calibration tokens than this is calibrated on all of its layer's tokens."""
ATTRIBUTE = "hetmoe_input_ranges"
"""The model attribute that holds its attached :class:`InputRanges` (it survives re-canonicalisation)."""
NO_RANGES = (
    "noise management 'constant' needs input ranges calibrated on text: pass --calib TEXT or --input-ranges FILE "
    "(in Python: attach_input_ranges(model, calibrate_input_ranges(model, info, calibration)); the torch.compile "
    "backend: its input_ranges option)"
)


@dataclass(frozen=True)
class LayerRanges:
    """One MoE layer: ``gate_up [E, C_in]`` and ``down [E, C_hidden]`` ranges per expert and input tile (float32,
    expert ids as rows), the routed calibration rows of each expert, and which experts fell back to all tokens."""

    gate_up: torch.Tensor
    down: torch.Tensor
    rows: list[int]
    all_tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class InputRanges:
    """Calibrated input ranges of every routed expert's matrices (see the module docstring)."""

    tile_size: int
    quantile: float
    tokens: int
    source: str
    layers: dict[int, LayerRanges]
    model: dict[str, Any] = field(default_factory=dict)  # the model's identity, as the writer recorded it

    def check_tile_size(self, tile_size: int) -> None:
        """One line if the ranges were calibrated for tiles of another width than ``tile_size``."""
        if tile_size != self.tile_size:
            raise HetMoEError(
                f"input ranges were calibrated for {self.tile_size}-wide tiles, the analog config has {tile_size}; "
                f"calibrate again with --tile-size {tile_size}"
            )

    def for_experts(self, layer: int, expert_ids: list[int], tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [n, C], down [n, C])`` ranges of ``expert_ids`` in ``layer``; one line if the file has none or
        was calibrated for another tile size."""
        self.check_tile_size(tile_size)
        if layer not in self.layers:
            raise HetMoEError(
                f"input ranges have no MoE layer {layer} (they hold {sorted(self.layers)}); calibrate them on this "
                "model"
            )
        lr = self.layers[layer]
        if max(expert_ids, default=-1) >= lr.gate_up.shape[0]:
            raise HetMoEError(
                f"input ranges of layer {layer} cover {lr.gate_up.shape[0]} experts, the model has expert "
                f"{max(expert_ids)}; calibrate them on this model"
            )
        ids = torch.tensor(expert_ids, dtype=torch.long)
        return lr.gate_up[ids], lr.down[ids]

    def check_widths(self, layer: int, hidden: int, intermediate: int) -> None:
        """One line if ``layer``'s ranges lack the tile counts of expert matrices ``hidden`` and ``intermediate``
        inputs wide."""
        lr = self.layers[layer]
        want = (split_sizes(hidden, self.tile_size)[0], split_sizes(intermediate, self.tile_size)[0])
        if (lr.gate_up.shape[1], lr.down.shape[1]) != want:
            raise HetMoEError(
                f"input ranges of layer {layer} have {lr.gate_up.shape[1]} and {lr.down.shape[1]} input tiles, the "
                f"model's experts need {want[0]} and {want[1]}; calibrate them on this model"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "tile_size": self.tile_size,
            "quantile": self.quantile,
            "tokens": self.tokens,
            "source": self.source,
            "model": self.model,
            "layers": {
                str(i): {
                    "gate_up": lr.gate_up.tolist(),
                    "down": lr.down.tolist(),
                    "rows": lr.rows,
                    "all_tokens": lr.all_tokens,
                }
                for i, lr in sorted(self.layers.items())
            },
        }

    @property
    def digest(self) -> str:
        """sha256 of the ranges themselves (tile size and every range; not where they came from), to tell two sets
        apart."""
        doc = self.to_dict()
        content = {
            "tile_size": self.tile_size,
            "layers": {k: [v["gate_up"], v["down"]] for k, v in doc["layers"].items()},
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str = "input ranges") -> InputRanges:
        def bad(what: str) -> HetMoEError:
            return HetMoEError(f"{source}: {what}; write the file with `hetmoe-compile calibrate-ranges`")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f'not an input-ranges file (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise bad(f"version {data.get('version')!r} is not {VERSION}")
        try:
            layers = {}
            for key, lr in data["layers"].items():
                gate_up = torch.tensor(lr["gate_up"], dtype=torch.float32)
                down = torch.tensor(lr["down"], dtype=torch.float32)
                if gate_up.dim() != 2 or down.dim() != 2 or gate_up.shape[0] != down.shape[0]:
                    raise bad(f"layer {key}: ranges must be [experts, tiles] lists of equal length")
                if not (bool(torch.isfinite(gate_up).all()) and bool(torch.isfinite(down).all())):
                    raise bad(f"layer {key}: a range is not a finite number")
                if bool((gate_up <= 0).any()) or bool((down <= 0).any()):
                    raise bad(f"layer {key}: every range must be > 0")
                layers[int(key)] = LayerRanges(gate_up, down, [int(r) for r in lr["rows"]], list(lr["all_tokens"]))
            out = cls(
                int(data["tile_size"]),
                float(data["quantile"]),
                int(data["tokens"]),
                str(data["source"]),
                layers,
                dict(data.get("model", {})),
            )
        except HetMoEError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"malformed ({type(exc).__name__}: {exc})") from None
        if not layers:
            raise bad("it holds no layer")
        return out

    @classmethod
    def load(cls, path: str | Path) -> InputRanges:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HetMoEError(
                f"input ranges {p} not found; write them with `hetmoe-compile calibrate-ranges`"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HetMoEError(f"input ranges {p}: cannot read it as JSON ({exc})") from None
        return cls.from_dict(data, str(p))


def tile_quantiles(x: torch.Tensor, tile_size: int, quantile: float) -> torch.Tensor:
    """The ``quantile`` of ``|x|`` over the rows and real columns of each input tile of ``x [n, in]`` -> ``[C]``
    (linear interpolation, as ``torch.quantile``, without its size limit); all-zero rows are left out, as aihwkit
    does."""
    c, t = split_sizes(x.shape[-1], tile_size)
    xa = x.detach().float().abs()
    xa = xa[(xa > 0).any(-1)]
    out = torch.empty(c)
    for i in range(c):
        v = xa[:, i * t : (i + 1) * t].reshape(-1)
        if v.numel() == 0:
            out[i] = 0.0
            continue
        pos = quantile * (v.numel() - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        a = torch.kthvalue(v, lo + 1).values
        b = torch.kthvalue(v, min(lo + 2, v.numel())).values if frac > 0 else a
        out[i] = a + frac * (b - a)
    return out


def _groups(model: nn.Module, info: ModelInfo, layer_index: int) -> list[ExpertGroup]:
    het = model.get_submodule(info.layer(layer_index).experts)
    if not isinstance(het, HetExperts):
        raise HetMoEError("input-range calibration needs a canonical model: call canonicalize(model, placement) first")
    groups = list(het.groups.values())
    if not all(isinstance(g, ExpertGroup) for g in groups):
        raise HetMoEError(
            "input-range calibration runs on the digital model: call restore_digital(model) (or calibrate before "
            "simulate) first"
        )
    return cast(list[ExpertGroup], groups)


@torch.no_grad()
def calibrate_input_ranges(
    model: nn.Module,
    info: ModelInfo,
    calibration: Calibration,
    tile_size: int = 512,
    quantile: float = DEFAULT_QUANTILE,
    source: str | None = None,
) -> InputRanges:
    """Input ranges of every routed expert of a canonical, digital model on ``calibration``'s tokens (see the module
    docstring), stamped with the model's identity (``source``: where it was loaded from, default its
    ``name_or_path``), which :func:`attach_input_ranges` checks."""
    if not 0.5 <= quantile <= 1.0:
        raise HetMoEError(f"input-range quantile must be in [0.5, 1], got {quantile}; aihwkit's default is 0.99995")
    if tile_size < 1:
        raise HetMoEError(f"tile_size must be >= 1, got {tile_size}")
    for layer in info.moe_layers:
        _groups(model, info, layer.index)  # checked before the calibration forward
    routing = calibration.routing(model, info)
    layers: dict[int, LayerRanges] = {}
    for layer in tqdm(info.moe_layers, desc="input ranges", unit="layer", leave=False):
        cap = routing[layer.index]
        experts: dict[int, tuple[torch.Tensor, torch.Tensor, int, bool]] = {}
        for group in _groups(model, info, layer.index):
            for local, e in enumerate(group.ids):
                gate_up, down, gate_up_bias, _ = group.expert(local)
                rows = (cap.top_k_index == e).any(-1).nonzero().squeeze(1)
                few = rows.numel() < MIN_ROWS
                x = (cap.hidden if few else cap.hidden[rows]).to(gate_up.device, gate_up.dtype)
                pre = torch.nn.functional.linear(x, gate_up, gate_up_bias)
                h = activate(pre, group.activation, group.act_name, group.alpha, group.limit)
                experts[e] = (
                    tile_quantiles(x, tile_size, quantile),
                    tile_quantiles(h, tile_size, quantile),
                    int(rows.numel()),
                    few,
                )
        n = layer.num_experts
        if sorted(experts) != list(range(n)):
            raise HetMoEError(
                f"layer {layer.index}: the canonical groups hold experts {sorted(experts)}, not 0..{n - 1}"
            )
        gu = torch.stack([experts[e][0] for e in range(n)])
        dn = torch.stack([experts[e][1] for e in range(n)])
        for name, r in (("gate_up", gu), ("down", dn)):
            if not bool((r > 0).all()):
                bad = sorted({int(i) for i in (r <= 0).nonzero()[:, 0]})
                raise HetMoEError(
                    f"layer {layer.index}: experts {bad} saw only zero {name} inputs on the calibration text; "
                    "calibrate on more (or other) text"
                )
        layers[layer.index] = LayerRanges(
            gu, dn, [experts[e][2] for e in range(n)], [e for e in range(n) if experts[e][3]]
        )
    identity = {
        "source": str(getattr(model, "name_or_path", "")) if source is None else source,
        "architecture": info.architecture,
        "config_sha256": config_hash(model),
    }
    return InputRanges(tile_size, float(quantile), calibration.num_tokens, calibration.source, layers, identity)


def attach_input_ranges(model: nn.Module, ranges: InputRanges | None, info: ModelInfo | None = None) -> nn.Module:
    """Give ``model`` the input ranges that simulation, ``torch.compile`` and export use under constant noise
    management (``None`` removes them). They must have been calibrated on this model (the config hash they carry),
    and with ``info`` they are also checked against the model's layers and expert counts first."""
    if ranges is not None:
        check_ranges_model(ranges, model)
    if ranges is not None and info is not None:
        for layer in info.moe_layers:
            if layer.index not in ranges.layers:
                raise HetMoEError(
                    f"input ranges have no MoE layer {layer.index} (they hold {sorted(ranges.layers)}); calibrate "
                    "them on this model"
                )
            lr = ranges.layers[layer.index]
            if lr.gate_up.shape[0] != layer.num_experts:
                raise HetMoEError(
                    f"input ranges of layer {layer.index} cover {lr.gate_up.shape[0]} experts, the model has "
                    f"{layer.num_experts}; calibrate them on this model"
                )
    object.__setattr__(model, ATTRIBUTE, ranges)  # a plain attribute, not a submodule or buffer
    return model


def check_ranges_model(ranges: InputRanges, model: nn.Module, what: str = "input ranges") -> None:
    """One line unless ``ranges`` carry the config hash of ``model`` (the hash of the config alone, or the one
    files written before 2026-12-02 carry, with the load path in it); ranges without a hash are refused too."""
    if not isinstance(ranges, InputRanges):
        raise HetMoEError(
            f"{what} must be an InputRanges (InputRanges.load(path) reads a file), got {type(ranges).__name__}"
        )
    if getattr(model, "config", None) is None:
        return  # not a whole Hugging Face model (a frame inside one): the layer and width checks still apply
    want = ranges.model.get("config_sha256")
    fix = "calibrate them on this one ('hetmoe-compile calibrate-ranges', or calibrate_input_ranges in Python)"
    if want is None:
        raise HetMoEError(f"{what} ({ranges.source}) carry no model hash, so nothing says which model they fit; {fix}")
    if want not in (config_hash(model), config_hash(model, legacy=True)):
        raise HetMoEError(
            f"{what} were calibrated on another model ({ranges.model.get('source') or ranges.model.get('architecture')}"
            f"); {fix}"
        )


def check_input_ranges_args(
    cfg: AnalogConfig, ranges: InputRanges | str | Path | None, have_calibration: bool
) -> InputRanges | None:
    """Before any model work: ``ranges`` (read from their file) if ``cfg`` takes them; one line if they are given
    under other noise management, or if constant noise management has neither ranges nor calibration text."""
    if cfg.noise_management != "constant":
        if ranges is not None:
            raise HetMoEError(
                "input_ranges apply to constant noise management: set noise_management='constant' or use the "
                "standard-hwa preset"
            )
        return None
    if ranges is None:
        if not have_calibration:
            raise HetMoEError(NO_RANGES)
        return None
    return ranges if isinstance(ranges, InputRanges) else InputRanges.load(ranges)


def prepare_input_ranges(
    model: nn.Module,
    info: ModelInfo,
    cfg: AnalogConfig,
    ranges: InputRanges | str | Path | None = None,
    calibration: Calibration | None = None,
    origin: str | None = None,
) -> dict | None:
    """Input ranges on ``model`` for ``cfg``'s constant noise management: ``ranges`` (or their file), else
    calibrated on ``calibration`` (the model canonicalised, all digital, first); returns what results record
    about them (None under other noise management, where giving ``ranges`` is an error). ``origin``: where
    given ranges came from, for the record (default: their file's path)."""
    given = check_input_ranges_args(cfg, ranges, calibration is not None)
    if cfg.noise_management != "constant":
        return None
    if given is not None:
        origin = origin or ("given" if isinstance(ranges, InputRanges) else str(ranges))
    else:
        from ..transforms.canonicalize import canonicalize

        assert calibration is not None
        canonicalize(model, None, info)
        given = calibrate_input_ranges(model, info, calibration, cfg.tile_size)
        origin = "calibrated on --calib"
        print(f"calibrated input ranges on {calibration.num_tokens} tokens of {calibration.source}", file=sys.stderr)
    attach_input_ranges(model, given, info)
    given.check_tile_size(cfg.tile_size)
    return {
        "origin": origin,
        "source": given.source,
        "tokens": given.tokens,
        "quantile": given.quantile,
        "sha256": given.digest,
    }


def attached_input_ranges(model: nn.Module) -> InputRanges | None:
    """The input ranges attached to ``model``, if any."""
    return cast("InputRanges | None", model.__dict__.get(ATTRIBUTE))
