"""hetmoe-compile: deploy Mixture-of-Experts LLMs on heterogeneous analog-digital accelerators.

    import hetmoe_compile as hc
    analysis = hc.analyze(model)                                   # every expert's sensitivity scores
    compiled = hc.compile(model, hc.PlacementPolicy(0.25), "pcm")  # place experts, canonicalise the model
    compiled.simulate(seed=0); compiled.export("out/onnx")         # simulate AIMC; partitioned ONNX

The public names are imported on first use, so ``hetmoe_compile.runtime`` (ONNX Runtime + numpy) imports
without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .base.version import __version__

STAGES = (
    "base",
    "runtime",
    "ir",
    "models",
    "transforms",
    "analog",
    "scoring",
    "placement",
    "cost",
    "graph",
    "export",
    "peers",
    "compose",
    "eval",
    "cli",
)
"""The pipeline's stages, one package each, in import order: a module imports its own stage and earlier ones only
(``docs/ARCHITECTURE.md`` lists what each holds; ``tests/test_architecture.py`` checks tree, table and imports)."""

_PUBLIC = {
    "compile": "compose.api",
    "analyze": "compose.api",
    "place": "compose.api",
    "calibrate_input_ranges": "compose.api",
    "Analysis": "compose.pipeline",
    "evaluate": "eval.evaluate",
    "sweep": "eval.sweep.run",
    "SweepConfig": "eval.sweep.config",
    "SweepResult": "eval.sweep.run",
    "Evaluation": "eval.evaluate",
    "InputRanges": "analog.input_ranges",
    "attach_input_ranges": "analog.input_ranges",
    "LoadOptions": "models.loader",
    "CompiledMoE": "compose.api",
    "prepare": "compose.backend",
    "BackendOptions": "compose.backend",
    "PlacementPolicy": "placement.policy",
    "Placement": "placement.placement",
    "AnalogConfig": "analog.config",
    "analog_config": "analog.config",
    "PRESETS": "analog.config",
    "Calibration": "models.calibration",
    "calibration_from_text": "models.calibration",
    "load_model": "models",
    "load_tokenizer": "models",
    "recognize": "models",
    "ExportOptions": "export",
    "export_onnx": "export",
    "HetMoEError": "base.errors",
}
__all__ = [
    "PRESETS",
    "STAGES",
    "Analysis",
    "SweepConfig",
    "SweepResult",
    "AnalogConfig",
    "BackendOptions",
    "Calibration",
    "CompiledMoE",
    "Evaluation",
    "ExportOptions",
    "HetMoEError",
    "InputRanges",
    "LoadOptions",
    "Placement",
    "PlacementPolicy",
    "__version__",
    "analog_config",
    "analyze",
    "attach_input_ranges",
    "calibrate_input_ranges",
    "calibration_from_text",
    "compile",
    "evaluate",
    "export_onnx",
    "load_model",
    "load_tokenizer",
    "place",
    "prepare",
    "recognize",
    "sweep",
]
assert set(__all__) == {"__version__", "STAGES", *_PUBLIC}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .analog.config import PRESETS, AnalogConfig, analog_config
    from .base.errors import HetMoEError
    from .compose.api import CompiledMoE, analyze, compile
    from .compose.backend import BackendOptions, prepare
    from .export import ExportOptions, export_onnx
    from .models import load_model, load_tokenizer, recognize
    from .models.calibration import Calibration, calibration_from_text
    from .models.loader import LoadOptions
    from .placement.placement import Placement
    from .placement.policy import PlacementPolicy


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
