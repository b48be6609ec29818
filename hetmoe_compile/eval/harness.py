"""lm-evaluation-harness as the task engine: a model lm-eval drives, and one evaluation of a model as it is now.

:class:`HetMoELM` is lm-eval's Hugging Face model (``HFLM``) around a hetmoe-compile model: loaded, placed by a
placement file (or all digital without one), with one simulated hardware instance under its analog experts. It
is registered with lm-eval as ``hetmoe`` when this module is imported::

    import lm_eval, hetmoe_compile.eval.harness as h
    lm_eval.simple_evaluate(model=h.HetMoELM("examples/olmoe-demo", placement="p.json", noise="pcm", seed=0),
                            tasks=["piqa"])

:func:`harness_metrics` runs lm-eval on an already-built model (``eval`` and ``sweep`` call it once per hardware
instance) and returns its metrics flattened to ``<task>/<metric>``, standard errors included.
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
    """``pretrained``: a model folder or hub id; ``placement``: a placement.json (none: every expert digital);
    ``noise``: an analog preset; ``seed``: the hardware instance; ``noise_scale``, ``t_inference``: as for
    ``eval``; the remaining keyword arguments go to ``HFLM`` (``batch_size``, ``max_length``, ...)."""

    def __init__(
        self,
        pretrained: str,
        placement: str | None = None,
        noise: str = "pcm",
        seed: int | str = 0,
        noise_scale: float | str | None = None,
        t_inference: float | str | None = None,
        dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        from ..analog.config import analog_config
        from ..base.errors import check_seed
        from ..compose.api import compile
        from ..models import load_model, load_tokenizer
        from ..placement import Placement

        seed = check_seed(int(seed) if isinstance(seed, str) and seed.isdigit() else seed, "seed")
        overrides = {}
        for key, value in (("noise_scale", noise_scale), ("t_inference", t_inference)):
            if value is not None:
                try:
                    overrides[key] = float(value)
                except (TypeError, ValueError):
                    raise HetMoEError(f"{key}={value!r} is not a number; e.g. {key}=2.5") from None
        cfg = analog_config(noise, **overrides)
        model = load_model(str(pretrained), dtype=dtype)
        tokenizer = load_tokenizer(str(pretrained))
        self.hetmoe = None
        if placement is not None:
            self.hetmoe = compile(model, analog=cfg, source=str(placement), placement=Placement.load(placement))
            self.hetmoe.simulate(seed)
        kwargs.pop("device", None)  # the model stays where load_model put it
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self._hetmoe_info = {"placement": placement, "noise": cfg.to_dict(), "seed": seed}

    def get_model_info(self) -> dict:
        """What lm-eval records in its results' config, plus the placement, analog preset and instance."""
        return {**super().get_model_info(), "hetmoe": self._hetmoe_info}


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

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
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
