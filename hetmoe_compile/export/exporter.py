"""Ahead-of-time export: a placed model -> one ONNX file per partition + ``manifest.json`` (+ its tokenizer).

Steps: canonicalise and ``torch.export`` with placement tags (:func:`~hetmoe_compile.graph.capture.export_placed`),
translate to an ONNX graph with expert-group placeholders (:mod:`.onnx_capture`), partition (:mod:`.partition`),
write and check each partition (:mod:`.writer`), then the manifest (:mod:`.manifest`). Everything is written into a
temporary sibling of the output directory and moved into place only when all of it succeeded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from ..analog.config import AnalogConfig
from ..analog.input_ranges import NO_RANGES, InputRanges, attach_input_ranges, attached_input_ranges
from ..analog.instance import output_noise_seed, program_group
from ..analog.simulate import restore_digital
from ..analog.tiles import split_sizes
from ..base.errors import HetMoEError, check_seed
from ..base.io import atomic_replace_dir, check_inputs_survive, check_replaceable_dir
from ..base.version import PRODUCER
from ..cost import CostParams
from ..graph.capture import ROOT_PREFIX, export_placed
from ..ir.expert_group import ExpertGroup, HetExperts
from ..models.device_map import require_resident
from ..models.recognize import recognize
from ..placement.placement import Placement
from ..runtime.manifest import MANIFEST_KEYS, partition_identity
from .expert_group_onnx import MOE_DOMAIN, ProgrammedExpert, TilePeriphery
from .genai_config import GENAI_CONFIG, GenAIUnsupported, genai_config
from .graph_builder import Deferred
from .manifest import MANIFEST_NAME, build_manifest, write_manifest
from .onnx_capture import OPSET, to_onnx
from .partition import GroupNode, analog_partition, find_groups, partition_graph, value_types
from .tensor_store import TensorStore
from .writer import EXTERNAL_DATA_THRESHOLD, write_partition


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_onnx` writes besides the ideal partitions."""

    analog: AnalogConfig | None = None  # recorded in the manifest; needed for an instance variant
    instance_seed: int | None = None  # also write one programmed hardware instance of every analog partition
    monolithic: bool = False  # one ONNX file, every group inlined with ideal weights (a baseline)
    ort_moe: bool = False  # digital expert groups as ONNX Runtime's com.microsoft::MoE (fused kernel)
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    progress: bool = True
    cost: CostParams | None = None  # cost-model parameters for the manifest's "cost" (default: CostParams())
    kv_cache: bool = False  # digital partitions take past_key_values.<i>.* and return present.<i>.* (decoding)


def export_onnx(
    model: nn.Module,
    placement: Placement,
    out_dir: str | Path,
    options: ExportOptions = ExportOptions(),
    tokenizer=None,
) -> Path:
    """Export ``model`` placed by ``placement`` to ``out_dir``; returns the manifest's path.

    ``model`` is canonicalised in place (see :func:`~hetmoe_compile.transforms.canonicalize.canonicalize`). The
    steps: :func:`check_exportable`, ``torch.export`` with placement tags, :func:`to_onnx`, partitioning,
    :func:`_write_partitions` (and their programmed instances), then the manifest (:func:`_write_manifest`); all
    into a temporary sibling of ``out_dir`` that replaces it only when every step succeeded."""
    cfg, ranges, lowbit = check_exportable(model, placement, options)
    info = recognize(model)
    cost = export_cost(model, info, placement, options, cfg)
    out_dir = Path(out_dir)
    check_replaceable_dir(out_dir, MANIFEST_NAME, MANIFEST_KEYS, option="out_dir")
    source = str(getattr(model, "name_or_path", "") or "")
    check_inputs_survive({"the model's directory": source}, directories={"out_dir": out_dir})
    dtype = np.dtype(str(next(model.parameters()).dtype).removeprefix("torch."))
    steps = tqdm(total=3, desc="export", unit="step", disable=not options.progress)
    try:
        steps.set_postfix_str("torch.export")
        ep = export_placed(model, placement, info, kv_cache=options.kv_cache)
        steps.update()
        _remove_old_scratch()
        with atomic_replace_dir(out_dir, MANIFEST_NAME, MANIFEST_KEYS) as tmp, _scratch_in(tmp) as scratch:
            steps.set_postfix_str("ONNX translation")
            captured = to_onnx(ep, Path(scratch), info.num_layers if options.kv_cache else 0)
            del ep
            steps.update()
            store = TensorStore(captured.model, captured.directory)
            groups = find_groups(captured.model, store, _group_names(info))
            steps.set_postfix_str("partitioning")
            parts = partition_graph(
                captured.model, store, groups, dtype, ROOT_PREFIX, options.monolithic, options.ort_moe, lowbit
            )
            steps.update()
            written = _Written(model, info, captured, store, groups, dtype, cfg, ranges, options, tmp)
            files, variants = _write_partitions(written, parts, _opsets(captured.model, options, lowbit), steps)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            _write_manifest(written, placement, parts, files, variants, tokenizer is not None, lowbit, cost)
    finally:
        steps.close()
    return out_dir / MANIFEST_NAME


