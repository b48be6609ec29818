"""lm-evaluation-harness as the task engine: a model lm-eval drives, and one evaluation of a model as it is now.

:class:`HetMoELM` is lm-eval's Hugging Face model (``HFLM``) around a hetmoe-compile model: loaded, placed by a
placement file or a digital fraction, with one simulated hardware instance under its analog experts (every
analog field, input ranges and low-bit digital experts as keyword arguments), or a model evaluated as it is. It
is registered with lm-eval as ``hetmoe`` when this module is imported::

    import lm_eval, hetmoe_compile.eval.harness as h
    lm_eval.simple_evaluate(model=h.HetMoELM("examples/olmoe-demo", placement="p.json", noise="pcm", seed=0),
                            tasks=["piqa"])

:func:`harness_metrics` runs lm-eval through that adapter on an already-built model (``evaluate`` and ``sweep`` call
it once per hardware instance) and returns its metrics flattened to ``<task>/<metric>``, standard errors included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from ..base.errors import HetMoEError


@register_model("hetmoe")
class HetMoELM(HFLM):
    """lm-eval's ``hetmoe`` model: ``pretrained`` (a model folder or hub id, loaded on ``device`` with ``dtype``;
    or a loaded model, evaluated as it is) placed by ``placement`` (a placement.json) or by ``digital_fraction``
    (with ``selector``), with hardware instance ``seed`` of ``noise`` (a preset; any :class:`AnalogConfig` field
    such as ``noise_scale``, ``t_inference``, ``w_noise`` or ``ir_drop`` changes it) under its analog experts,
    ``input_ranges`` (a file) for constant noise management and ``digital_bits`` (8 or 4, ``group_size``) for
    low-bit digital experts. Without a placement the model is evaluated as it is, and the noise arguments are
    refused. The remaining keyword arguments go to ``HFLM`` (``batch_size``, ``max_length``, ...); any other name is
    refused, so a typo never runs at the defaults."""

    def __init__(
        self,
        pretrained: str | nn.Module,
        placement: str | None = None,
        digital_fraction: float | str | None = None,
        selector: str = "max-neuron-norm",
        noise: str | None = None,
        seed: int | str | None = None,
        input_ranges: str | None = None,
        digital_bits: int | str | None = None,
        group_size: int | str = 128,
        dtype: str = "auto",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        from ..analog.config import AnalogConfig, analog_config
        from ..base.errors import check_seed
        from ..compose.api import compile
        from ..models import load_tokenizer
        from ..models.loader import LoadOptions
        from ..placement import Placement, PlacementPolicy

        physics = {k: _number(k, kwargs.pop(k)) for k in list(kwargs) if k in _ANALOG_FIELDS}
        unknown = sorted(k for k in kwargs if k not in _HFLM_ARGUMENTS)
        if unknown:
            raise HetMoEError(
                f"hetmoe model_args: unknown {', '.join(unknown)}; hetmoe takes placement, digital_fraction, "
                f"selector, noise, seed, input_ranges, digital_bits, group_size, dtype, device, the analog fields "
                f"({', '.join(sorted(_ANALOG_FIELDS))}) and HFLM's arguments"
            )
        placed = placement is not None or digital_fraction is not None
        if placement is not None and digital_fraction is not None:
            raise HetMoEError("give placement or digital_fraction, not both")
        noisy = {"noise": noise, "seed": seed, "input_ranges": input_ranges, "digital_bits": digital_bits, **physics}
        given = [k for k, v in noisy.items() if v is not None]
        if given and not placed:
            raise HetMoEError(
                f"{', '.join(given)} need a placement: add placement=FILE or digital_fraction=F (without one the "
                "model is evaluated as it is)"
            )
        tokenizer = kwargs.pop("tokenizer", None)
        if isinstance(pretrained, nn.Module):
            if placed:
                raise HetMoEError("a loaded model is evaluated as it is: place it with hetmoe_compile.compile first")
            model = pretrained
        else:
            model = LoadOptions(dtype, _device(device)).load(str(pretrained))
            tokenizer = tokenizer or load_tokenizer(str(pretrained))
        self.hetmoe = None
        info: dict[str, Any] = {"placement": placement, "digital_fraction": None, "noise": None, "seed": None}
        if placed:
            seed = check_seed(int(seed) if isinstance(seed, str) and seed.isdigit() else (seed or 0), "seed")
            cfg: AnalogConfig = analog_config(noise or "pcm", **physics)
            policy = None
            if digital_fraction is not None:
                policy = PlacementPolicy(_number("digital_fraction", digital_fraction), selector)
            if input_ranges is not None or cfg.noise_management == "constant":
                from ..analog.input_ranges import prepare_input_ranges
                from ..models.recognize import recognize

                prepare_input_ranges(model, recognize(model), cfg, input_ranges)
            bits = None if digital_bits is None else int(_number("digital_bits", digital_bits))
            self.hetmoe = compile(
                model,
                policy,
                cfg,
                source=str(placement or pretrained),
                placement=None if placement is None else Placement.load(placement),
                digital_bits=bits,
                group_size=int(_number("group_size", group_size)),
            )
            self.hetmoe.simulate(seed)
            info = {
                "placement": placement,
                "digital_fraction": None if policy is None else policy.digital_fraction,
                "noise": cfg.to_dict(),
                "seed": seed,
                "digital_bits": bits,
            }
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self._hetmoe_info = info

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config, plus the placement, analog preset and instance."""
        return {**super().get_model_info(), "hetmoe": self._hetmoe_info}


