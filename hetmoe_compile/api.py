"""The Python API: ``analyze`` a model's experts, ``compile`` it to a placement, then simulate, report or export."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .analog.config import AnalogConfig, analog_config
from .calibration import Calibration
from .canonicalize import canonicalize
from .models.recognize import ModelInfo, recognize
from .pipeline import Analysis, analyze_model, place_model
from .placement.placement import Placement
from .placement.policy import PlacementPolicy
from .scoring import check_selectors
from .scoring import selectors as _registry


@dataclass
class CompiledMoE:
    """A model placed on digital and analog hardware. ``model`` is canonical: each MoE layer holds a digital and
    an analog expert group; without :meth:`simulate` it computes exactly what the original model computes."""

    model: nn.Module
    info: ModelInfo
    placement: Placement
    analog: AnalogConfig

    def report(self, graph: bool = False, verbose: bool = False) -> str:
        """Parameter share per device and digital experts per layer; with ``graph``, also ``torch.export`` the
        model and count graph nodes per device (``verbose``: every node with its device and reason)."""
        from .pipeline import tag_graph
        from .report import placement_report

        gm = None
        if graph:
            self.restore()
            gm = tag_graph(self.model, self.placement, self.info).graph_module
        return placement_report(self.placement, gm, verbose)

    def simulate(self, seed: int = 0, dense: str | None = None) -> nn.Module:
        """Put hardware instance ``seed`` of :attr:`analog` under the analog experts (in place; ``dense="analog"``
        also puts dense layers on tiles, the paper's ablation). Returns the model; :meth:`restore` undoes it."""
        from .analog.simulate import simulate

        return simulate(self.model, self.analog, seed, dense or self.placement.policy.dense, self.info)

    def restore(self) -> nn.Module:
        """The ideal (digital-equivalent) model back after :meth:`simulate`."""
        from .analog.simulate import restore_digital

        return restore_digital(self.model, self.info)

    def quantize_digital(self, bits: int, group_size: int = 128) -> list:
        """Quantise the digital experts' weights to INT8 or INT4, group-wise (in place; see
        :func:`hetmoe_compile.lowbit.quantize_digital_experts`); returns each expert's error bound and error."""
        from .lowbit import quantize_digital_experts

        return quantize_digital_experts(self.model, bits, group_size, self.info)

    def export(self, directory: str | Path, instance_seed: int | None = None, monolithic: bool = False,
               tokenizer=None) -> Path:
        """Partitioned ONNX + ``manifest.json`` in ``directory`` (see :func:`hetmoe_compile.export.export_onnx`);
        returns the manifest's path."""
        from .export import ExportOptions, export_onnx

        self.restore()
        return export_onnx(self.model, self.placement, directory,
                           ExportOptions(self.analog, instance_seed, monolithic), tokenizer)


def compile(model: nn.Module, policy: PlacementPolicy | None = None, analog: AnalogConfig | str | None = None,
            calibration: Calibration | None = None, source: str = "") -> CompiledMoE:
    """Score ``model``'s experts with ``policy.selector``, place them, and canonicalise ``model`` in place.

    ``analog`` is an :class:`AnalogConfig` or a preset name (default ``"pcm"``); data-driven selectors need
    ``calibration`` (:func:`hetmoe_compile.calibration.calibration_from_text`)."""
    policy = policy or PlacementPolicy()
    check_selectors([policy.selector], calibration is not None)
    cfg = analog if isinstance(analog, AnalogConfig) else analog_config(analog or "pcm")
    info = recognize(model)
    placement = place_model(model, policy, calibration, source, info)
    canonicalize(model, placement.devices(), info)
    return CompiledMoE(model, recognize(model), placement, cfg)


def analyze(model: nn.Module, selectors: list[str] | None = None, calibration: Calibration | None = None,
            seed: int = 0) -> Analysis:
    """Every selector's score for every routed expert (``Analysis.scores``, ``.spearman()``, ``.table()``).

    By default all selectors the inputs allow run (data-driven ones only with ``calibration``)."""
    names = selectors or [n for n, s in _registry().items() if calibration is not None or not s.needs_calibration]
    check_selectors(names, calibration is not None)
    return analyze_model(model, names, calibration, seed)