def check_exportable(
    model: nn.Module, placement: Placement, options: ExportOptions
) -> tuple[AnalogConfig, InputRanges | None, dict]:
    """Refuse, before any work, what cannot be exported (split HPD projections, offloaded weights, dense modules
    on analog, instance options that program nothing, constant noise management without input ranges, low-bit
    experts with ``ort_moe``); the analog config, the model's input ranges and its low-bit layers. Leaves the
    model digital (a simulated model's instances are re-made from the ideal weights)."""
    from ..transforms.hpd import require_unsplit

    require_unsplit(model, "ONNX export")
    require_resident(model, "ONNX export")
    restore_digital(model)  # a simulated model's analog weight storage holds programmed tiles; instances are re-made
    if placement.policy.dense != "digital":
        raise HetMoEError(
            "export keeps dense modules digital; the dense-on-analog ablation is simulation-only "
            "(place with --dense digital)"
        )
    if options.instance_seed is not None:
        check_seed(options.instance_seed, "instance_seed")
    if options.instance_seed is not None and options.monolithic:
        raise HetMoEError("a monolithic export has no analog partitions to program; drop --instance-seed")
    cfg = options.analog or AnalogConfig()
    if options.instance_seed is not None and cfg.gaussian_sigma == 0 and cfg.is_ideal:
        raise HetMoEError("--instance-seed with the 'ideal' preset programs nothing; choose pcm, dac-adc or gaussian")
    info = recognize(model)
    ranges = attached_input_ranges(model) if cfg.noise_management == "constant" else None
    if cfg.noise_management == "constant":
        if ranges is None:
            raise HetMoEError(NO_RANGES)
        attach_input_ranges(model, ranges, info)  # checked against the model before any work
        ranges.check_tile_size(cfg.tile_size)
    lowbit = _lowbit_layers(model, info)
    if lowbit and options.ort_moe:
        raise HetMoEError("low-bit digital experts are exported as MatMulNBits; drop --ort-moe")
    return cfg, ranges, lowbit


def _group_names(info) -> dict[str, tuple[int, str]]:
    """Each expert group's ``gate_up`` initializer name in the captured graph -> ``(layer, device)``."""
    return {
        f"{ROOT_PREFIX}{l.experts}.groups.{d}.gate_up": (l.index, d)
        for l in info.moe_layers
        for d in ("digital", "analog")
    }


def _opsets(graph, options: ExportOptions, lowbit: dict) -> list:
    """The partitions' opsets: the graph's, without our placeholder domain, plus ``com.microsoft`` where used."""
    opsets = [o for o in graph.opset_import if o.domain not in ("hetmoe", MOE_DOMAIN)]
    if options.ort_moe or lowbit:
        opsets.append(onnx.helper.make_opsetid(MOE_DOMAIN, 1))
    return opsets


@dataclass
class _Written:
    """What the writing steps share: the placed model, the captured graph and its tensors, the expert groups found
    in it, the weights' dtype, the analog settings and the temporary output directory."""

    model: nn.Module
    info: Any
    captured: Any
    store: TensorStore
    groups: list
    dtype: np.dtype
    cfg: AnalogConfig
    ranges: InputRanges | None
    options: ExportOptions
    directory: Path