def _device(device: str | None) -> str:
    """``device`` as HFLM reads it: lm-eval's command line passes ``cuda:0`` by default, and HFLM runs on the CPU
    where there is no CUDA; so do we, saying so. Any other device must exist."""
    import sys

    import torch

    if device is None:
        return "auto"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"hetmoe: device={device!r} is not available here; running on the CPU", file=sys.stderr)
        return "cpu"
    return str(device)


def _number(name: str, value: Any) -> Any:
    """A number lm-eval's ``model_args`` string gave as text (``noise_scale=2.5``); other values pass through."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        if name in _NUMERIC:
            raise HetMoEError(f"{name}={value!r} is not a number; e.g. {name}=2.5") from None
        return value


def _fields() -> tuple[set[str], set[str], set[str]]:
    import dataclasses
    import inspect

    from ..analog.config import AnalogConfig

    analog = {f.name for f in dataclasses.fields(AnalogConfig)} - {"preset"}
    numeric = {f.name for f in dataclasses.fields(AnalogConfig) if "float" in str(f.type) or "int" in str(f.type)}
    hflm = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "pretrained"}
    return analog, numeric | {"digital_fraction", "digital_bits", "group_size"}, hflm


_ANALOG_FIELDS, _NUMERIC, _HFLM_ARGUMENTS = _fields()


class HarnessTasks:
    """lm-eval's task index for one evaluation, built once: lm-eval's own tasks, or with ``tasks_dir`` the local
    jsonl tasks of :mod:`~hetmoe_compile.eval.harness_tasks` in their place (generated into a temporary folder
    that lives as long as this object). ``names`` are checked against the index at once."""

    def __init__(self, names: list[str], tasks_dir: str | Path | None = None) -> None:
        import tempfile

        from lm_eval.tasks import TaskManager

        from .harness_tasks import write_local_tasks

        self.names = list(dict.fromkeys(names))
        self.tasks_dir = None if tasks_dir is None else str(tasks_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="hetmoe-lm-eval-")
        include = None
        if tasks_dir is not None:
            local = write_local_tasks(tasks_dir, Path(self._tmp.name) / "tasks")
            missing = [t for t in self.names if t not in local]
            if missing:
                raise HetMoEError(
                    f"--tasks {','.join(missing)}: no local file in {tasks_dir} for it; there are {', '.join(local)}"
                )
            include = str(Path(self._tmp.name) / "tasks")
        self.manager = TaskManager(include_path=include)
        unknown = [t for t in self.names if t not in self.manager.all_tasks]
        if unknown:
            raise HetMoEError(
                f"--tasks {','.join(unknown)}: not an lm-eval task or group; 'lm-eval ls tasks' lists them"
            )
        if tasks_dir is None:
            _check_hub()


def _check_hub() -> None:
    """lm-eval's own datasets come from the Hugging Face hub: with no hub (and no offline mode, which uses the
    local datasets cache) one line now, not a minute of retries inside ``datasets``."""
    import os

    from huggingface_hub import constants

    from ..models.loader import hub_reachable

    if constants.is_offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return
    if not hub_reachable():
        raise HetMoEError(
            f"--tasks without --tasks-dir reads lm-eval's datasets from the Hugging Face hub ({constants.ENDPOINT}), "
            "which cannot be reached; pass --tasks-dir DIR (local jsonl files, e.g. ../shared/data/qa), or set "
            "HF_DATASETS_OFFLINE=1 to use datasets already in the local cache"
        )


def harness_metrics(
    model: nn.Module,
    tokenizer,
    tasks: HarnessTasks,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[dict[str, float], dict]:
    """lm-eval on ``model`` as it is now: ``({"<task>/<metric>": value, "<task>/<metric>_stderr": ...}, record)``
    where ``record`` holds lm-eval's version and per-task configs, versions, n-shot and sample counts."""
    import lm_eval

    lm = HetMoELM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # the model as it is now
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks.names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tasks.manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            bootstrap_iters=1000,  # closed-form standard errors for means; a bootstrap only for the others
            log_samples=False,
        )
    except (ConnectionError, OSError) as exc:  # a hub dataset with no hub (datasets raises these)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HetMoEError(
            f"lm-eval could not load the data of {','.join(tasks.names)}: {first}; with no model hub, pass "
            "--tasks-dir DIR (a folder of local jsonl files, e.g. ../shared/data/qa)"
        ) from exc
    if res is None:
        raise HetMoEError("lm-eval returned no results")
    metrics: dict[str, float] = {}
    for task, values in res["results"].items():
        for key, value in values.items():
            metric, _, _filter = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric in ("alias", "sample_len"):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue  # lm-eval's "N/A" standard errors
            metrics[f"{task}/{metric}"] = float(value)
    from lm_eval.utils import handle_non_serializable

    record = {
        "lm_eval_version": lm_eval.__version__,
        "tasks_dir": tasks.tasks_dir,
        "configs": res.get("configs", {}),
        "versions": res.get("versions", {}),
        "n-shot": res.get("n-shot", {}),
        "n-samples": res.get("n-samples", {}),
    }
    # as lm-eval writes its own results: functions in the configs (doc_to_text, ...) become their text
    return metrics, json.loads(json.dumps(record, default=handle_non_serializable))


