"""``hetmoe-compile export``: partitioned ONNX, ``manifest.json`` and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from ..base.errors import NoTokenizerError
from .arguments import _add_lowbit_args, _add_scale_args, _seed
from .options import _analog_cfg, _attach_ranges, _dtype, _print_quantization


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
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


def run(args) -> int:
    from ..base.io import check_replaceable_dir
    from ..cost import load_cost_params
    from ..export import ExportOptions
    from ..models import load_tokenizer
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
    compiled = _compiled(args, cfg, placement)
    _print_quantization(compiled.quantization)
    options = ExportOptions(
        cfg, args.instance_seed, args.monolithic, ort_moe=args.ort_moe, cost=cost_params, kv_cache=args.kv_cache
    )
    _print_export(compiled.export(Path(args.out), options, tokenizer), tokenizer is not None)
    return 0


def _compiled(args, cfg, placement):
    """The model loaded on the CPU, its input ranges attached (constant noise management), placed by
    ``placement``: a :class:`~hetmoe_compile.CompiledMoE` ready to export."""
    from transformers.utils import logging as hf_logging

    from ..compose.api import compile
    from ..models import recognize
    from ..models.loader import LoadOptions

    hf_logging.disable_progress_bar()  # keep stderr for our bars and one-line errors
    model = LoadOptions(_dtype(args), "cpu").load(args.model)
    _attach_ranges(args, model, recognize(model), cfg)
    return compile(
        model,
        None,
        cfg,
        None,
        args.placement,
        placement=placement,
        digital_bits=args.digital_bits,
        group_size=args.group_size,
    )


def _print_export(manifest: Path, has_tokenizer: bool) -> None:
    from ..base.tables import format_table
    from ..cost import format_cost

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
    print(format_table(["partition", "device", "size", "layer:experts"], rows))
    print()
    print(format_cost(doc["cost"]))
    if not has_tokenizer:
        print("(no tokenizer beside the model: 'run' will need --ids)")
    print(f"\nwrote {manifest} and {len(doc['partitions'])} partitions")


def _size(directory: Path, entry: dict) -> str:
    files = [entry["file"]] + [d["file"] for d in entry["external_data"]]
    n = sum((directory / f).stat().st_size for f in files)
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