def _write_partitions(w: _Written, parts: list, opsets: list, steps) -> tuple[dict, dict]:
    """Write every partition, and with ``instance_seed`` each analog partition's programmed instance; returns the
    files of each (``{name: [files]}``, ideal and instance variants)."""
    options = w.options
    instances = options.instance_seed is not None
    steps.total += sum(1 + (instances and p.device == "analog") for p in parts)
    steps.refresh()
    files: dict[str, list[Path]] = {}
    variants: dict[str, list[Path]] = {}
    by_layer = {g.layer: g for g in w.groups if g.device == "analog"}
    types = value_types(w.captured.model)
    threshold = options.external_data_threshold
    for part in parts:
        steps.set_postfix_str(f"writing {part.name}")
        identity = partition_identity(part.name, part.device, part.layer, part.expert_ids)
        files[part.name] = write_partition(
            part, w.directory, f"{part.name}.onnx", opsets, PRODUCER, threshold, _doc(part), identity
        )
        steps.update()
        if part.device == "analog" and options.instance_seed is not None:  # i.e. `instances`
            assert part.layer is not None  # an analog partition is one layer's group
            steps.set_postfix_str(f"programming and writing {part.name}.instance")
            group = by_layer[part.layer]
            programmed, periphery = program_instance(w.model, w.info, group, w.cfg, options.instance_seed, w.ranges)
            inst = analog_partition(group, w.store, w.dtype, types, programmed, periphery, ROOT_PREFIX)
            identity = partition_identity(
                part.name, part.device, part.layer, part.expert_ids, "instance", options.instance_seed
            )
            variants[part.name] = write_partition(
                inst, w.directory, f"{inst.name}.onnx", opsets, PRODUCER, threshold, _doc(inst), identity
            )
            del programmed, inst
            steps.update()
    return files, variants


def _write_manifest(
    w: _Written,
    placement: Placement,
    parts: list,
    files: dict,
    variants: dict,
    has_tokenizer: bool,
    lowbit: dict,
    cost: dict,
) -> None:
    """``manifest.json`` (with the input ranges and, with a KV cache, ``genai_config.json``) from what was written."""
    options = w.options
    manifest = build_manifest(
        placement=placement,
        cfg=w.cfg,
        instance_seed=options.instance_seed,
        parts=parts,
        files=files,
        variants=variants,
        directory=w.directory,
        graph=w.captured.model,
        opset=OPSET,
        producer=PRODUCER,
        has_tokenizer=has_tokenizer,
        monolithic=options.monolithic,
        extra_model=_generation_ids(w.model),
        contrib_ops=_contrib_ops(options.ort_moe, lowbit),
        cost=cost,
    )
    if w.ranges is not None:
        manifest["analog"]["input_ranges"] = w.ranges.to_dict()
    if options.kv_cache:
        manifest["genai_config"] = _write_genai_config(manifest, w.model, w.directory)
    write_manifest(manifest, w.directory / MANIFEST_NAME)


