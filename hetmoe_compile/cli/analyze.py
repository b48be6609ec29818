"""``hetmoe-compile analyze``: every selector's scores; ``scores.json``, ``scores.png`` and a table."""

from __future__ import annotations

from pathlib import Path

from ..base.errors import HetMoEError
from .arguments import _add_load_arg, _add_model_args, _fraction
from .options import _dtype, _load, _scores_from_checkpoint


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    a = sub.add_parser("analyze", help="score every routed expert; write scores.json, scores.png; print a table")
    _add_model_args(a)
    a.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_load_arg(a)
    a.add_argument(
        "--selector",
        action="append",
        metavar="NAME",
        help="selector to run (repeatable); default: all, data-driven ones only with --calib",
    )
    a.add_argument(
        "--digital-fraction",
        type=_fraction,
        default=0.25,
        metavar="F",
        help="outline the top F experts per layer in the plot (default 0.25)",
    )


def run(args) -> int:
    from ..base.io import atomic_output_dir
    from ..base.tables import format_table
    from ..compose.api import analyze
    from ..scoring import check_selectors, selectors

    names = args.selector or [n for n, s in selectors().items() if args.calib or not s.needs_calibration]
    check_selectors(names, bool(args.calib))
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HetMoEError(f"--out {out_dir}: exists and is not a directory; choose a directory path")
    if _scores_from_checkpoint(args, names):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
        model, calibration = args.model, None
    else:
        model, _, calibration = _load(args)
    analysis = analyze(model, names, calibration, args.seed, source=args.model, load=args.load, dtype=_dtype(args))
    with atomic_output_dir(out_dir) as tmp:
        analysis.save(tmp / "scores.json")
        analysis.plot(tmp / "scores.png", args.digital_fraction)
    info, cal = analysis.info, analysis.calibration
    print(
        f"{info.architecture} ({info.family}): {len(info.moe_layers)} MoE layers x {info.moe_layers[0].num_experts} "
        f"experts, top-{info.moe_layers[0].top_k}"
    )
    print()
    doc = analysis.to_dict()["selectors"]
    timing = [[n, f"{s['seconds']:.3f}", s["calibration_tokens"] or "-"] for n, s in doc.items()]
    if cal is not None and cal["forward_seconds"] is not None:
        timing.append(["(calibration forward, shared)", f"{cal['forward_seconds']:.3f}", cal["tokens"]])
    print(format_table(["selector", "seconds", "calibration tokens"], timing))
    print()
    print(analysis.table(args.digital_fraction))
    print(f"\nwrote {out_dir / 'scores.json'} and {out_dir / 'scores.png'}")
    return 0
