"""``sweep``: digital fractions x selectors (x peers) under one analog configuration, in this process, on local
worker processes or on Ray actors, resumable from its output directory; the :class:`SweepResult` is its
``results.json`` (plus ``results.md`` and the plots)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...analog.config import AnalogConfig
from ...analog.input_ranges import check_input_ranges_args
from ...base.errors import HetMoEError
from ...base.io import check_inputs_survive
from ...base.version import PRODUCER
from ..under_noise import EvalSpec, read_inputs
from .config import SweepConfig, sweep_context
from .jobs import SweepRow
from .plan import results_markdown, run_sweep_jobs, sweep_document, sweep_plan, write_sweep
from .store import SweepStore
from .workers import Observer


@dataclass
class SweepResult:
    """A finished sweep: its ``rows`` (one per placement, metrics over the hardware instances), what it ran on
    and how (``meta``), and how many units ran now and how many an earlier run had finished. :meth:`to_dict` is
    ``results.json``; :meth:`save` writes it, ``results.md`` and the plots into a directory."""

    rows: list[SweepRow]
    meta: dict
    analog: AnalogConfig
    spec: EvalSpec
    ran: int
    resumed: int
    files: list[Path] = field(default_factory=list)
    """What :meth:`save` wrote last (by :func:`sweep` into its ``out``)."""

    def to_dict(self) -> dict:
        return sweep_document(self.rows, self.analog, self.spec, self.meta)

    def table(self) -> str:
        """The rows as the markdown table of ``results.md``."""
        return results_markdown(self.rows, self.analog, self.spec.seeds)

    def save(self, directory: str | Path) -> list[Path]:
        """``results.json``, ``results.md`` and one PNG per metric (routing, time, energy where measured) in
        ``directory``, written atomically; returns their paths."""
        self.files = write_sweep(Path(directory), self.rows, self.analog, self.spec, self.meta)
        return self.files


def sweep(
    config: SweepConfig,
    out: str | Path | None = None,
    *,
    workers: int | None = None,
    ray: str | bool | None = None,
    observer: Observer | None = None,
) -> SweepResult:
    """Run the sweep ``config`` describes and return its rows (see :class:`SweepConfig`).

    ``out``: the output directory, kept as a resumable store (each finished unit saved as it finishes; running the
    same config again resumes; a config that would change a unit's numbers is refused), and given the results
    (:meth:`SweepResult.save`). ``workers``: N local worker processes, each with its own model copy (on a CUDA
    machine worker i on GPU i mod the count; on a CPU the cores shared out). ``ray``: Ray actors on the cluster at
    that address (``True``: a local Ray instance), ``workers`` of them (default one per GPU, else per 2 CPUs).
    Everything is checked before a model loads."""
    from ...models import load_tokenizer
    from ...peers.registry import check_peers
    from ...scoring import check_selectors
    from ..perplexity import scored_tokens

    if not isinstance(config, SweepConfig):
        raise HetMoEError(f"config must be a SweepConfig, got {type(config).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise HetMoEError(f"workers={workers!r} must be an integer >= 1")
    has_text = config.calibration_text is not None
    check_selectors(list(config.selectors), has_text)
    peers = check_peers(list(config.peers), has_text, combined=False) if config.peers else []
    cfg, spec = config.analog_config(), config.spec()
    prepared = read_inputs(spec)
    check_input_ranges_args(cfg, config.input_ranges, has_text)
    store = None
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise HetMoEError(f"out {out}: exists and is not a directory; choose a directory path")
        inputs = {name: getattr(config, name) for name in ("model", "calibration_text", "ppl_text", "input_ranges")}
        check_inputs_survive({**inputs, "tasks_dir": config.tasks_dir}, directories={"out": out})
        store = SweepStore(out, config.settings())
    tokenizer = load_tokenizer(config.model)
    ppl_scored = None
    if prepared.text is not None:
        ppl_scored = scored_tokens(tokenizer, prepared.text, spec.ppl_tokens, str(spec.ppl_path))
    jobs = sweep_plan(list(config.fractions), list(config.selectors), cfg, config.ablation, peers)
    pool = _pool(config, workers, ray)
    context = None if pool else (lambda: sweep_context(config, None, prepared))
    if store is not None:
        store.lock()  # held until the results are written too
    try:
        outcome = run_sweep_jobs(jobs, cfg, spec, store, context=context, pool=pool, observer=observer)
        return _result(config, outcome, cfg, spec, peers, ppl_scored, pool, ray, out)
    finally:
        if store is not None:
            store.release()


def _result(config, outcome, cfg, spec, peers, ppl_scored, pool, ray, out) -> SweepResult:
    """The sweep's rows and record, saved into ``out`` when given."""
    identity = outcome.identity or {}
    meta = {
        "producer": PRODUCER,
        "model": identity.get("model"),
        "fractions": list(config.fractions),
        "scope": config.scope,
        "selectors": list(config.selectors),
        "peers": peers,
        "ppl_text": spec.ppl_path,
        "ppl_tokens": ppl_scored,
        "ppl_max_tokens": spec.ppl_tokens,
        "tasks": spec.tasks,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "lm_eval": outcome.lm_eval,
        "cost_params": config.cost_params.to_dict(),
        "input_ranges": identity.get("input_ranges"),
        "routing_reference": identity.get("routing_reference"),
        "workers": _workers_record(pool, ray, outcome.workers),
    }
    result = SweepResult(outcome.rows, meta, cfg, spec, outcome.ran, outcome.resumed)
    if out is not None:
        result.save(out)
    return result


def _pool(config: SweepConfig, workers: int | None, ray: str | bool | None):
    """The workers of ``workers`` / ``ray``, or None to run in this process."""
    if ray in (None, False) and (workers or 1) == 1:
        return None
    if config.load.device_map is not None:
        raise HetMoEError(
            "device_map shards one model over the devices, and workers or ray load one model per worker: use "
            "device_map alone, or one device per worker"
        )
    factory = functools.partial(sweep_context, config)
    device = config.load.device
    if ray not in (None, False):  # the cluster's devices, not this machine's: auto takes a GPU per actor if any
        from .ray_actors import RayPool

        gpus = None if device == "auto" else (1 if device.startswith("cuda") else 0)
        address = ray if isinstance(ray, str) and ray else None
        return RayPool(factory, workers, address, threads=1, gpus=gpus)
    from .workers import LocalPool

    assert workers is not None
    devices = None
    if config.load.resolved_device().startswith("cuda") and device in ("auto", "cuda"):
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    threads = 0 if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // workers)
    return LocalPool(factory, workers, threads=threads, devices=devices)


def _workers_record(pool, ray: str | bool | None, started: list[dict]) -> dict:
    """Where this run's units ran: in this process, or on N local or Ray workers (each one started, with its
    seconds from start to ready; a killed worker's replacement is listed too)."""
    if pool is None:
        return {"kind": "serial", "count": 1}
    kind = "ray" if ray not in (None, False) else "local"
    address = ray if isinstance(ray, str) and ray else None
    return {"kind": kind, "count": pool.size, "address": address, "started": started}
