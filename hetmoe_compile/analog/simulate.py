"""Run a placed (canonical) model with its analog experts simulated as AIMC tiles, eagerly.

:func:`simulate` swaps each analog :class:`ExpertGroup` for an :class:`AnalogExpertGroup` holding one programmed
hardware instance; calling it again with another seed re-programs.

Memory: the compute device holds one copy of the analog weights, never two. Programming overwrites the ideal
weights' storage with the programmed tiles, in the model's dtype (:class:`~.programmed_stack.ProgrammedStack`,
a few matrices at a time, noise in float32); the ideal values wait off the compute device in an
:class:`~.ideal_store.IdealStore`: pinned host memory when the model is on an accelerator, an unlinked spill file
read back with plain reads when it is on the CPU (``HETMOE_IDEAL_STORE=host|file`` and ``HETMOE_SPILL_DIR``
override). Re-programming another seed reads them from there, so memory does not grow; :func:`restore_digital`
puts them back bit-exactly. While simulated, the ideal group's weight parameters are empty (shape ``[0]``):
restore before saving a state dict or reading the ideal weights. With
``dense="analog"`` (the paper's ablation) the ``nn.Linear`` layers of dense modules (attention, shared experts,
dense MLPs, LM head) run on tiles too; embeddings, norms and routers stay digital. The analog half (``u_sigma``) of
every HPD-split projection (:mod:`hetmoe_compile.transforms.hpd`) runs on tiles whatever ``dense`` is; its digital half
(``v_t``) never does.
"""

from __future__ import annotations

import hashlib
from typing import cast

import torch
from torch import nn

from ..base.errors import HetMoEError, check_choice, check_seed
from ..base.host_memory import trim
from ..ir.expert_group import ExpertGroup, HetExperts, device_groups
from ..models.device_map import require_resident
from ..models.recognize import ModelInfo, recognize
from ..transforms.hpd.projection_split import HPDLinear
from .config import AnalogConfig
from .expert_group_op import analog_expert_group_op
from .ideal_store import IdealStore
from .input_ranges import NO_RANGES, InputRanges, attached_input_ranges
from .instance import MATRICES, linear_seed, output_noise_seed, program_expert_stacks
from .programmed_stack import ProgrammedStack
from .tiles import Periphery, ProgrammedMatrix, analog_matmul

DENSE_ANALOG_KINDS = ("attention", "shared_expert", "dense_mlp", "lm_head")
HPD_KEY_BASE = 1 << 32
"""Noise-stream keys of HPD ``u_sigma`` halves start here, apart from the dense layers' keys (their sorted index)."""


def hpd_stream_key(path: str) -> int:
    """Stream key of the ``u_sigma`` half of the HPD-split projection at ``path``: depends only on the path."""
    return HPD_KEY_BASE + int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big")


