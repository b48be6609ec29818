"""``hetmoe-compile sweep``: fractions x selectors (x peers), resumable, on workers or Ray."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..placement.policy import SCOPES
from .arguments import (
    EXIT_INTERRUPTED,
    _add_lowbit_args,
    _add_model_args,
    _add_noise_args,
    _add_peer_args,
    _fraction,
    _positive_int,
    _presets_epilog,
)
from .interrupts import interrupted
from .options import _analog_cfg, _list, _load_options, _peer_options


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    w = sub.add_parser(
        "sweep",
        help="evaluate fractions x selectors; write results.json, results.md and plots",
        epilog=_presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(w)
    w.add_argument("--fractions", default="0,0.125,0.25,0.5,1", metavar="LIST", help="digital fractions")
    w.add_argument(
        "--selectors",
        default="max-neuron-norm,router-norm,random",
        metavar="LIST",
        help="comma-separated selectors (data-driven ones need --calib)",
    )
    w.add_argument("--no-ablation", action="store_true", help="skip the dense-modules-on-analog ablation rows")
    w.add_argument(
        "--scope",
        choices=SCOPES,
        default="per-layer",
        help="per-layer: each fraction of every layer's experts (default); global: of all experts, by score",
    )
    _add_peer_args(w, "add rows for each peer alone and with the first selector's fractions")
    _add_lowbit_args(w, "", "inputs per quantisation group for the int8/int4 peers (default 128)")
    w.add_argument("--cost-config", metavar="FILE", help="cost-model parameters (JSON or TOML) for the energy column")
    _add_noise_args(w)
    w.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run the jobs on N worker processes, each with its own model copy (on a CUDA machine, worker i on GPU "
        "i mod the GPU count; on a CPU, the cores shared out); default 1: in this process",
    )
    w.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the workers as Ray actors on the cluster at ADDRESS (host:port, ray://..., auto), or on a local "
        "Ray instance when no address is given; --workers sets the number of actors (default: one per GPU of the "
        "cluster, else one per 2 CPUs)",
    )
    w.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory; each finished job is kept there, so rerunning the same command resumes",
    )


def sweep_config(args):
    """The ``sweep`` flags as the API's :class:`~..eval.sweep.config.SweepConfig`."""
    from ..cost import load_cost_params
    from ..eval.sweep.config import SweepConfig

    return SweepConfig(
        args.model,
        tuple(_fraction(f) for f in _list(args.fractions, "fractions")),
        tuple(_list(args.selectors, "selectors")),
        _analog_cfg(args),
        ablation=not args.no_ablation,
        scope=args.scope,
        peers=tuple(_list(args.peers, "peers")) if args.peers.strip() else (),
        peer_options=_peer_options(args),
        calibration_text=args.calib,
        calibration_tokens=args.calib_tokens,
        ppl_text=args.ppl,
        ppl_tokens=args.ppl_tokens,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        tasks_dir=args.tasks_dir,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        seeds=args.seeds,
        batch_size=args.batch_size,
        times=tuple(args.t_inference) if args.t_inference else None,
        routing_tokens=args.routing_tokens,
        input_ranges=args.input_ranges,
        cost_params=load_cost_params(args.cost_config),
        seed=args.seed,
        load=_load_options(args),
    )


def run(args) -> int:
    from ..eval.sweep.run import sweep

    out = Path(args.out)
    try:
        result = sweep(sweep_config(args), out, workers=args.workers, ray=args.ray)
    except (KeyboardInterrupt, Exception) as exc:
        if not interrupted(exc):
            raise
        print(
            f"hetmoe-compile sweep: interrupted; the finished jobs are kept in {out / 'units'}: rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if result.resumed:
        print(f"sweep: {result.resumed} of {result.resumed + result.ran} jobs were finished by an earlier run")
    print(result.table())
    print("wrote " + ", ".join(str(p) for p in result.files))
    return 0
