"""A sweep as units of work: its placements (:class:`SweepJob`), each measured on hardware instances (a
:class:`Unit` is one placement on one instance), run by a :class:`JobRunner` in whichever process holds the model,
and gathered back into table rows. A unit's numbers depend only on the unit and the sweep's settings, never on
which process ran it or what ran before, so serial, parallel and resumed sweeps agree."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ...analog.config import AnalogConfig
from ...analog.simulate import restore_digital
from ...models.calibration import Calibration
from ...models.recognize import ModelInfo
from ...peers.registry import PEERS, PeerOptions
from ...placement.placement import Placement
from ...transforms.canonicalize import canonicalize
from ..under_noise import EvalSpec, Prepared, check_finite, evaluate_instance, instance_count, summarize

CostFn = Callable[[nn.Module, ModelInfo, Placement, str, dict], dict]
"""``(model, info, placement, dense, peer_record) -> cost dict`` (with ``energy_per_token_j``) for a row."""


@dataclass(frozen=True)
class SweepJob:
    """One placement of a sweep: its row label, selector (``-`` for the references), digital fraction, where the
    dense modules run, and the peer applied (``-`` for none)."""

    label: str
    selector: str
    fraction: float
    dense: str
    peer: str = "-"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """One placement on one hardware instance (``seed``)."""

    job: SweepJob
    seed: int

    @property
    def key(self) -> str:
        """A file-name-safe name, unique per (label, seed): a slug of the label and a digest of it."""
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.job.label).strip("-")
        digest = hashlib.sha1(self.job.label.encode()).hexdigest()[:8]
        return f"{slug}-{digest}-s{self.seed}"


@dataclass
class SweepRow:
    label: str
    selector: str
    digital_fraction: float
    dense: str
    metrics: dict
    peer: str = "-"
    peer_summary: dict = field(default_factory=dict)
    cost: dict | None = None
    instances: list[dict] = field(default_factory=list)  # per measured instance: seed, worker, seconds


def sweep_jobs(
    fractions: list[float],
    selectors: list[str],
    ablation: bool = True,
    peers: Sequence[str] = (),
    dense_analog: bool = True,
) -> list[SweepJob]:
    """References, every (selector, inner fraction) with dense modules digital, the ablation for the first
    selector, then each peer alone (dense digital, at its own fraction) and with the first selector's inner
    fractions. Without ``dense_analog`` (constant noise management has input ranges for routed experts only) the
    rows with dense modules on tiles are left out."""
    jobs = [
        SweepJob("all-digital", "-", 1.0, "digital"),
        *([SweepJob("all-analog", "-", 0.0, "analog")] if dense_analog else []),
        SweepJob("dense-digital", "-", 0.0, "digital"),
    ]
    inner = [f for f in fractions if 0.0 < f < 1.0]
    jobs += [SweepJob(f"{s} {f:g}", s, f, "digital") for s in selectors for f in inner]
    if ablation and selectors and dense_analog:
        jobs += [SweepJob(f"{selectors[0]} {f:g} (dense analog)", selectors[0], f, "analog") for f in inner]
    for peer in peers:
        alone = PEERS[peer].alone_fraction
        jobs.append(SweepJob(peer, "-", alone, "digital", peer))
        jobs += [SweepJob(f"{peer} + {selectors[0]} {f:g}", selectors[0], f, "digital", peer) for f in inner]
    return jobs


def sweep_units(jobs: list[SweepJob], cfg: AnalogConfig, spec: EvalSpec) -> list[Unit]:
    """Every (job, instance) to measure, job by job. A job that is all digital (or any job under an ideal preset)
    has one instance; a job whose placement turns out to hold no analog device reports its later instances as
    ``skipped`` (:meth:`JobRunner.run`)."""
    units = []
    for job in jobs:
        all_digital = job.fraction >= 1.0 and job.dense == "digital" and job.peer != "hpd"
        units += [Unit(job, s) for s in range(instance_count(cfg, spec, not all_digital, job.dense))]
    return units


@dataclass(kw_only=True)
class SweepContext:
    """What a process needs to run a sweep's units: the model (all digital), its tokenizer, the noise and what to
    measure, the calibration text, selectors and peer options. ``identity`` says what the results were computed on
    (the model's identity, its input ranges, the routing reference); every worker of a sweep must report the
    same."""

    model: nn.Module
    info: ModelInfo
    tokenizer: Any
    cfg: AnalogConfig
    spec: EvalSpec
    prepared: Prepared
    selectors: list[str]
    calibration: Calibration | None = None
    peer_options: PeerOptions = field(default_factory=PeerOptions)
    cost_fn: CostFn | None = None
    scope: str = "per-layer"
    identity: dict = field(default_factory=dict)


def binding(identity: dict) -> dict:
    """The part of a context's identity that units' numbers depend on: the model (its config, architecture and
    layers, not the path it was read from) and the digest of its input ranges. The routing reference's
    statistics are reported, not compared: they are floats."""
    model = {k: v for k, v in (identity.get("model") or {}).items() if k != "source"}
    return {"model": model, "input_ranges": (identity.get("input_ranges") or {}).get("sha256")}


ContextFactory = Callable[[str | None], SweepContext]
"""``factory(device) -> SweepContext``: builds a worker's context (``device`` overrides the model's device, e.g.
``cuda:1``; None keeps it). It is pickled into worker processes, so it must be a module-level function or a
``functools.partial`` of one."""


def worker_name(kind: str) -> str:
    """``<kind>@<host>:<pid>``, the ``worker`` recorded with each unit."""
    return f"{kind}@{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    """Runs units on one process's model. Consecutive units of the same job reuse its compiled placement (and
    applied peers); a new job first takes the previous one back. Selector scores are computed on first use."""

    def __init__(self, ctx: SweepContext, worker: str) -> None:
        self.ctx = ctx
        self.worker = worker
        self._scores: dict[str, Any] = {}
        self._job: SweepJob | None = None
        self._compiled: Any = None
        self._fixed: dict = {}  # of the compiled job: has_analog, cost, peer_summary

    def run(self, unit: Unit) -> dict:
        """The unit's result: ``{"label", "seed", "metrics": {name: value}, "skipped", "cost", "peer_summary",
        "lm_eval", "seconds", "worker"}`` (``skipped``: the placement holds no analog device, so this instance
        equals instance 0 and is not measured; ``lm_eval``: what lm-eval reported about its tasks, on instance 0)."""
        ctx, job = self.ctx, unit.job
        start = time.perf_counter()
        try:
            if job != self._job:
                self._switch(job)
            fixed = self._fixed
            skipped = unit.seed >= instance_count(ctx.cfg, ctx.spec, fixed["has_analog"], job.dense)
            metrics: dict[str, float] = {}
            if not skipped:
                metrics = evaluate_instance(
                    ctx.model, ctx.info, ctx.tokenizer, ctx.cfg, ctx.spec, ctx.prepared, unit.seed, job.dense
                )
                check_finite(metrics, ctx.cfg)
        except BaseException:
            self.release()
            raise
        return {
            "label": job.label,
            "seed": unit.seed,
            "metrics": metrics,
            "skipped": skipped,
            "cost": fixed["cost"],
            "peer_summary": fixed["peer_summary"],
            "lm_eval": ctx.prepared.lm_eval if unit.seed == 0 else None,  # the same for every unit: kept once a job
            "seconds": time.perf_counter() - start,
            "worker": self.worker,
        }

    def _switch(self, job: SweepJob) -> None:
        from ...compose.api import compile
        from ...placement.policy import PlacementPolicy
        from ...scoring import score

        self.release()
        ctx = self.ctx
        selector = job.selector if job.selector != "-" else ctx.selectors[0]  # fractions 0 and 1 ignore scores
        if selector not in self._scores:
            self._scores[selector] = score(ctx.model, ctx.info, selector, ctx.calibration)
        scores = self._scores[selector]
        compiled = compile(
            ctx.model,
            PlacementPolicy(job.fraction, scores.selector, ctx.scope, dense=job.dense),
            ctx.cfg,
            ctx.calibration,
            scores=scores,
            peers=[] if job.peer == "-" else [job.peer],
            peer_options=ctx.peer_options,
        )
        self._compiled, self._job = compiled, job
        try:
            placement = compiled.placement
            record = {} if compiled.peers is None else compiled.peers.record
            cost = ctx.cost_fn(ctx.model, ctx.info, placement, job.dense, record) if ctx.cost_fn else None
            self._fixed = {
                "has_analog": any(l.ids("analog") for l in placement.layers) or job.peer == "hpd",
                "cost": cost,
                "peer_summary": peer_summary(record),
            }
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Take the current job back: the model digital again, its peers undone."""
        if self._compiled is None:
            return
        compiled, self._compiled, self._job = self._compiled, None, None
        try:
            restore_digital(self.ctx.model, self.ctx.info)
        finally:
            compiled.undo_peers()

    def close(self) -> None:
        """Release the last job and leave the model canonical and all digital."""
        self.release()
        canonicalize(self.ctx.model, None, self.ctx.info)


