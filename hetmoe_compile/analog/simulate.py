"""Run a placed (canonical) model with its analog experts simulated as AIMC tiles, eagerly.

:func:`simulate` swaps each analog :class:`ExpertGroup` for an :class:`AnalogExpertGroup` holding one programmed
hardware instance; calling it again with another seed re-programs (the ideal weights are kept). With
``dense="analog"`` (the paper's ablation) the ``nn.Linear`` layers of dense modules (attention, shared experts,
dense MLPs, LM head) run on tiles too; embeddings, norms and routers stay digital. The analog half (``u_sigma``) of
every HPD-split projection (:mod:`hetmoe_compile.hpd`) runs on tiles whatever ``dense`` is; its digital half
(``v_t``) never does.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..expert_group import ExpertGroup, HetExperts, device_groups
from ..hpd.projection_split import HPDLinear
from ..models.recognize import ModelInfo, recognize
from .config import AnalogConfig
from .expert_group_op import program_group
from .programming_noise import OUT_NOISE_STREAM, stream_seed
from .tiles import Periphery, ProgrammedMatrix, analog_matmul, program_matrix

DENSE_ANALOG_KINDS = ("attention", "shared_expert", "dense_mlp", "lm_head")
HPD_KEY_BASE = 1 << 32
"""Noise-stream keys of HPD ``u_sigma`` halves start here, apart from the dense layers' keys (their sorted index)."""


def hpd_stream_key(path: str) -> int:
    """Stream key of the ``u_sigma`` half of the HPD-split projection at ``path``: depends only on the path."""
    return HPD_KEY_BASE + int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")


class AnalogExpertGroup(nn.Module):
    """An analog expert group on simulated tiles (one hardware instance); ``source`` keeps the ideal weights."""

    def __init__(self, source: ExpertGroup, cfg: AnalogConfig, seed: int, layer: int) -> None:
        super().__init__()
        self.source = source
        self.cfg = cfg
        self.layer = layer
        self.device_kind = "analog"
        self.register_buffer("rng_state", torch.zeros(1, dtype=torch.long), persistent=False)
        self.program(seed)

    @property
    def ids(self) -> list[int]:
        return self.source.ids

    @torch.no_grad()
    def program(self, seed: int) -> None:
        """Program a new hardware instance ``seed`` (and reset the output-noise stream)."""
        self.seed = seed
        self.rng_state.fill_(stream_seed(seed, self.layer, OUT_NOISE_STREAM))
        if self.cfg.is_ideal:
            return
        progs = program_group(self.source.gate_up, self.source.down, self.source.expert_ids, self.cfg, seed, self.layer)
        for name, tensor in progs.items():
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.cfg.is_ideal:  # exactly the digital computation
            return self.source(hidden, top_k_index, top_k_weights)
        s = self.source
        return torch.ops.hetmoe.analog_expert_group(
            hidden, top_k_index, top_k_weights, s.expert_ids, self.gate_up_weight, self.gate_up_scale,
            self.down_weight, self.down_scale, s.gate_up_bias, s.down_bias, self.rng_state, s.num_experts,
            s.activation, s.act_name, s.alpha, s.limit, list(Periphery.of(self.cfg)),
        )

    def extra_repr(self) -> str:
        return f"preset={self.cfg.preset}, seed={self.seed}, layer={self.layer}, experts={self.ids}"


