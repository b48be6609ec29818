"""``hetmoe-compile`` command line: analyze, place. Bad input: one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__
from .errors import HetMoEError
from .placement.policy import SCOPES, PlacementPolicy, parse_override

EXIT_USAGE = 2


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give a fraction in [0, 1], e.g. 0.25") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]; give a fraction of experts, e.g. 0.25")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory or a hub id (owner/name)")
    p.add_argument("--calib", metavar="TEXTFILE", help="calibration text for data-driven selectors")
    p.add_argument("--calib-tokens", type=_positive_int, default=8192, metavar="N",
                   help="at most N calibration tokens, in windows of 256 (default 8192)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random and measured selectors (default 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: as stored)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ...``) and exit code 2, like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hetmoe-compile",
        description="Place the routed experts of an MoE model on digital or analog (AIMC) hardware.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    a = sub.add_parser("analyze", help="score every routed expert; write scores.json, scores.png; print a table")
    _add_model_args(a)
    a.add_argument("--out", required=True, metavar="DIR", help="output directory")
    a.add_argument("--selector", action="append", metavar="NAME",
                   help="selector to run (repeatable); default: all, data-driven ones only with --calib")
    a.add_argument("--digital-fraction", type=_fraction, default=0.25, metavar="F",
                   help="outline the top F experts per layer in the plot (default 0.25)")

    p = sub.add_parser("place", help="place experts by a selector; write placement.json; print a report")
    _add_model_args(p)
    p.add_argument("--digital-fraction", type=_fraction, default=0.25, metavar="F",
                   help="fraction of routed experts on digital (default 0.25)")
    p.add_argument("--selector", default="max-neuron-norm", metavar="NAME", help="default: max-neuron-norm")
    p.add_argument("--scope", choices=SCOPES, default="per-layer",
                   help="per-layer: top ceil(F*E) of each layer (default); global: top F over all layers")
    p.add_argument("--dense", choices=["digital", "analog"], default="digital",
                   help="where dense modules run (default digital; analog is the paper's ablation)")
    p.add_argument("--override", action="append", default=[], metavar="LAYER:EXPERT=DEVICE",
                   help="force one expert's device, e.g. 0:5=digital (repeatable)")
    p.add_argument("--out", required=True, metavar="FILE", help="placement JSON to write")
    p.add_argument("--no-graph", action="store_true", help="skip torch.export and node tagging")
    p.add_argument("--verbose", action="store_true", help="list every graph node with its placement and reason")
    return parser


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HetMoEError(f"--device {name}: CUDA is not available here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise HetMoEError(f"--device {name}: unknown device; use cpu, cuda, cuda:N or auto")
    return name


def _load(args):
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors

    from .calibration import calibration_from_text, read_calibration_text
    from .models import load_model, load_tokenizer, recognize

    text = read_calibration_text(args.calib) if args.calib else None  # fail before loading anything
    device = _device(args.device)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype, device=device)
    info = recognize(model)
    calibration = None
    if text is not None:
        calibration = calibration_from_text(load_tokenizer(args.model), text, max_tokens=args.calib_tokens,
                                            source=args.calib)
    return model, info, calibration


def cmd_analyze(args) -> int:
    from .io import atomic_output_dir
    from .pipeline import analyze_model
    from .placement.placement import model_identity
    from .placement.schema import SCHEMA_VERSION
    from .plots import plot_scores
    from .report import format_table
    from .scoring import check_selectors, selectors

    names = args.selector or [n for n, s in selectors().items() if args.calib or not s.needs_calibration]
    check_selectors(names, bool(args.calib))
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise HetMoEError(f"--out {out_dir}: exists and is not a directory; choose a directory path")
    model, info, calibration = _load(args)
    analysis = analyze_model(model, names, calibration, args.seed, info)
    rho = analysis.spearman()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "producer": f"hetmoe-compile {__version__}",
        "model": model_identity(model, info, args.model),
        "selectors": {n: {"seconds": s.seconds, "summary": selectors()[n].summary} for n, s in analysis.scores.items()},
        "calibration": None if calibration is None else {"source": calibration.source, "tokens": calibration.num_tokens},
        "seed": args.seed,
        "reference": analysis.reference,
        "layers": [
            {
                "index": l.index,
                "module": l.experts,
                "spearman_vs_reference": {n: r[l.index] for n, r in rho.items()},
                "experts": [
                    {"id": e, "scores": {n: s.of(l.index, e) for n, s in analysis.scores.items()}}
                    for e in range(l.num_experts)
                ],
            }
            for l in info.moe_layers
        ],
    }
    with atomic_output_dir(out_dir) as tmp:
        (tmp / "scores.json").write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        plot_scores(analysis.scores, tmp / "scores.png",
                    f"{info.architecture}: expert sensitivity ({args.model})", args.digital_fraction)
    print(f"{info.architecture} ({info.family}): {len(info.moe_layers)} MoE layers x {info.moe_layers[0].num_experts} "
          f"experts, top-{info.moe_layers[0].top_k}")
    print()
    print(format_table(["selector", "seconds"], [[n, f"{s.seconds:.3f}"] for n, s in analysis.scores.items()]))
    k = max(1, math.ceil(args.digital_fraction * info.moe_layers[0].num_experts - 1e-9))
    first = names[0]
    rows = []
    for l in info.moe_layers:
        s = analysis.scores[first].layers[l.index]
        top = sorted(range(l.num_experts), key=lambda e: (-s[e], e))[:k]
        rows.append([l.index, " ".join(map(str, top))] + [f"{rho[n][l.index]:+.2f}" for n in rho])
    print()
    print(format_table(["layer", f"top {k} by {first}"] + [f"rho({n})" for n in rho], rows))
    if rho:
        print(f"(rho: Spearman rank correlation with '{analysis.reference}' per layer)")
    print(f"\nwrote {out_dir / 'scores.json'} and {out_dir / 'scores.png'}")
    return 0


def cmd_place(args) -> int:
    from .pipeline import place_model, tag_graph
    from .report import placement_report
    from .scoring import check_selectors

    check_selectors([args.selector], bool(args.calib))
    overrides = dict(parse_override(o) for o in args.override)
    policy = PlacementPolicy(args.digital_fraction, args.selector, args.scope, args.dense, overrides, args.seed)
    out = Path(args.out)
    if out.is_dir():
        raise HetMoEError(f"--out {out}: is a directory; give a file path such as {out / 'placement.json'}")
    model, info, calibration = _load(args)
    placement = place_model(model, policy, calibration, args.model, info)
    graph = None
    if not args.no_graph:
        graph = tag_graph(model, placement, info).graph_module
    placement.save(out)
    print(placement_report(placement, graph, verbose=args.verbose))
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"analyze": cmd_analyze, "place": cmd_place}[args.command](args)
    except HetMoEError as exc:
        print(f"hetmoe-compile {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