def _write_genai_config(manifest: dict, model: nn.Module, directory: Path) -> dict:
    """Write ``genai_config.json`` for the variant ``runtime.load`` runs by default; the manifest's record of it
    (``file`` null and a ``reason`` where ONNX Runtime GenAI cannot run the export)."""
    variant = "instance" if manifest["analog"]["instance_seed"] is not None else "ideal"
    try:
        doc = genai_config(manifest, cast(Any, model).config, variant)
    except GenAIUnsupported as exc:
        return {"file": None, "analog": variant, "reason": str(exc)}
    (directory / GENAI_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return {"file": GENAI_CONFIG, "analog": variant}


def export_cost(model: nn.Module, info, placement: Placement, options: ExportOptions, cfg: AnalogConfig) -> dict:
    """The cost estimate of what is exported: the placement's experts (all digital for a monolithic export), low-bit
    digital experts at their bits, the analog config's tile size unless the cost parameters set one."""
    from ..cost.estimate import estimate_cost

    params = (options.cost or CostParams()).for_tiles(cfg.tile_size)
    extra = {"export": "monolithic: every expert runs digitally"} if options.monolithic else None
    return estimate_cost(model, placement, params, info=info, all_digital=options.monolithic, extra=extra).to_dict()


def _lowbit_layers(model: nn.Module, info) -> dict[int, tuple[int, int]]:
    """Layer -> ``(bits, group_size)`` of digital expert groups quantised by ``quantize_digital_experts``."""
    from ..transforms.lowbit import QUANT_ATTR

    out = {}
    for layer in info.moe_layers:
        groups = getattr(model.get_submodule(layer.experts), "groups", {})
        quant = getattr(groups["digital"], QUANT_ATTR, None) if "digital" in groups else None
        if quant:
            out[layer.index] = (quant["bits"], quant["group_size"])
    return out


def _contrib_ops(ort_moe: bool, lowbit: dict) -> list[str]:
    return (["com.microsoft.MoE"] if ort_moe else []) + (["com.microsoft.MatMulNBits"] if lowbit else [])


def _generation_ids(model: nn.Module) -> dict:
    """What the runtime checks and generates with: vocabulary size, end-of-text id, context length."""
    cfg = cast(Any, model).config  # a Hugging Face config
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    out = {"vocab_size": int(cfg.vocab_size), "eos_token_id": None if eos is None else int(eos)}
    context = getattr(cfg, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0:
        out["context_length"] = context
    return out


@contextmanager
def _scratch_in(directory: Path) -> Iterator[Path]:
    """torch.onnx's scratch files inside the export's temporary directory, so the cleanup of an interrupted export
    (or the next run's, after a kill) removes both; emptied before the directory is renamed into place."""
    path = directory / ".scratch"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_old_scratch(max_age_s: float = 86400.0) -> None:
    """Remove the ``hetmoe-onnx-*`` scratch folders that earlier versions' exports left in the temp dir (those a
    day old or more: a younger one may belong to an export still running)."""
    now = time.time()
    for old in Path(tempfile.gettempdir()).glob("hetmoe-onnx-*"):
        try:
            if old.is_dir() and now - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


def _doc(part) -> str:
    experts = "; ".join(f"layer {l}: experts {ids}" for l, ids in sorted(part.expert_ids.items()))
    return f"hetmoe-compile partition {part.name} ({part.device}){': ' + experts if experts else ''}"


def program_instance(
    model: nn.Module, info, group: GroupNode, cfg: AnalogConfig, seed: int, ranges: InputRanges | None = None
) -> tuple[list[ProgrammedExpert], TilePeriphery]:
    """Hardware instance ``seed`` of one analog group: the same devices as ``simulate(model, cfg, seed)`` (an
    expert's devices depend only on seed, layer, expert and matrix), with the group's calibrated input ranges
    under constant noise management. Experts are programmed one at a time, when the partition writer asks for
    their weights."""
    het = cast(HetExperts, model.get_submodule(info.layer(group.layer).experts))
    source = cast(ExpertGroup, het.groups["analog"])  # the ideal group: export restored the digital model
    gate_up_range = down_range = None
    if cfg.noise_management == "constant":
        assert ranges is not None  # export_onnx checks
        ranges.check_widths(group.layer, source.gate_up.shape[-1], source.down.shape[-1])
        gate_up_range, down_range = (r.numpy() for r in ranges.for_experts(group.layer, source.ids, cfg.tile_size))

    @lru_cache(maxsize=1)
    def programmed(i: int) -> dict[str, np.ndarray]:
        with torch.no_grad():
            progs = program_group(
                source.gate_up[i : i + 1], source.down[i : i + 1], source.expert_ids[i : i + 1], cfg, seed, group.layer
            )
        return {k: v[0].detach().cpu().numpy() for k, v in progs.items()}

    def field(i: int, key: str, shape: tuple[int, ...]) -> Deferred:
        return Deferred(shape, np.float32, lambda: programmed(i)[key])

    experts = []
    for i in range(len(group.expert_ids)):
        shapes: dict[str, tuple[int, ...]] = {}
        for name, w in (("gate_up", source.gate_up[i]), ("down", source.down[i])):
            count, size = split_sizes(w.shape[1], cfg.tile_size)
            shapes[f"{name}_weight"], shapes[f"{name}_scale"] = (w.shape[0], count, size), (w.shape[0], count)
        experts.append(
            ProgrammedExpert(
                **{k: field(i, k, v) for k, v in shapes.items()},
                gate_up_range=None if gate_up_range is None else gate_up_range[i],
                down_range=None if down_range is None else down_range[i],
            )
        )
    periphery = TilePeriphery(
        cfg.inp_res,
        cfg.out_res,
        cfg.out_noise,
        cfg.out_bound,
        output_noise_seed(seed, group.layer),
        cfg.w_noise,
        cfg.w_noise_type == "pcm-read",
        cfg.ir_drop,
        cfg.ir_drop_g_ratio,
        cfg.bound_management == "iterative",
    )
    return experts, periphery