class AnalogLinear(nn.Module):
    """An ``nn.Linear`` on simulated tiles (bias digital); for the dense-on-analog ablation."""

    def __init__(self, source: nn.Linear, cfg: AnalogConfig, seed: int, key: int) -> None:
        super().__init__()
        self.source, self.cfg, self.key = source, cfg, key
        self.register_buffer("rng_state", torch.zeros(1, dtype=torch.long), persistent=False)
        self.program(seed)

    @torch.no_grad()
    def program(self, seed: int) -> None:
        self.rng_state.fill_(stream_seed(seed, self.key, OUT_NOISE_STREAM))
        prog = program_matrix(self.source.weight, self.cfg, stream_seed(seed, self.key, 1 << 21))
        self.register_buffer("weight_prog", prog.weight, persistent=False)
        self.register_buffer("scale_prog", prog.scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.is_ideal:
            return self.source(x)
        gen = None
        if self.cfg.out_noise > 0:
            gen = torch.Generator(device=x.device).manual_seed(int(self.rng_state.item()))
            self.rng_state.add_(1)
        y = analog_matmul(x.reshape(-1, x.shape[-1]), ProgrammedMatrix(self.weight_prog, self.scale_prog),
                          self.cfg, gen).reshape(*x.shape[:-1], -1)
        return y if self.source.bias is None else y + self.source.bias


def simulate(model: nn.Module, cfg: AnalogConfig, seed: int = 0, dense: str = "digital",
             info: ModelInfo | None = None) -> nn.Module:
    """Put hardware instance ``seed`` of ``cfg`` under the analog parts of a canonical model (in place)."""
    info = info or recognize(model)
    for layer, het, group in device_groups(model, info.moe_layers, "analog", "simulate"):
        if isinstance(group, AnalogExpertGroup) and group.cfg == cfg:
            group.program(seed)
        else:
            source = group.source if isinstance(group, AnalogExpertGroup) else group
            het.groups["analog"] = AnalogExpertGroup(source, cfg, seed, layer.index)
    _simulate_dense(model, info, cfg, seed, dense)
    return model


def _simulate_dense(model: nn.Module, info: ModelInfo, cfg: AnalogConfig | None, seed: int, dense: str) -> None:
    """Dense layers to tiles (``dense="analog"``) or back; HPD ``u_sigma`` halves to tiles unless ``cfg`` is None
    (restore everything). Keys: the sorted index of each ``nn.Linear`` name, an HPD module holding the index its
    unsplit projection had (so the split does not move other layers' streams), and :func:`hpd_stream_key`."""
    hpd = {n for n, m in model.named_modules() if isinstance(m, HPDLinear)}

    def parent_of(name: str) -> tuple[str, nn.Module]:
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        return parent_name, model.get_submodule(parent_name) if parent_name else model

    names = [n for n, m in model.named_modules() if (isinstance(m, (nn.Linear, AnalogLinear)) or n in hpd)
             and not isinstance(parent_of(n)[1], AnalogLinear) and parent_of(n)[0] not in hpd]
    for key, name in enumerate(sorted(names)):
        if name in hpd or info.kind_of(name) not in DENSE_ANALOG_KINDS:
            continue
        _place_linear(model, name, cfg if dense == "analog" else None, seed, key)
    for name in sorted(hpd):
        _place_linear(model, f"{name}.u_sigma", cfg, seed, hpd_stream_key(name))


def _place_linear(model: nn.Module, name: str, cfg: AnalogConfig | None, seed: int, key: int) -> None:
    """The linear at ``name`` on tiles of ``cfg`` (instance ``seed``, stream ``key``), or digital if ``cfg`` is None."""
    module = model.get_submodule(name)
    parent_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
    parent = model.get_submodule(parent_name) if parent_name else model
    if cfg is not None:
        if isinstance(module, AnalogLinear) and module.cfg == cfg and module.key == key:
            module.program(seed)
        else:
            source = module.source if isinstance(module, AnalogLinear) else module
            setattr(parent, attr, AnalogLinear(source, cfg, seed, key))
    elif isinstance(module, AnalogLinear):
        setattr(parent, attr, module.source)


def restore_digital(model: nn.Module, info: ModelInfo | None = None) -> nn.Module:
    """Undo :func:`simulate`: the ideal analog groups, dense layers and HPD halves come back (in place)."""
    info = info or recognize(model)
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        if isinstance(het, HetExperts) and isinstance(het.groups["analog"] if "analog" in het.groups else None,
                                                      AnalogExpertGroup):
            het.groups["analog"] = het.groups["analog"].source
    _simulate_dense(model, info, None, 0, "digital")
    return model
