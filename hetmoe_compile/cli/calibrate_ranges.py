"""``hetmoe-compile calibrate-ranges``: input ranges for constant noise management."""

from __future__ import annotations

from ..base.errors import HetMoEError
from .arguments import _add_model_args, _number, _positive_int
from .options import _load


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    c = sub.add_parser(
        "calibrate-ranges",
        help="input ranges of every expert matrix's tiles on calibration text (constant noise management)",
    )
    _add_model_args(c)
    c.add_argument(
        "--quantile",
        type=_number(0, True, "0.99995"),
        default=None,
        metavar="Q",
        help="quantile of |x| per tile (default 0.99995, aihwkit's calibrate_input_ranges)",
    )
    c.add_argument(
        "--tile-size", type=_positive_int, default=512, metavar="N", help="tile inputs, as the analog preset's (512)"
    )
    c.add_argument("--out", required=True, metavar="FILE", help="input-ranges JSON to write")


def run(args) -> int:
    from ..analog.input_ranges import DEFAULT_QUANTILE, calibrate_input_ranges
    from ..transforms.canonicalize import canonicalize

    if not args.calib:
        raise HetMoEError("calibrate-ranges needs calibration text: add --calib TEXTFILE")
    quantile = DEFAULT_QUANTILE if args.quantile is None else args.quantile
    if not 0.5 <= quantile <= 1.0:
        raise HetMoEError(f"--quantile {quantile}: give a quantile in [0.5, 1] (aihwkit's default {DEFAULT_QUANTILE})")
    model, info, calibration = _load(args)
    canonicalize(model, None, info)
    ranges = calibrate_input_ranges(model, info, calibration, args.tile_size, quantile, source=args.model)
    ranges.save(args.out)
    rows = []
    for layer, lr in sorted(ranges.layers.items()):
        rows.append(
            [
                layer,
                f"{float(lr.gate_up.min()):.3g}..{float(lr.gate_up.max()):.3g}",
                f"{float(lr.down.min()):.3g}..{float(lr.down.max()):.3g}",
                f"{min(lr.rows)}..{max(lr.rows)}",
                ",".join(map(str, lr.all_tokens)) or "-",
            ]
        )
    from ..base.tables import format_table

    print(
        format_table(
            ["layer", "gate_up ranges", "down ranges", "routed rows per expert", "on all tokens (few routed)"], rows
        )
    )
    print(f"\nwrote {args.out} (quantile {quantile:g} of |x| over {calibration.num_tokens} tokens)")
    return 0
