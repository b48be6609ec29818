"""The parsed flags turned into the Python API's arguments (analog config, peers, loading, calibration)."""

from __future__ import annotations

import argparse

from ..base.errors import HetMoEError
from .arguments import _byte_size


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


def _scores_from_checkpoint(args, names: list[str]) -> bool:
    """Whether to score without loading (``--load``), as :func:`~..compose.api.scores_from_files` decides; device
    flags place a loaded model, so with them ``auto`` loads it (and ``meta`` is refused)."""
    from ..compose.api import scores_from_files

    placing = [
        f
        for f, v in (
            ("--device", args.device != "auto"),
            ("--device-map", args.device_map is not None),
            ("--max-memory", args.max_memory is not None),
            ("--offload-folder", args.offload_folder is not None),
        )
        if v
    ]
    if args.load == "meta" and placing:
        raise HetMoEError(f"{', '.join(placing)} place a loaded model; --load meta loads none: drop one of them")
    if args.load == "auto" and placing:  # they say where the model goes: load it there (full), never ignore them
        return False
    return scores_from_files(args.model, names, bool(args.calib), args.load)


def _load_meta(args, names: list[str]):
    """``(meta model, Analysis)``: the selectors' scores read from the checkpoint's files (no model loaded)."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..compose.pipeline import analyze_checkpoint

    hf_logging.disable_progress_bar()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, analysis = analyze_checkpoint(args.model, names, args.seed, dtype)
    return model, analysis


def _dtype(args):
    import torch

    return args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)


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


FEATURE_DEFAULTS = {"seed": 0, "group_size": 128, "romer_threshold": 0.25, "hpd_targets": "lm_head,attention_output"}
"""Flags whose value matters only with a feature on: ``None`` after parsing means not given."""
DRAWING_SELECTORS = ("random", "measured")
"""The selectors whose scores depend on ``--seed``."""


def refuse_unused(args) -> None:
    """An option whose feature is off is refused, not ignored (``--hpd-rank`` without the hpd peer, ``--group-size``
    without low-bit experts, ``--seed`` where nothing is drawn); then the defaults of those not given are filled.
    ``run``'s ``--seed`` is its sampling's, checked by the command."""
    if args.command == "run":
        return
    peers = set(_list(args.peers, "peers")) if getattr(args, "peers", "").strip() else set()
    lowbit = getattr(args, "digital_bits", None) is not None or bool({"int8", "int4"} & peers)
    unused = []
    if getattr(args, "group_size", None) is not None and not lowbit:
        unused.append(("--group-size", "--digital-bits 8|4 (or the int8/int4 peers)"))
    for flag, name in (("--hpd-rank", "hpd_rank"), ("--hpd-targets", "hpd_targets")):
        if getattr(args, name, None) is not None and "hpd" not in peers:
            unused.append((flag, "--peers hpd"))
    if getattr(args, "romer_threshold", None) is not None and not any(p.startswith("romer") for p in peers):
        unused.append(("--romer-threshold", "a ROMER peer (--peers romer)"))
    if getattr(args, "seed", None) is not None and not _draws(args, lowbit, peers):
        unused.append(("--seed", "a random or measured selector (or low-bit experts)"))
    if unused:
        flag, feature = unused[0]
        raise HetMoEError(f"{flag} has no effect here: it goes with {feature}; add that or drop {flag}")
    for name, value in FEATURE_DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)


def _draws(args, lowbit: bool, peers: set) -> bool:
    """Whether ``--seed`` changes anything in this command."""
    if args.command == "calibrate-ranges":
        return False
    if args.command == "analyze":
        return not args.selector or any(s in DRAWING_SELECTORS for s in args.selector)
    if args.command == "place":
        return args.selector in DRAWING_SELECTORS
    if args.command == "sweep":
        return lowbit or any(s.strip() in DRAWING_SELECTORS for s in args.selectors.split(","))
    if args.command == "eval":
        return lowbit or bool(peers) or (args.placement is None and (args.selector or "") in DRAWING_SELECTORS)
    return True
