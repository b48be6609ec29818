"""``hetmoe-compile`` command line: analyze, place. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from ..base.errors import HetMoEError, NoTokenizerError
from ..base.io import check_output_path
from ..base.version import __version__
from ..placement.policy import SCOPES, PlacementPolicy, parse_override
from .interrupts import interrupted, watching_interrupts

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _ArgError(argparse.ArgumentTypeError, HetMoEError):
    """A bad option value: argparse reports it at parse time, other callers get a HetMoEError."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _ArgError(f"'{text}' is not a number; give a fraction in [0, 1], e.g. 0.25") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise _ArgError(f"{value} is outside [0, 1]; give a fraction of experts, e.g. 0.25")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _ArgError(f"'{text}' is not an integer; give a seed >= 0, e.g. 0") from None
    if value < 0:
        raise _ArgError(f"{value} is negative; give a seed >= 0, e.g. 0")
    return value


def _number(minimum: float, strict: bool, example: str):
    """A finite number ``>= minimum`` (``> minimum`` when ``strict``): nan and inf are refused at parse time."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise _ArgError(f"'{text}' is not a number; e.g. {example}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = f"{'>' if strict else '>='} {minimum:g}"
            raise _ArgError(f"{text} is not a finite number {bound}; e.g. {example}")
        return value

    return parse


def _byte_size(text: str) -> int:
    from ..cost.units import parse_bytes

    try:
        return parse_bytes(text, "")
    except HetMoEError as exc:
        raise _ArgError(str(exc)) from None


def _energy(text: str) -> float:
    from ..cost.units import parse_energy

    try:
        return parse_energy(text, "")
    except HetMoEError as exc:
        raise _ArgError(str(exc)) from None


def _presets_epilog() -> str:
    """The noise presets with what they model and their sources, for ``eval --help`` and ``sweep --help``."""
    import textwrap

    from ..base.preset_summaries import PRESET_SUMMARIES

    lines = ["noise presets (--noise):"]
    for name in PRESET_SUMMARIES:
        lines += textwrap.wrap(PRESET_SUMMARIES[name], 110, initial_indent=f"  {name}: ", subsequent_indent="    ")
    return "\n".join(lines)


def _cost_epilog() -> str:
    from ..cost.params import describe_params

    return (
        'cost model (printed after the report, stored as "cost" in placement.json); parameters, their defaults '
        "and sources, each overridable in --cost-config:\n" + describe_params()
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory or a hub id (owner/name)")
    p.add_argument("--calib", metavar="TEXTFILE", help="calibration text for data-driven selectors")
    p.add_argument(
        "--calib-tokens",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="at most N calibration tokens, in windows of 256 (default 8192)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed for the random and measured selectors (default 0)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: as stored)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)")
    p.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="shard the model over devices with accelerate instead of --device: auto, balanced, "
        "sequential, or a JSON object/file of module -> cuda:N|cpu|disk",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SPEC",
        help="with --device-map: memory per device, e.g. 0=20GiB,cpu=64GiB",
    )
    p.add_argument(
        "--offload-folder",
        default=None,
        metavar="DIR",
        help="with --device-map: where layers that fit on no device are offloaded to disk",
    )


def _max_memory(spec: str | None) -> dict | None:
    """``0=20GiB,cpu=64GiB`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (accelerate's max_memory)."""
    if spec is None:
        return None
    out: dict = {}
    for part in spec.split(","):
        key, sep, size = part.partition("=")
        key = key.strip()
        if not sep or not size.strip():
            raise HetMoEError(f"--max-memory {spec}: expected DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=20GiB,cpu=64GiB")
        try:
            _byte_size(size.strip())
        except argparse.ArgumentTypeError as exc:
            raise HetMoEError(f"--max-memory {spec}: {exc}") from exc
        out[int(key) if key.isdigit() else key] = size.strip()
    return out


def _add_load_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--load",
        default="auto",
        choices=["auto", "full", "meta"],
        help="meta: build the model on the meta device and read the data-free selectors' weights from "
        "the safetensors files one expert at a time (checkpoints larger than memory); full: load "
        "the model; auto (default): meta when the selectors and inputs allow it",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prog: error: ...``) and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
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
    e.add_argument("--selector", default="max-neuron-norm", metavar="NAME", help="with --digital-fraction")
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

    x = sub.add_parser("export", help="partitioned ONNX (one file per partition) + manifest.json + tokenizer")
    x.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory or a hub id (owner/name)")
    x.add_argument("--placement", required=True, metavar="FILE", help="a placement.json from 'place'")
    x.add_argument(
        "--noise",
        default="pcm",
        metavar="PRESET",
        help="analog preset recorded in the manifest and used by --instance-seed (default pcm)",
    )
    _add_scale_args(x)
    x.add_argument(
        "--instance-seed",
        type=_seed,
        default=None,
        metavar="N",
        help="also write hardware instance N of every analog partition (programmed, drifted, DAC/ADC)",
    )
    x.add_argument(
        "--monolithic",
        action="store_true",
        help="one ONNX file with every expert inlined (ideal weights): a baseline, no partitions",
    )
    x.add_argument(
        "--kv-cache",
        action="store_true",
        help="partitions take past_key_values.<i>.key/value and return present.<i>.*: 'run' prefills once, then "
        "decodes one token per step",
    )
    x.add_argument(
        "--ort-moe",
        action="store_true",
        help="digital expert groups as ONNX Runtime's com.microsoft::MoE (fused kernel, not standard ONNX)",
    )
    x.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (auto: float32 on CPU)",
    )
    _add_lowbit_args(x)
    x.add_argument("--cost-config", metavar="FILE", help="cost-model parameters (JSON or TOML) for the manifest's cost")
    x.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")

    r = sub.add_parser("run", help="generate text with an export, on ONNX Runtime (no torch needed)")
    r.add_argument("export_dir", metavar="DIR", help="a directory written by 'export'")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="prompt text (needs the tokenizer saved in the export); repeat for a batch (left-padded)",
    )
    what.add_argument("--ids", action="append", metavar="LIST", help="comma-separated prompt token ids; repeatable")
    r.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="default 20")
    r.add_argument("--sample", action="store_true", help="sample the next token (default: greedy)")
    r.add_argument(
        "--temperature", type=_number(0, True, "0.8"), default=None, metavar="T", help="with --sample (default 1)"
    )
    r.add_argument("--top-k", type=_seed, default=None, metavar="K", help="with --sample: the K most likely (0: off)")
    r.add_argument(
        "--top-p",
        type=_number(0, True, "0.9"),
        default=None,
        metavar="P",
        help="with --sample: the most likely tokens up to probability P, in (0, 1] (default 1: off)",
    )
    r.add_argument("--seed", type=_seed, default=None, metavar="S", help="with --sample: seed of the draws (0)")
    r.add_argument(
        "--analog",
        choices=["auto", "ideal", "instance"],
        default="auto",
        help="analog partitions: the programmed instance if exported (auto), or ideal weights",
    )
    r.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="intra-op threads per session (default: cores)"
    )
    r.add_argument(
        "--analog-threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="intra-op threads of the analog partitions (default: --threads); 1 decodes small experts faster",
    )
    return parser


def _add_lowbit_args(
    p: argparse.ArgumentParser,
    bits_help: str | None = None,
    group_help: str = "inputs per quantisation group with --digital-bits (default 128)",
) -> None:
    """``--digital-bits`` (unless ``bits_help`` is empty) and ``--group-size``."""
    if bits_help != "":
        p.add_argument(
            "--digital-bits",
            type=int,
            default=None,
            choices=[4, 8],
            metavar="B",
            help=bits_help or "quantise the digital experts' weights to B bits: 4 or 8 (group-wise, symmetric)",
        )
    p.add_argument("--group-size", type=_positive_int, default=128, metavar="G", help=group_help)


def _print_quantization(record: dict | None) -> None:
    """A summary of what --digital-bits did (the composer's record)."""
    rows = (record or {}).get("experts") or []
    if record is None or not rows:
        return
    from ..base.tables import format_table

    cols = ("gate_up_bound", "gate_up_error", "down_bound", "down_error", "output_error")
    print(
        f"digital experts quantised to INT{record['bits']}, groups of {record['group_size']} "
        f"({len(rows)} experts; relative errors, worst case from the steps vs measured):"
    )
    print(
        format_table(
            ["", *cols],
            [
                [stat] + [f"{fn(r[c] for r in rows):.2e}" for c in cols]
                for stat, fn in (("mean", lambda v: sum(v) / len(rows)), ("max", max))
            ],
        )
    )
    print()


def _add_peer_args(p: argparse.ArgumentParser, what: str) -> None:
    from ..peers.registry import PEERS

    p.add_argument("--peers", default="", metavar="LIST", help=f"comma-separated, from {', '.join(PEERS)}: {what}")
    p.add_argument(
        "--romer-threshold",
        type=_fraction,
        default=0.25,
        metavar="F",
        help="ROMER: analog experts used less than F x the uniform share are replaced (default 0.25)",
    )
    p.add_argument(
        "--hpd-targets",
        default="lm_head,attention_output",
        metavar="LIST",
        help="HPD: projections to split (default lm_head,attention_output)",
    )
    p.add_argument(
        "--hpd-rank",
        type=_number(0, True, "0.5"),
        default=None,
        metavar="R",
        help="HPD: rank kept (an integer, or a fraction of full rank in (0, 1); default full rank)",
    )


def _peer_options(args):
    from ..peers.registry import PeerOptions

    rank = args.hpd_rank
    if rank is not None and rank >= 1:
        if rank != int(rank):
            raise HetMoEError(f"--hpd-rank {rank}: give an integer rank or a fraction in (0, 1)")
        rank = int(rank)
    return PeerOptions(
        group_size=args.group_size,
        hpd_targets=tuple(_list(args.hpd_targets, "hpd-targets")),
        hpd_rank=rank,
        romer_threshold=args.romer_threshold,
        batch_size=args.batch_size,
    )


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    """``--noise-scale`` and ``--t-inference`` (finite, checked at parse time)."""
    p.add_argument(
        "--noise-scale", type=_number(0, False, "2.5"), default=None, metavar="C", help="multiply the weight noise by C"
    )
    p.add_argument(
        "--t-inference",
        type=_times,
        default=None,
        metavar="S[,S...]",
        help="seconds after programming (3600); eval and sweep take a list, e.g. 1,3600,86400,31536000, and report "
        "every metric at every time on the same devices",
    )
    p.add_argument(
        "--w-noise",
        type=_number(0, False, "0.0175"),
        default=None,
        metavar="W",
        help="short-term weight (read) noise drawn at every MVM, aihwkit's w_noise (0; its standard preset 0.0175)",
    )
    p.add_argument(
        "--w-noise-type",
        choices=("pcm-read", "additive"),
        default=None,
        help="pcm-read: std W sqrt(sum |w| x^2), aihwkit's PCM_READ (default); additive: W ||x||",
    )
    p.add_argument(
        "--bound-management",
        choices=("none", "iterative"),
        default=None,
        help="iterative: a tile whose output saturates the ADC is re-run with its input halved until it does not, "
        "per token (aihwkit's ITERATIVE bound management); default none",
    )
    p.add_argument(
        "--drift-compensation",
        choices=("global", "per-column", "none"),
        default=None,
        help="drift compensation: one factor per tile (global, the presets' default; aihwkit's "
        "GlobalDriftCompensation), one per tile output (per-column; its PerColumnDriftCompensation), or none",
    )
    p.add_argument(
        "--ir-drop",
        type=_number(0, False, "1"),
        default=None,
        metavar="S",
        help="scale of aihwkit's input-dependent IR drop along each tile's inputs (0; its standard preset 1)",
    )
    p.add_argument(
        "--noise-management",
        choices=("abs-max", "constant"),
        default=None,
        help="abs-max: each input vector scaled by its abs-max per tile (the presets' default); constant: by a fixed "
        "input range per expert matrix and tile, calibrated on text (standard-hwa's; needs --input-ranges, or "
        "--calib where the command takes it)",
    )
    p.add_argument(
        "--input-ranges",
        metavar="FILE",
        help="input ranges for constant noise management, from 'calibrate-ranges'",
    )


def _times(text: str) -> list[float]:
    """``--t-inference``: one time or a comma-separated list, each a finite number of seconds > 0, none twice."""
    parse = _number(0, True, "3600 or 1,3600,86400")
    times = [parse(t.strip()) for t in text.split(",")]
    if len(set(times)) != len(times):
        raise _ArgError(f"'{text}' lists a time twice")
    return times


def _analog_cfg(args, several_times: bool = True):
    """The preset of ``--noise`` with the scale and physics flags given (at the first ``--t-inference``)."""
    from ..analog.config import analog_config

    times = args.t_inference
    if times is not None and len(times) > 1 and not several_times:
        raise HetMoEError(
            f"--t-inference {','.join(f'{t:g}' for t in times)}: {args.command} programs one instance at one time; "
            "give one value"
        )
    names = ("w_noise", "w_noise_type", "ir_drop", "bound_management", "noise_management")
    extra = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    compensation = getattr(args, "drift_compensation", None)
    if compensation == "none":
        extra["drift_compensation"] = False
    elif compensation is not None:
        extra["drift_compensation_type"] = compensation
    return analog_config(args.noise, args.noise_scale, times[0] if times else None, **extra)


def _add_noise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--noise",
        default="pcm",
        metavar="PRESET",
        help="pcm (default), dac-adc, gaussian, standard-hwa, reram-wan2022, reram-cmo, hermes-pcm or ideal (listed "
        "below)",
    )
    _add_scale_args(p)
    p.add_argument(
        "--seeds", type=_positive_int, default=3, metavar="N", help="hardware instances to average (default 3)"
    )
    p.add_argument("--ppl", metavar="TEXTFILE", help="measure perplexity of this text")
    p.add_argument("--ppl-tokens", type=_positive_int, default=None, metavar="N", help="first N tokens only")
    p.add_argument(
        "--tasks", default="", metavar="LIST", help="comma-separated lm-eval tasks or groups, e.g. piqa,arc_easy,mmlu"
    )
    p.add_argument(
        "--tasks-dir",
        metavar="DIR",
        help="read the tasks from local jsonl files (the layout of ../shared/data/qa) instead of lm-eval's datasets",
    )
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="first N documents per task")
    p.add_argument("--num-fewshot", type=_seed, default=None, metavar="K", help="few-shot examples (task default)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N")
    p.add_argument(
        "--routing-tokens",
        type=_seed,
        default=2048,
        metavar="N",
        help="routing diagnostics against the clean model on the first N tokens of --ppl (top-k and top-1 "
        "agreement, load KL and entropy, MoE output error per layer; default 2048, 0 turns them off)",
    )


def _routing_reference(args, model, info, tokenizer, spec, prepared) -> None:
    """The clean model's routing for the diagnostics, captured before any placement, peer or quantisation."""
    if args.routing_tokens and prepared.text is not None:
        from ..eval.routing_diagnostics import routing_reference

        prepared.routing = routing_reference(
            model, info, tokenizer, prepared.text, args.routing_tokens, spec.batch_size, str(spec.ppl_path)
        )


def _noise_and_spec(args):
    from ..eval.under_noise import EvalSpec, prepare

    cfg = _analog_cfg(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    times = args.t_inference if args.t_inference and len(args.t_inference) > 1 else None
    for t in times or []:  # every time is a valid configuration (a device may have fits at some times only)
        replace(cfg, t_inference=t)
    spec = EvalSpec(
        args.ppl,
        args.ppl_tokens,
        tasks,
        args.tasks_dir,
        args.limit,
        args.seeds,
        args.batch_size,
        args.num_fewshot,
        times,
    )
    return cfg, spec, prepare(spec)


def _list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise HetMoEError(f"--{what}: empty list")
    return items


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

    from ..models import load_model, load_tokenizer, recognize
    from ..models.calibration import calibration_from_text, read_calibration_text

    text = read_calibration_text(args.calib) if args.calib else None  # fail before loading anything
    device = _device(args.device)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise HetMoEError("--max-memory and --offload-folder go with --device-map; add --device-map auto")
        model = load_model(args.model, dtype=dtype, device=device)
    else:
        from ..models.device_map import parse_device_map

        model = load_model(
            args.model,
            dtype=dtype,
            device_map=parse_device_map(args.device_map),
            max_memory=_max_memory(args.max_memory),
            offload_folder=args.offload_folder,
        )
    info = recognize(model)
    calibration = None
    if text is not None:
        calibration = calibration_from_text(
            load_tokenizer(args.model), text, max_tokens=args.calib_tokens, source=args.calib
        )
    return model, info, calibration


def _attach_ranges(args, model, info, cfg, calibration=None) -> dict | None:
    """``--input-ranges`` (else ranges calibrated on ``--calib``) on ``model``, as
    :func:`~..analog.input_ranges.prepare_input_ranges` does; what results record about them."""
    from ..analog.input_ranges import prepare_input_ranges

    return prepare_input_ranges(model, info, cfg, args.input_ranges or None, calibration)


def _routing_record(prepared) -> dict | None:
    """What results say about the routing diagnostics' reference: its tokens and the clean load's entropy."""
    ref = prepared.routing
    if ref is None:
        return None
    return {"tokens": ref.tokens, "clean_load_entropy": {str(k): v for k, v in ref.clean_entropy().items()}}


def cmd_calibrate_ranges(args) -> int:
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


def _scores_from_checkpoint(args, names: list[str]) -> bool:
    """Whether to score without loading (``--load``): data-free selectors, no calibration, a local directory."""
    from ..scoring.checkpoint_scores import CHECKPOINT_SELECTORS

    possible = not args.calib and all(n in CHECKPOINT_SELECTORS for n in names)
    if args.load == "meta" and not possible:
        raise HetMoEError(
            f"--load meta scores {', '.join(CHECKPOINT_SELECTORS)} without calibration text; drop "
            "--calib and data-driven selectors, or use --load full"
        )
    if args.load == "auto":
        path = Path(args.model).expanduser()
        return possible and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
        )
    return args.load == "meta"


def _load_meta(args, names: list[str]):
    """``(meta model, Analysis)``: the selectors' scores read from the checkpoint's files (no model loaded)."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..compose.pipeline import analyze_checkpoint

    hf_logging.disable_progress_bar()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, analysis = analyze_checkpoint(args.model, names, args.seed, dtype)
    return model, analysis


def cmd_analyze(args) -> int:
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


def cmd_place(args) -> int:
    from ..compose.api import place
    from ..compose.report import placement_report
    from ..cost import format_cost, load_cost_params
    from ..graph.capture import tag_graph
    from ..scoring import check_selectors

    check_selectors([args.selector], bool(args.calib))
    overrides = dict(parse_override(o) for o in args.override)
    budget = args.digital_memory_budget is not None or args.energy_budget is not None
    if budget and args.digital_fraction is not None:
        raise HetMoEError(
            "--digital-fraction and a budget exclude each other: the budget decides how many experts "
            "go digital; drop --digital-fraction"
        )
    fraction = 0.25 if args.digital_fraction is None else args.digital_fraction
    policy = PlacementPolicy(
        fraction,
        args.selector,
        args.scope,
        args.dense,
        overrides,
        args.seed,
        args.digital_memory_budget,
        args.energy_budget,
    )
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
    graph = None
    if not args.no_graph:
        graph = tag_graph(model, placement).graph_module
    placement.save(out)
    print(placement_report(placement, graph, verbose=args.verbose))
    print()
    print(format_cost(placement.cost))
    print(f"\nwrote {out}")
    return 0


def _dtype(args):
    import torch

    return args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)


def _ppl_scored(tokenizer, spec, prepared) -> int | None:
    """Tokens the perplexity will score (refusing too short a text before the model loads); None without --ppl."""
    from ..eval.perplexity import scored_tokens

    if prepared.text is None:
        return None
    return scored_tokens(tokenizer, prepared.text, spec.ppl_tokens, str(spec.ppl_path))


def cmd_eval(args) -> int:
    from ..base.tables import format_table
    from ..eval.evaluate import evaluate
    from ..placement import Placement

    placement = Placement.load(args.placement) if args.placement else None
    policy = None
    if placement is None:
        policy = PlacementPolicy(args.digital_fraction, args.selector, dense=args.dense or "digital", seed=args.seed)
    out = Path(args.out)
    if out.is_dir():
        raise HetMoEError(f"--out {out}: is a directory; give a file path such as {out / 'results.json'}")
    result = evaluate(
        args.model,
        placement,
        policy,
        _analog_cfg(args),
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


def _calibration(args):
    """The ``--calib`` text as a :class:`~..models.calibration.Calibration` (tokenised; no model loaded)."""
    if not args.calib:
        return None
    from ..models import load_tokenizer
    from ..models.calibration import calibration_from_text, read_calibration_text

    text = read_calibration_text(args.calib)
    return calibration_from_text(load_tokenizer(args.model), text, max_tokens=args.calib_tokens, source=args.calib)


def _load_options(args):
    """The model flags as the API's :class:`~..models.loader.LoadOptions`, checked as flags first."""
    from transformers.utils import logging as hf_logging

    from ..models.device_map import parse_device_map
    from ..models.loader import LoadOptions

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    device = _device(args.device)
    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise HetMoEError("--max-memory and --offload-folder go with --device-map; add --device-map auto")
        return LoadOptions(_dtype(args), device)
    return LoadOptions(
        _dtype(args), device, parse_device_map(args.device_map), _max_memory(args.max_memory), args.offload_folder
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


def cmd_sweep(args) -> int:
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


def cmd_export(args) -> int:
    from ..base.io import check_replaceable_dir
    from ..compose.api import compile
    from ..cost import format_cost, load_cost_params
    from ..export import ExportOptions
    from ..models import load_model, load_tokenizer
    from ..placement import Placement
    from ..runtime.manifest import MANIFEST_KEYS, MANIFEST_NAME

    cfg = _analog_cfg(args, several_times=False)
    cost_params = load_cost_params(args.cost_config)
    placement = Placement.load(args.placement)
    check_replaceable_dir(Path(args.out), MANIFEST_NAME, MANIFEST_KEYS)
    try:
        tokenizer = load_tokenizer(args.model)  # a corrupt tokenizer file is an error; none at all is not
    except NoTokenizerError:
        tokenizer = None
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype, device="cpu")
    from ..models import recognize

    _attach_ranges(args, model, recognize(model), cfg)
    compiled = compile(
        model,
        None,
        cfg,
        None,
        args.placement,
        placement=placement,
        digital_bits=args.digital_bits,
        group_size=args.group_size,
    )
    _print_quantization(compiled.quantization)
    options = ExportOptions(
        cfg, args.instance_seed, args.monolithic, ort_moe=args.ort_moe, cost=cost_params, kv_cache=args.kv_cache
    )
    manifest = compiled.export(Path(args.out), options, tokenizer)
    doc = json.loads(manifest.read_text())
    rows = [
        [
            p["name"],
            p["device"],
            _size(manifest.parent, p),
            ",".join(f"{k}:{len(v)}" for k, v in p["experts"].items()) or "-",
        ]
        for p in doc["partitions"]
    ]
    from ..base.tables import format_table

    print(format_table(["partition", "device", "size", "layer:experts"], rows))
    print()
    print(format_cost(doc["cost"]))
    if tokenizer is None:
        print("(no tokenizer beside the model: 'run' will need --ids)")
    print(f"\nwrote {manifest} and {len(doc['partitions'])} partitions")
    return 0


def _size(directory: Path, entry: dict) -> str:
    files = [entry["file"]] + [d["file"] for d in entry["external_data"]]
    n = sum((directory / f).stat().st_size for f in files)
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def cmd_run(args) -> int:

    import numpy as np

    from ..runtime import load

    sampling = _sampling(args)
    runner = load(args.export_dir, analog=args.analog, threads=args.threads or 0, analog_threads=args.analog_threads)
    tokenizer = None
    rows: list[list[int]] = []
    if args.prompt is not None:
        tokenizer = runner.tokenizer()
        for text in args.prompt:
            rows.append(tokenizer.encode(text).ids)
            if not rows[-1]:
                raise HetMoEError(f"--prompt {text!r}: the text encodes to no tokens; give some text")
    else:
        for text in args.ids:
            try:
                rows.append([int(t) for t in _list(text, "ids")])
            except ValueError as exc:
                raise HetMoEError(f"--ids {text}: expected comma-separated integers") from exc
    width = max(len(r) for r in rows)
    pad = runner.manifest["model"].get("eos_token_id") or 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)  # left padding
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    start = time.perf_counter()
    out = runner.generate(ids, args.max_new_tokens, attention_mask=mask, sampling=sampling)
    took = time.perf_counter() - start
    for n, (row, tokens) in enumerate(zip(rows, out)):
        tokens = tokens[width - len(row) :].tolist()
        if len(rows) > 1:
            print(f"\n[{n}]" if n else "[0]")
        print(tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)))
    new = out.shape[1] - width
    how = "greedy" if sampling is None else f"sampled, seed {sampling.seed}"
    print(
        f"\n({len(rows)} x {new} new tokens in {took:.2f} s, {how}; analog partitions: {runner.variant}; "
        f"{'KV cache' if runner.cache_inputs else 'no KV cache: every step re-runs the prefix'})",
        file=sys.stderr,
    )
    return 0


def _sampling(args):
    """``--sample`` and its options as a :class:`~hetmoe_compile.runtime.Sampling` (``None``: greedy)."""
    from ..runtime import Sampling

    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    if not args.sample:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise HetMoEError(f"{flags} only apply with --sample; add --sample or drop them")
        return None
    return Sampling(**given)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, printed), --help, --version: an exit code, not an exception
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with watching_interrupts():
        return _dispatch(args)


API_FLAGS = {
    "input_ranges": "--input-ranges",
    "noise_management": "--noise-management",
    "noise_scale": "--noise-scale",
    "t_inference": "--t-inference",
    "w_noise": "--w-noise",
    "w_noise_type": "--w-noise-type",
    "ir_drop": "--ir-drop",
    "bound_management": "--bound-management",
    "routing_tokens": "--routing-tokens",
    "digital_bits": "--digital-bits",
    "group_size": "--group-size",
    "ppl_tokens": "--ppl-tokens",
    "num_fewshot": "--num-fewshot",
    "tasks_dir": "--tasks-dir",
    "instance_seed": "--instance-seed",
    "device_map": "--device-map",
    "max_memory": "--max-memory",
    "offload_folder": "--offload-folder",
    "digital_fraction": "--digital-fraction",
    "ppl_text": "--ppl",
}
"""The Python API's argument names, as the command line spells them: library errors name the argument, and the
CLI shows them as its flags."""
_API_NAME = re.compile(r"(?<![\w.'\"-])(" + "|".join(API_FLAGS) + r")(=(?:'([^']*)'|(\S+)))?(?![\w(])")


def as_flags(message: str) -> str:
    """``message`` with the API's argument names turned into flags where they name an argument: at the start
    (``input_ranges apply ...``), with a value (``noise_management='constant'`` -> ``--noise-management
    constant``) or before a colon (``noise_scale: 2.5 there``); elsewhere a name may mean a record's field."""

    def flag(m: re.Match) -> str:
        value = m.group(3) if m.group(3) is not None else m.group(4)
        if m.start() and value is None and message[m.end() : m.end() + 1] != ":":
            return m.group(0)
        return API_FLAGS[m.group(1)] + ("" if value is None else f" {value}")

    return _API_NAME.sub(flag, message)


INPUT_OPTIONS = ("model", "calib", "placement", "ppl", "input_ranges", "cost_config", "tasks_dir", "device_map")
"""The flags that name files or directories a command reads."""


def _check_inputs_survive(args) -> None:
    """No output of the command may replace one of its inputs (:func:`~..base.io.check_inputs_survive`)."""
    from ..base.io import check_inputs_survive

    inputs = {("MODEL" if k == "model" else "--" + k.replace("_", "-")): getattr(args, k, None) for k in INPUT_OPTIONS}
    out = Path(args.out)
    if args.command in ("export", "sweep"):  # the directory is replaced as a whole, or is the sweep's store
        check_inputs_survive(inputs, directories={"--out": out})
        return
    written = {
        "analyze": [out / "scores.json", out / "scores.png"],
        "eval": [out, out.with_suffix(".routing.png"), out.with_suffix(".time.png")],
    }
    check_inputs_survive(inputs, files={"--out": written.get(args.command, [out])})


def _dispatch(args) -> int:
    try:
        commands = {
            "analyze": cmd_analyze,
            "place": cmd_place,
            "eval": cmd_eval,
            "sweep": cmd_sweep,
            "export": cmd_export,
            "run": cmd_run,
            "calibrate-ranges": cmd_calibrate_ranges,
        }
        if getattr(args, "out", None):
            check_output_path(args.out)  # before the model loads: a bad --out costs no work
            _check_inputs_survive(args)
        return commands[args.command](args)
    except (KeyboardInterrupt, Exception) as exc:
        if interrupted(exc):  # outputs are written atomically: an interrupted run leaves nothing behind
            print(f"hetmoe-compile {args.command}: interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not isinstance(exc, HetMoEError):
            raise
        print(f"hetmoe-compile {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
