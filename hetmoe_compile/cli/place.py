"""``hetmoe-compile place``: a placement by a selector (or under a budget) with its cost; ``placement.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..base.errors import HetMoEError
from ..placement.policy import SCOPES, PlacementPolicy, parse_override
from .arguments import _add_load_arg, _add_lowbit_args, _add_model_args, _byte_size, _cost_epilog, _energy, _fraction
from .options import _load, _load_meta, _scores_from_checkpoint


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    p = sub.add_parser(
        "place",
        help="place experts by a selector; write placement.json; print a report",
        epilog=_cost_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    _add_load_arg(p)
    p.add_argument(
        "--digital-fraction",
        type=_fraction,
        default=None,
        metavar="F",
        help="fraction of routed experts on digital (default 0.25; a budget replaces it)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--digital-memory-budget",
        type=_byte_size,
        default=None,
        metavar="BYTES",
        help="digital experts by score per byte while dense modules + digital experts fit BYTES "
        "(e.g. 12000000, 64MiB, 1.5GB)",
    )
    budget.add_argument(
        "--energy-budget",
        type=_energy,
        default=None,
        metavar="J",
        help="digital experts by score per joule while the estimate stays <= J per token (e.g. 2.5e-3)",
    )
    p.add_argument("--cost-config", metavar="FILE", help="cost-model parameters (JSON or TOML; see below)")
    _add_lowbit_args(p, "cost (and budget) the digital experts as group-wise INT4 or INT8, as eval/export run them")
    p.add_argument("--selector", default="max-neuron-norm", metavar="NAME", help="default: max-neuron-norm")
    p.add_argument(
        "--scope",
        choices=SCOPES,
        default="per-layer",
        help="per-layer: top ceil(F*E) of each layer (default); global: top F over all layers",
    )
    p.add_argument(
        "--dense",
        choices=["digital", "analog"],
        default="digital",
        help="where dense modules run (default digital; analog is the paper's ablation)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="LAYER:EXPERT=DEVICE",
        help="force one expert's device, e.g. 0:5=digital (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="placement JSON to write")
    p.add_argument("--no-graph", action="store_true", help="skip torch.export and node tagging")
    p.add_argument("--verbose", action="store_true", help="list every graph node with its placement and reason")


def run(args) -> int:
    from ..compose.api import place
    from ..compose.report import placement_report
    from ..cost import format_cost, load_cost_params
    from ..graph.capture import export_placed

    policy = _policy(args)
    params = load_cost_params(
        args.cost_config, digital_bits=args.digital_bits, group_size=args.group_size if args.digital_bits else None
    )
    out = Path(args.out)
    if out.is_dir():
        raise HetMoEError(f"--out {out}: is a directory; give a file path such as {out / 'placement.json'}")
    scores = None
    if _scores_from_checkpoint(args, [policy.selector]):  # a meta model: scored from the files, never loaded
        model, analysis = _load_meta(args, [policy.selector])
        calibration, scores = None, analysis.scores[policy.selector]
    else:
        model, _, calibration = _load(args)
    placement = place(model, policy, calibration, scores=scores, cost_params=params, source=args.model)
    graph = None if args.no_graph else export_placed(model, placement).graph_module
    placement.save(out)
    print(placement_report(placement, graph, verbose=args.verbose))
    print()
    print(format_cost(placement.cost))
    print(f"\nwrote {out}")
    return 0


def _policy(args) -> PlacementPolicy:
    """The placement flags as a :class:`~hetmoe_compile.PlacementPolicy` (a budget replaces the fraction)."""
    from ..scoring import check_selectors

    check_selectors([args.selector], bool(args.calib))
    overrides: dict[str, str] = {}
    for text in args.override:
        key, device = parse_override(text)
        if key in overrides:
            raise HetMoEError(f"--override {text}: expert {key} is overridden twice; give each expert once")
        overrides[key] = device
    budget = args.digital_memory_budget is not None or args.energy_budget is not None
    if budget and args.digital_fraction is not None:
        raise HetMoEError(
            "--digital-fraction and a budget exclude each other: the budget decides how many experts "
            "go digital; drop --digital-fraction"
        )
    fraction = 0.25 if args.digital_fraction is None else args.digital_fraction
    return PlacementPolicy(
        fraction,
        args.selector,
        args.scope,
        args.dense,
        overrides,
        args.seed,
        args.digital_memory_budget,
        args.energy_budget,
    )