class _HostCounter(nn.Module):
    """A module whose ``rng_state`` output-noise counter stays on the host when the module moves, so seeding the
    next call's generator reads no device memory (no synchronisation inside a CUDA forward)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.rng_state.device.type != "cpu":
            self.rng_state = self.rng_state.cpu()
        return self


class AnalogExpertGroup(_HostCounter):
    """An analog expert group on simulated tiles (one hardware instance). ``source`` is the ideal group; while
    programmed, its weight storage holds the programmed tiles and its ideal values wait in an
    :class:`~.ideal_store.IdealStore` (see the module docstring); :meth:`release` puts them back."""

    gate_up_range: torch.Tensor | None  # [E, C] calibrated input ranges (constant noise management)
    down_range: torch.Tensor | None

    def __init__(
        self, source: ExpertGroup, cfg: AnalogConfig, seed: int, layer: int, ranges: InputRanges | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.cfg = cfg
        self.layer = layer
        self.device_kind = "analog"
        self.input_ranges = ranges if cfg.noise_management == "constant" else None
        self.register_buffer("rng_state", torch.zeros(1, dtype=torch.long), persistent=False)  # on the host
        self._stacks: dict[str, ProgrammedStack] = {}
        gate_up_range = down_range = None
        if cfg.noise_management == "constant":
            if ranges is None:
                raise HetMoEError(NO_RANGES)
            ranges.check_widths(layer, source.gate_up.shape[-1], source.down.shape[-1])
            gate_up_range, down_range = ranges.for_experts(layer, source.ids, cfg.tile_size)
            gate_up_range, down_range = gate_up_range.to(source.gate_up.device), down_range.to(source.gate_up.device)
        self.register_buffer("gate_up_range", gate_up_range, persistent=False)
        self.register_buffer("down_range", down_range, persistent=False)
        try:
            if not cfg.is_ideal:
                store = IdealStore.for_device(source.gate_up.device)
                for name in MATRICES:
                    stack = ProgrammedStack(getattr(source, name), cfg.tile_size, "store", store, name)
                    self._stacks[name] = stack
                    self.register_buffer(f"{name}_weight", stack.weight, persistent=False)
                    self.register_buffer(f"{name}_scale", stack.scale, persistent=False)
            self.program(seed)
        except BaseException:  # not yet in the model: give the source its weights back here
            self.release()
            raise

    @property
    def ids(self) -> list[int]:
        return self.source.ids

    @torch.no_grad()
    def program(self, seed: int) -> None:
        """Program a new hardware instance ``seed`` (and reset the output-noise stream); memory does not grow."""
        self.seed = seed
        self.rng_state.fill_(output_noise_seed(seed, self.layer))
        if self._stacks:
            program_expert_stacks(
                [self._stacks[name] for name in MATRICES], self.cfg, seed, self.layer, self.source.ids
            )

    @torch.no_grad()
    def release(self) -> ExpertGroup:
        """The ideal group back (its weights restored bit-exactly); this module is unusable afterwards."""
        for name, stack in self._stacks.items():
            setattr(self, f"{name}_weight", None)  # first: a padded programmed buffer is freed, not held
            setattr(self, f"{name}_scale", None)
            stack.release()
        self._stacks = {}
        return self.source

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.cfg.is_ideal:  # exactly the digital computation
            return self.source(hidden, top_k_index, top_k_weights)
        s = self.source
        return analog_expert_group_op(
            hidden,
            top_k_index,
            top_k_weights,
            s.expert_ids,
            self.gate_up_weight,
            self.gate_up_scale,
            self.down_weight,
            self.down_scale,
            s.gate_up_bias,
            s.down_bias,
            self.rng_state,
            s.num_experts,
            s.activation,
            s.act_name,
            s.alpha,
            s.limit,
            list(Periphery.of(self.cfg)),
            self.gate_up_range,
            self.down_range,
        )

    def extra_repr(self) -> str:
        return f"preset={self.cfg.preset}, seed={self.seed}, layer={self.layer}, experts={self.ids}"


class AnalogLinear(_HostCounter):
    """An ``nn.Linear`` on simulated tiles (bias digital); for the dense-on-analog ablation and HPD halves. Its
    weight is programmed in place like an expert group's (:meth:`release` restores it)."""

    weight_prog: torch.Tensor | None  # buffers registered when programmed (not ideal); None once released
    scale_prog: torch.Tensor | None

    def __init__(self, source: nn.Linear, cfg: AnalogConfig, seed: int, key: int) -> None:
        super().__init__()
        self.source, self.cfg, self.key = source, cfg, key
        self.register_buffer("rng_state", torch.zeros(1, dtype=torch.long), persistent=False)
        self._stack: ProgrammedStack | None = None
        try:
            if not cfg.is_ideal:
                self._stack = ProgrammedStack(
                    source.weight, cfg.tile_size, "store", IdealStore.for_device(source.weight.device), "weight"
                )
                self.register_buffer("weight_prog", self._stack.weight, persistent=False)
                self.register_buffer("scale_prog", self._stack.scale, persistent=False)
            self.program(seed)
        except BaseException:
            self.release()
            raise

    @torch.no_grad()
    def program(self, seed: int) -> None:
        self.rng_state.fill_(output_noise_seed(seed, self.key))
        if self._stack is not None:
            self._stack.program(self.cfg, [linear_seed(seed, self.key)])

    @torch.no_grad()
    def release(self) -> nn.Linear:
        """The ideal ``nn.Linear`` back (weight restored bit-exactly)."""
        if self._stack is not None:
            self.weight_prog = self.scale_prog = None
            self._stack.release()
            self._stack = None
        return self.source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.is_ideal:
            return self.source(x)
        gen = None
        if Periphery.of(self.cfg).noisy:
            gen = torch.Generator(device=x.device).manual_seed(int(self.rng_state.item()))
            self.rng_state.add_(1)
        weight, scale = self.weight_prog, self.scale_prog
        assert weight is not None and scale is not None  # programmed: not ideal, not yet released
        y = analog_matmul(x.reshape(-1, x.shape[-1]), ProgrammedMatrix(weight[0], scale[0]), self.cfg, gen).reshape(
            *x.shape[:-1], -1
        )
        return y if self.source.bias is None else y + self.source.bias