def assemble_rows(jobs: list[SweepJob], units: list[Unit], results: dict[str, dict]) -> list[SweepRow]:
    """One row per job from its units' results (``results[unit.key]``): mean, std and values of each metric over
    the measured instances, in seed order; the cost and peer summary of its first instance."""
    by_job: dict[SweepJob, list[dict]] = {}
    for unit in units:
        by_job.setdefault(unit.job, []).append(results[unit.key])
    rows = []
    for job in jobs:
        measured = [r for r in sorted(by_job[job], key=lambda r: r["seed"]) if not r["skipped"]]
        values: dict[str, list[float]] = {}
        for r in measured:
            for k, v in r["metrics"].items():
                values.setdefault(k, []).append(v)
        first = measured[0]
        instances = [{"seed": r["seed"], "worker": r["worker"], "seconds": round(r["seconds"], 3)} for r in measured]
        rows.append(
            SweepRow(
                job.label,
                job.selector,
                job.fraction,
                job.dense,
                summarize(values),
                job.peer,
                first["peer_summary"],
                first["cost"],
                instances,
            )
        )
    return rows


def peer_summary(record: dict) -> dict:
    """A few numbers that say what a peer did (the full record can hold one entry per expert)."""
    out: dict = {}
    for rec in record.values():
        if "replacements" in rec:
            out["experts_replaced"] = len(rec["replacements"])
        if "router_calibration" in rec:
            out["router_calibration"] = {
                k: v for k, v in rec["router_calibration"].items() if not isinstance(v, (list, dict))
            }
        if "projections" in rec:
            out["projections"] = [
                {k: p[k] for k in ("module", "rank", "rel_error") if k in p} for p in rec["projections"]
            ]
        if "bits" in rec:
            errs = [e["output_error"] for e in rec["experts"]]
            out["bits"] = rec["bits"]
            out["mean_output_error"] = sum(errs) / len(errs) if errs else 0.0
    return out
