"""``hetmoe-compile eval``: a placement under simulated AIMC noise; ``results.json`` and its plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..base.errors import HetMoEError
from ..placement.policy import PlacementPolicy
from .arguments import _add_lowbit_args, _add_model_args, _add_noise_args, _add_peer_args, _fraction, _presets_epilog
from .options import _analog_cfg, _calibration, _list, _load_options, _peer_options, _print_quantization


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    e = sub.add_parser(
        "eval",
        help="perplexity / task accuracy of a placement under simulated AIMC noise",
        epilog=_presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(e)
    how = e.add_mutually_exclusive_group(required=True)
    how.add_argument("--placement", metavar="FILE", help="a placement.json from 'place'")
    how.add_argument("--digital-fraction", type=_fraction, metavar="F", help="place on the fly with --selector")
    e.add_argument("--selector", default=None, metavar="NAME", help="with --digital-fraction (default max-neuron-norm)")
    e.add_argument(
        "--dense",
        choices=["digital", "analog"],
        default=None,
        help="dense modules (default: the placement's, else digital)",
    )
    _add_lowbit_args(e)
    _add_peer_args(e, "apply these peers (in order: low-bit, hpd, romer) before evaluating")
    _add_noise_args(e)
    e.add_argument("--out", required=True, metavar="FILE", help="results JSON to write")


def run(args) -> int:
    from ..base.tables import format_table
    from ..eval.evaluate import evaluate

    out = Path(args.out)
    if out.is_dir():
        raise HetMoEError(f"--out {out}: is a directory; give a file path such as {out / 'results.json'}")
    result = evaluate(args.model, **_evaluate_arguments(args))
    _print_quantization(result.record["digital_quantization"])
    result.save(out)
    shown = {k: v for k, v in result.metrics.items() if "routing/L" not in k}  # per layer: results.json, the plot
    print(
        format_table(
            ["metric", "mean", "std", "seeds"],
            [[k, f"{v['mean']:.4f}", f"{v['std']:.4f}", len(v["values"])] for k, v in shown.items()],
        )
    )
    print(f"\nwrote {out}")
    for plot in result.plots(out):
        print(f"wrote {plot}")
    return 0


def _evaluate_arguments(args) -> dict:
    """The flags as :func:`hetmoe_compile.evaluate`'s arguments."""
    from ..placement import Placement

    if args.placement and args.selector is not None:
        raise HetMoEError("--selector places with --digital-fraction; --placement is placed already: drop one")
    placement = Placement.load(args.placement) if args.placement else None
    policy = None
    if placement is None:
        selector = args.selector or "max-neuron-norm"
        policy = PlacementPolicy(args.digital_fraction, selector, dense=args.dense or "digital", seed=args.seed)
    return dict(
        placement=placement,
        policy=policy,
        analog=_analog_cfg(args),
        calibration=_calibration(args),
        ppl_text=args.ppl,
        ppl_tokens=args.ppl_tokens,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        tasks_dir=args.tasks_dir,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        seeds=args.seeds,
        batch_size=args.batch_size,
        times=args.t_inference,
        routing_tokens=args.routing_tokens,
        input_ranges=args.input_ranges or None,
        dense=args.dense,
        digital_bits=args.digital_bits,
        group_size=args.group_size,
        peers=_list(args.peers, "peers") if args.peers.strip() else [],
        peer_options=_peer_options(args),
        seed=args.seed,
        source=args.placement or args.model,
        load=_load_options(args),
    )