def simulate(
    model: nn.Module, cfg: AnalogConfig, seed: int = 0, dense: str = "digital", info: ModelInfo | None = None
) -> nn.Module:
    """Put hardware instance ``seed`` of ``cfg`` under the analog parts of a canonical model (in place). Constant
    noise management takes the input ranges attached to the model (:func:`~.input_ranges.attach_input_ranges`)."""
    check_seed(seed)
    check_choice(dense, "dense", ("digital", "analog"))
    if not isinstance(cfg, AnalogConfig):
        raise HetMoEError(f"cfg must be an AnalogConfig (analog_config('pcm') makes one), got {type(cfg).__name__}")
    info = info or recognize(model)
    ranges = attached_input_ranges(model) if cfg.noise_management == "constant" else None
    if cfg.noise_management == "constant" and ranges is None:
        raise HetMoEError(NO_RANGES)
    try:
        for layer, het, group in device_groups(model, info.moe_layers, "analog", "simulate"):
            if isinstance(group, AnalogExpertGroup) and group.cfg == cfg and group.input_ranges is ranges:
                group.program(seed)
            else:
                source = group.release() if isinstance(group, AnalogExpertGroup) else group
                het.groups["analog"] = AnalogExpertGroup(source, cfg, seed, layer.index, ranges)
        _simulate_dense(model, info, cfg, seed, dense)
    except BaseException:  # e.g. no room for the spill file, or Ctrl-C: the digital model back, not half of one
        restore_digital(model, info)
        raise
    trim()  # the programming temporaries' pages
    return model


def _simulate_dense(model: nn.Module, info: ModelInfo, cfg: AnalogConfig | None, seed: int, dense: str) -> None:
    """Dense layers to tiles (``dense="analog"``) or back; HPD ``u_sigma`` halves to tiles unless ``cfg`` is None
    (restore everything). Keys: the sorted index of each ``nn.Linear`` name, an HPD module holding the index its
    unsplit projection had (so the split does not move other layers' streams), and :func:`hpd_stream_key`."""
    if dense == "analog" and cfg is not None:
        require_resident(model, "dense modules on tiles (dense='analog')")
    hpd = {n for n, m in model.named_modules() if isinstance(m, HPDLinear)}

    def parent_of(name: str) -> tuple[str, nn.Module]:
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        return parent_name, model.get_submodule(parent_name) if parent_name else model

    names = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, (nn.Linear, AnalogLinear)) or n in hpd)
        and not isinstance(parent_of(n)[1], AnalogLinear)
        and parent_of(n)[0] not in hpd
    ]
    for key, name in enumerate(sorted(names)):
        if name in hpd or info.kind_of(name) not in DENSE_ANALOG_KINDS:
            continue
        _place_linear(model, name, cfg if dense == "analog" else None, seed, key)
    for name in sorted(hpd):
        _place_linear(model, f"{name}.u_sigma", cfg, seed, hpd_stream_key(name))


def _place_linear(model: nn.Module, name: str, cfg: AnalogConfig | None, seed: int, key: int) -> None:
    """The linear at ``name`` on tiles of ``cfg`` (instance ``seed``, stream ``key``), or digital if ``cfg`` is None."""
    if cfg is not None and cfg.noise_management == "constant":
        raise HetMoEError(
            f"{name}: noise management 'constant' has calibrated input ranges for routed experts only; dense layers "
            "on tiles (dense='analog') and HPD halves need noise_management='abs-max'"
        )
    module = model.get_submodule(name)
    parent_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
    parent = model.get_submodule(parent_name) if parent_name else model
    if cfg is not None:
        if isinstance(module, AnalogLinear) and module.cfg == cfg and module.key == key:
            module.program(seed)
        else:
            source = module.release() if isinstance(module, AnalogLinear) else cast(nn.Linear, module)
            setattr(parent, attr, AnalogLinear(source, cfg, seed, key))
    elif isinstance(module, AnalogLinear):
        setattr(parent, attr, module.release())


def restore_digital(model: nn.Module, info: ModelInfo | None = None) -> nn.Module:
    """Undo :func:`simulate`: the ideal analog groups, dense layers and HPD halves come back (in place)."""
    info = info or recognize(model)
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        if isinstance(het, HetExperts):
            group = het.groups["analog"] if "analog" in het.groups else None
            if isinstance(group, AnalogExpertGroup):
                het.groups["analog"] = group.release()
    _simulate_dense(model, info, None, 0, "digital")
    trim()
    return model
