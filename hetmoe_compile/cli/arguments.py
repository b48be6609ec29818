"""Argument declarations and value parsers shared by the commands: one line and exit code 2 for a bad value, at parse
time."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from ..base.errors import HetMoEError

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


def _count(text: str) -> int:
    """An integer >= 0 that counts something (tokens, examples, candidates; 0 means none or off)."""
    try:
        value = int(text)
    except ValueError:
        raise _ArgError(f"'{text}' is not an integer; give a count >= 0, e.g. 0") from None
    if value < 0:
        raise _ArgError(f"{value} is negative; give a count >= 0 (0: off)")
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
    p.add_argument("--seed", type=_seed, default=None, help="seed for the random and measured selectors (default 0)")
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
    p.add_argument("--group-size", type=_positive_int, default=None, metavar="G", help=group_help)


def _add_peer_args(p: argparse.ArgumentParser, what: str) -> None:
    from ..peers.registry import PEERS

    p.add_argument("--peers", default="", metavar="LIST", help=f"comma-separated, from {', '.join(PEERS)}: {what}")
    p.add_argument(
        "--romer-threshold",
        type=_fraction,
        default=None,
        metavar="F",
        help="ROMER: analog experts used less than F x the uniform share are replaced (default 0.25)",
    )
    p.add_argument(
        "--hpd-targets",
        default=None,
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
    p.add_argument("--num-fewshot", type=_count, default=None, metavar="K", help="few-shot examples (task default)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N")
    p.add_argument(
        "--routing-tokens",
        type=_count,
        default=2048,
        metavar="N",
        help="routing diagnostics against the clean model on the first N tokens of --ppl (top-k and top-1 "
        "agreement, load KL and entropy, MoE output error per layer; default 2048, 0 turns them off)",
    )
