"""Sweep digital fraction x selector under one noise setting, with all-digital / all-analog references, the
dense-on-analog ablation and the peers (ROMER, HPD, low-bit digital experts) alone and combined with the first
selector; each placement's estimated energy per token; results as JSON, a Markdown table and plots."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ...analog.config import AnalogConfig
from ...models.calibration import Calibration
from ...models.recognize import ModelInfo
from ...peers.registry import PeerOptions, check_peer_options, check_peers
from ...placement.placement import Placement
from ..plots import plot_against_time, plot_routing
from ..routing_diagnostics import PREFIX, is_routing_key
from ..under_noise import EvalSpec, Prepared, read_inputs, split_time_key
from .jobs import (
    CostFn,
    JobRunner,
    SweepContext,
    SweepJob,
    SweepRow,
    assemble_rows,
    sweep_jobs,
    sweep_units,
    worker_name,
)
from .store import SweepStore
from .workers import Observer, Pool, run_units


def sweep_cost_fn(params, cfg: AnalogConfig, frequencies: dict[int, list[float]] | None = None) -> CostFn:
    """A :data:`CostFn` estimating each row with the cost model ``params`` (a ``CostParams``; the tile size of
    ``cfg`` unless ``params`` sets one) and the routing ``frequencies`` (None: uniform). It costs the model as the
    row runs it: HPD halves and low-bit experts included, dense modules where the row puts them."""
    from ...cost.estimate import estimate_cost

    params = params.for_tiles(cfg.tile_size)

    def cost(model: nn.Module, info: ModelInfo, placement: Placement, dense: str, record: dict) -> dict:
        return estimate_cost(model, placement, params, info=info, dense=dense, frequencies=frequencies).to_dict()

    return cost


def sweep_plan(
    fractions: list[float],
    selectors: list[str],
    cfg: AnalogConfig,
    ablation: bool = True,
    peers: Sequence[str] = (),
) -> list[SweepJob]:
    """The jobs of a sweep under ``cfg`` (:func:`~.jobs.sweep_jobs`); under constant noise management,
    without the rows that put dense modules on tiles (said on stderr)."""
    if not selectors:
        raise ValueError("a sweep needs at least one selector")
    dense_analog = cfg.noise_management != "constant"
    if not dense_analog:
        print(
            "sweep: no rows with dense modules on tiles (all-analog, dense analog): constant noise management has "
            "input ranges for routed experts only",
            file=sys.stderr,
        )
    return sweep_jobs(fractions, selectors, ablation, peers, dense_analog)


@dataclass
class SweepOutcome:
    """A finished sweep: its rows, what the units ran on (:attr:`SweepContext.identity`; None when every unit
    came from an earlier run of a store without a record of it), lm-eval's record of its tasks, and how many
    units ran now and how many an earlier run had finished; the workers that ran them (name, seconds to ready;
    empty for a run in this process)."""

    rows: list[SweepRow]
    identity: dict | None
    lm_eval: dict | None
    ran: int
    resumed: int
    workers: list[dict]


def run_sweep_jobs(
    jobs: list[SweepJob],
    cfg: AnalogConfig,
    spec: EvalSpec,
    store: SweepStore | None = None,
    *,
    context: Callable[[], SweepContext] | None = None,
    pool: Pool | None = None,
    observer: Observer | None = None,
) -> SweepOutcome:
    """Measure every (job, instance) of ``jobs`` and gather the rows: in this process on the context that
    ``context()`` builds (called only if a unit is left to run), or on ``pool``'s workers. With a ``store``, units
    that an earlier run finished are read back instead of run, and each new one is saved as it finishes."""
    if (context is None) == (pool is None):
        raise ValueError("run_sweep_jobs needs exactly one of context and pool")
    units = sweep_units(jobs, cfg, spec)
    if store is not None:
        store.lock()  # one writer per directory, until this sweep ends
    try:
        return _run_units(jobs, units, store, context, pool, observer)
    finally:
        if store is not None:
            store.release()


def _run_units(jobs, units, store, context, pool, observer) -> SweepOutcome:
    finished = store.open() if store is not None else {}
    identity: dict | None = store.model if store is not None else None

    def serial() -> JobRunner:
        nonlocal identity
        assert context is not None
        ctx = context()
        identity = ctx.identity
        if store is not None:
            store.bind_model(ctx.identity)
        return JobRunner(ctx, worker_name("main"))

    results, ran = run_units(units, store, finished, serial if pool is None else None, pool, observer)
    if pool is not None and ran.identity is not None:
        identity = ran.identity
    rows = assemble_rows(jobs, units, results)
    lm_eval = next((results[u.key]["lm_eval"] for u in units if results[u.key].get("lm_eval")), None)
    return SweepOutcome(rows, identity, lm_eval, ran.count, len(units) - ran.count, ran.workers)


def run_sweep(
    model: nn.Module,
    info: ModelInfo,
    tokenizer,
    fractions: list[float],
    selectors: list[str],
    cfg: AnalogConfig,
    spec: EvalSpec,
    calibration: Calibration | None = None,
    ablation: bool = True,
    prepared: Prepared | None = None,
    peers: Sequence[str] = (),
    peer_options: PeerOptions | None = None,
    cost_fn: CostFn | None = None,
    scope: str = "per-layer",
    store: SweepStore | None = None,
) -> list[SweepRow]:
    """Evaluate every job of :func:`sweep_plan` under ``cfg`` on ``model``, in this process (each fraction spent
    per layer, or over all layers together with ``scope="global"``); with a ``store``, resumable.

    Fractions 0 and 1 do not depend on the selector and are evaluated once. All placements share hardware
    instances (seed s programs the same devices for an expert in every placement). A peer is applied after
    placement and taken back after its row, so rows do not leak into each other. The model is left canonical
    and all digital. For worker processes or Ray, see :func:`run_sweep_jobs`.
    """
    from ...scoring import check_selectors

    check_selectors(list(selectors), calibration is not None)  # before any job: a data-driven one needs text
    peers = check_peers(list(peers), calibration is not None, combined=False) if peers else []
    peer_options = peer_options or PeerOptions()
    check_peer_options(peers, info, peer_options)
    prepared = prepared or read_inputs(spec)
    jobs = sweep_plan(fractions, selectors, cfg, ablation, peers)
    from ...analog.input_ranges import attached_input_ranges
    from ...placement.placement import model_identity

    ranges = attached_input_ranges(model)
    identity = {
        "model": model_identity(model, info, str(getattr(model, "name_or_path", ""))),
        "input_ranges": None if ranges is None else {"sha256": ranges.digest},
    }
    ctx = SweepContext(
        model=model,
        info=info,
        tokenizer=tokenizer,
        cfg=cfg,
        spec=spec,
        prepared=prepared,
        selectors=list(selectors),
        calibration=calibration,
        peer_options=peer_options,
        cost_fn=cost_fn,
        scope=scope,
        identity=identity,
    )
    outcome = run_sweep_jobs(jobs, cfg, spec, store, context=lambda: ctx)
    prepared.lm_eval = prepared.lm_eval or outcome.lm_eval
    return outcome.rows


def _fmt(m: dict) -> str:
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["std"] > 0 else f"{m['mean']:.3f}"


def _energy(r: SweepRow) -> float | None:
    return None if r.cost is None else r.cost.get("energy_per_token_j")


def results_markdown(rows: list[SweepRow], cfg: AnalogConfig, seeds: int) -> str:
    metrics = shown_metrics(rows)
    energy = any(_energy(r) is not None for r in rows)
    timed = any(split_time_key(m) for m in metrics)
    when = "t_inference as in each column (t=...)" if timed else f"t_inference {cfg.t_inference:g} s"
    head = (
        f"Noise preset `{cfg.preset}` (noise scale {cfg.noise_scale:g}, {when}), "
        f"mean ± std over {seeds} hardware instances"
        + ("; energy per token from the cost model (decode, batch as configured)" if energy else "")
        + ".\n\n"
    )
    routing = routing_columns(rows)
    if routing:
        head += (
            "Routing against the clean model, averaged over MoE layers: `routing/topk_match` is the share of tokens "
            "whose top-k experts are the clean ones, `routing/moe_rel_error` the relative error of the layers' "
            "routed-expert output (per layer in results.json and routing.png).\n\n"
        )
    metrics = metrics + routing
    cols = ["placement", "selector", "digital fraction", "dense", *metrics] + (["energy/token (µJ)"] if energy else [])
    lines = ["| " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * (len(cols) - 4)]
    for r in rows:
        cells = [r.label, r.selector, f"{r.digital_fraction:g}", r.dense, *(_fmt(r.metrics[m]) for m in metrics)]
        if energy:
            e = _energy(r)
            cells.append("-" if e is None else f"{e * 1e6:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot_sweep(rows: list[SweepRow], metric: str, path: Path, title: str) -> Path:
    """Metric against digital fraction: one line per selector (dense digital), references as horizontal lines and
    the dense-on-analog ablation dashed (left); the dense-digital placements alone, zoomed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    by = {r.label: r for r in rows}
    ends = [by["dense-digital"], by["all-digital"]]
    selectors = list(dict.fromkeys(r.selector for r in rows if r.selector != "-"))
    for zoom, ax in enumerate(axes):
        for i, sel in enumerate(selectors):
            pts = sorted(
                [r for r in rows if r.selector == sel and r.dense == "digital" and r.peer == "-"],
                key=lambda r: r.digital_fraction,
            )
            pts = [ends[0]] + pts + [ends[1]]
            ax.errorbar(
                [r.digital_fraction for r in pts],
                [r.metrics[metric]["mean"] for r in pts],
                yerr=[r.metrics[metric]["std"] for r in pts],
                marker="o",
                ms=4,
                capsize=2,
                label=sel,
                color=f"C{i}",
            )
            abl = sorted(
                [r for r in rows if r.selector == sel and r.dense == "analog" and r.peer == "-"],
                key=lambda r: r.digital_fraction,
            )
            if abl and not zoom:
                ax.plot(
                    [r.digital_fraction for r in abl],
                    [r.metrics[metric]["mean"] for r in abl],
                    ls="--",
                    marker="x",
                    color=f"C{i}",
                    label=f"{sel}, dense on analog",
                )
        for j, peer in enumerate(dict.fromkeys(r.peer for r in rows if r.peer != "-")):
            pts = sorted([r for r in rows if r.peer == peer], key=lambda r: r.digital_fraction)
            ax.errorbar(
                [r.digital_fraction for r in pts],
                [r.metrics[metric]["mean"] for r in pts],
                yerr=[r.metrics[metric]["std"] for r in pts],
                marker="s",
                ms=4,
                capsize=2,
                ls=":",
                label=f"peer: {peer}",
                color=f"C{len(selectors) + j}",
            )
        ax.axhline(by["all-digital"].metrics[metric]["mean"], color="k", ls=":", label="all-digital")
        if not zoom and "all-analog" in by:
            ax.axhline(by["all-analog"].metrics[metric]["mean"], color="grey", ls="-.", label="all-analog")
        ax.set_xlabel("digital fraction of routed experts (per layer)")
        ax.set_ylabel(metric)
        ax.set_title(title if not zoom else "dense modules digital (zoom)", fontsize=9)
    values = [r.metrics[metric]["mean"] for r in rows]
    if lower_is_better(metric) and min(values) > 0 and max(values) / min(values) > 5:
        axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