def main(argv: list[str] | None = None) -> None:
    """``hetmoe-lm-eval``: lm-eval's own command line with the ``hetmoe`` model registered, plus ``--tasks-dir DIR``
    (local jsonl tasks, handed to lm-eval as its ``--include_path``). The package declares the model in lm-eval's
    ``lm_eval.models`` entry-point group, which lm-eval's plugin discovery (main branch, not in 0.4.13 or
    0.5.0.dev1) reads; the released versions find model classes only in their own table or through
    ``register_model`` in an imported module, so a bare ``lm_eval --model hetmoe`` cannot see this package; this
    command is that CLI after the import::

        hetmoe-lm-eval run --model hetmoe --model_args pretrained=DIR,placement=p.json,noise=pcm,seed=0 \\
            --tasks piqa --tasks-dir ../shared/data/qa --limit 50
    """
    import sys
    import tempfile

    from lm_eval.__main__ import cli_evaluate

    from .harness_tasks import write_local_tasks

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="hetmoe-lm-eval-") as tmp:
        if "--tasks-dir" in args:
            i = args.index("--tasks-dir")
            if i + 1 >= len(args):
                _fail("--tasks-dir needs a folder")
            if "--include_path" in args:
                _fail("give --tasks-dir or --include_path, not both")
            try:
                write_local_tasks(args[i + 1], Path(tmp) / "tasks")
            except HetMoEError as exc:
                _fail(str(exc))
            args[i : i + 2] = ["--include_path", str(Path(tmp) / "tasks")]
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        except HetMoEError as exc:  # our bad input (a placement for another model, ...): one line, exit 2
            _fail(str(exc))


def _fail(message: str) -> None:
    import sys

    print(f"hetmoe-lm-eval: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