LOWER_IS_BETTER = ("ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
"""Metric names (the part after ``<task>/``) where lower is better: ours and lm-eval's."""


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def shown_metrics(rows: list[SweepRow]) -> list[str]:
    """The metrics of the table and plots: all but lm-eval's standard errors and the routing diagnostics (kept in
    results.json; the diagnostics have their own columns and plot)."""
    return [m for m in rows[0].metrics if not m.endswith("_stderr") and not is_routing_key(m)]


def routing_columns(rows: list[SweepRow]) -> list[str]:
    """The routing diagnostics in the table: top-k agreement and MoE output error, averaged over layers."""
    keep = (PREFIX + "topk_match", PREFIX + "moe_rel_error")
    return [m for m in rows[0].metrics if m.endswith(keep) and (m in keep or m.split("/", 1)[1] in keep)]


def plot_pareto(rows: list[SweepRow], metric: str, path: Path, title: str) -> Path:
    """``metric`` against estimated energy per token, one point per placement, the Pareto front (no other
    placement is both cheaper and better) drawn as a step line and its points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import _save

    pts = [(r, e) for r in rows if (e := _energy(r)) is not None]
    if not pts:
        raise ValueError("plot_pareto needs rows with a cost estimate")
    lower = lower_is_better(metric)
    front = pareto_front([(e, r.metrics[metric]["mean"]) for r, e in pts], lower)
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, g in enumerate(dict.fromkeys(_family(r) for r, _ in pts)):
        sel = [(r, e) for r, e in pts if _family(r) == g]
        ax.errorbar(
            [e * 1e6 for _, e in sel],
            [r.metrics[metric]["mean"] for r, _ in sel],
            yerr=[r.metrics[metric]["std"] for r, _ in sel],
            ls="none",
            marker="o",
            ms=5,
            capsize=2,
            color=f"C{i}",
            label=g,
        )
    fx = [pts[i][1] * 1e6 for i in front]
    fy = [pts[i][0].metrics[metric]["mean"] for i in front]
    ax.step(fx, fy, where="post", color="k", lw=1, alpha=0.6, label="Pareto front")
    lines = []
    for n, i in enumerate(front, 1):  # numbered on the plot, named in a box (labels would overlap)
        r, e = pts[i]
        ax.annotate(
            str(n),
            (e * 1e6, r.metrics[metric]["mean"]),
            fontsize=8,
            fontweight="bold",
            xytext=(3, 3),
            textcoords="offset points",
        )
        lines.append(f"{n}. {r.label}: {e * 1e6:.4g} µJ, {metric} {r.metrics[metric]['mean']:.4g}")
    ax.text(
        1.02,
        1.0,
        "Pareto front\n" + "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=7,
        bbox={"boxstyle": "round", "fc": "white"},
    )
    energies = [e for _, e in pts]
    if max(energies) / min(energies) > 10:
        ax.set_xscale("log")
    if lower and min(fy) > 0 and max(r.metrics[metric]["mean"] for r, _ in pts) / min(fy) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("estimated energy per token (µJ)")
    ax.set_ylabel(metric + (" (lower is better)" if lower else " (higher is better)"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.02, 0.0))
    out = _save(fig, path)
    plt.close(fig)
    return out


def _family(r: SweepRow) -> str:
    if r.peer != "-":
        return f"peer: {r.peer}"
    return r.selector if r.selector != "-" else "reference"


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[int]:
    """Indices of the points ``(cost, value)`` that no other point dominates (cheaper or as cheap and better),
    ordered by cost."""
    sign = 1.0 if lower_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1]))
    front, best = [], float("inf")
    for i in order:
        v = sign * points[i][1]
        if v < best:
            front.append(i)
            best = v
    return front


def sweep_document(rows: list[SweepRow], cfg: AnalogConfig, spec: EvalSpec, meta: dict) -> dict:
    """The ``results.json`` document: ``meta``, the analog config, instances, times and the rows."""
    return {
        **meta,
        "analog": cfg.to_dict(),
        "seeds": spec.seeds,
        "t_inference": spec.times,
        "rows": [asdict(r) for r in rows],
    }


def write_sweep(out_dir: Path, rows: list[SweepRow], cfg: AnalogConfig, spec: EvalSpec, meta: dict) -> list[Path]:
    """``results.json``, ``results.md`` and one PNG per metric, written atomically into ``out_dir``."""
    from ...base.io import atomic_output_dir, strict_json

    with atomic_output_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(strict_json(sweep_document(rows, cfg, spec, meta)) + "\n")
        (tmp / "results.md").write_text(results_markdown(rows, cfg, spec.seeds))
        names = ["results.json", "results.md"]
        for metric in shown_metrics(rows):
            name = f"{metric.replace('/', '_')}.png"
            plot_sweep(
                rows,
                metric,
                tmp / name,
                f"{meta.get('model', {}).get('source', '')}: {metric} under {cfg.preset} x{cfg.noise_scale:g}",
            )
            names.append(name)
        if routing_columns(rows):
            plot_routing(
                {r.label: r.metrics for r in rows},
                tmp / "routing.png",
                f"{meta.get('model', {}).get('source', '')}: routing under {cfg.preset} x{cfg.noise_scale:g}",
            )
            names.append("routing.png")
        if any(split_time_key(m) for m in shown_metrics(rows)):
            plot_against_time(
                {r.label: r.metrics for r in rows},
                tmp / "time.png",
                f"{meta.get('model', {}).get('source', '')} under {cfg.preset} x{cfg.noise_scale:g}",
            )
            names.append("time.png")
        if any(_energy(r) is not None for r in rows):
            metric = shown_metrics(rows)[0]
            plot_pareto(
                rows,
                metric,
                tmp / "pareto.png",
                f"{meta.get('model', {}).get('source', '')}: {metric} vs "
                f"estimated energy under {cfg.preset} x{cfg.noise_scale:g}",
            )
            names.append("pareto.png")
    return [out_dir / n for n in names]
