"""Load a causal LM from a local directory or a Hugging Face hub id.

Bad checkpoints are one-line errors (:class:`~hetmoe_compile.base.errors.HetMoEError`), never a model with weights made
up: a missing or misshapen tensor, a truncated safetensors file, a corrupt tokenizer file. transformers' loading
report is the source (``output_loading_info``) but is not printed; tensors the model does not use are one warning
line. A hub id is probed once with a short timeout: without a reachable hub it loads from the local Hugging Face
cache, or fails at once, instead of retrying for a minute.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..base.errors import HetMoEError, NoTokenizerError

_log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
"""How long the one reachability probe of the hub waits before a hub id is loaded from the local cache only."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") != 1


def resolve_source(source: str) -> str:
    """A local directory (validated) or a hub id ``owner/name``; anything else is an error that says why."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HetMoEError(f"{source}: directory has no config.json; point MODEL at a Hugging Face model directory")
        return str(path)
    if path.exists():
        raise HetMoEError(f"{source}: is a file, not a model directory; point MODEL at a directory with config.json")
    if _looks_like_path(source):
        raise HetMoEError(
            f"{source}: no such model directory; give an existing directory or a hub id like 'owner/name'"
        )
    return source


_PROBES: dict[str, tuple[float, bool]] = {}  # endpoint -> (when, reachable): one probe per load, not per file
_PROBE_TTL_S = 60.0


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether ``endpoint`` answers one HEAD request within ``timeout`` seconds (any HTTP status will do); the
    answer is reused for a minute (a model and its tokenizer are loaded with one probe)."""
    from huggingface_hub.utils import get_session

    when, reachable = _PROBES.get(endpoint, (-_PROBE_TTL_S, False))
    if time.monotonic() - when < _PROBE_TTL_S:
        return reachable
    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
        reachable = True
    except Exception:  # refused, no route, DNS, timeout, proxy: unreachable, whatever the transport says
        reachable = False
    _PROBES[endpoint] = (time.monotonic(), reachable)
    return reachable


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within :data:`HUB_PROBE_TIMEOUT_S` (one probe a minute)."""
    from huggingface_hub import constants

    return _hub_reachable(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)


def hub_options(source: str, resolved: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``resolved``: ``local_files_only`` when the hub cannot be reached (or
    ``HF_HUB_OFFLINE`` is set) and the model is in the local cache; an error when it is not there either."""
    if Path(resolved).is_dir():
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(resolved, "config.json"), str)
    except ValueError as exc:  # HFValidationError: not a repo id
        raise HetMoEError(
            f"{source}: no such model directory, and not a hub id ({_first_line(exc)}); give an existing directory "
            "or a hub id like 'owner/name'"
        ) from exc
    if constants.is_offline_mode():
        if cached:
            return {"local_files_only": True}
        raise HetMoEError(
            f"{source}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it, or point MODEL at a local model directory"
        )
    if _hub_reachable(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S):
        return {}
    if cached:
        return {"local_files_only": True}  # offline: the cached copy, without a minute of retries
    raise HetMoEError(
        f"{source}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached and the model is not in the local "
        f"cache ({constants.HF_HUB_CACHE}); connect to the network (or set HF_ENDPOINT to a reachable mirror), "
        "or point MODEL at a local model directory"
    )


def _cpu_dtype(resolved: str, hub: dict[str, Any] | None = None) -> str | torch.dtype:
    """float16 checkpoints run in float32 on CPU (CPU half matmuls are slow and lose precision); else as stored."""
    from transformers import AutoConfig

    try:
        stored = getattr(AutoConfig.from_pretrained(resolved, **(hub or {})), "dtype", None)
    except (OSError, ValueError):
        return "auto"
    return torch.float32 if str(stored).replace("torch.", "") == "float16" else "auto"


class _NoLoadReport(logging.Filter):
    """Drops transformers' loading report (a table of missing / unexpected / mismatched keys): :func:`load_model`
    reads the same facts from ``output_loading_info`` and says what concerns the user in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def resolve_device(device: str | torch.device) -> str:
    """``device`` as a name (``auto``: CUDA when available); one line for CUDA on a machine without it, a CUDA
    index the machine does not have, or an unknown name."""
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str):
        raise HetMoEError(f"device must be a string such as 'cpu' or 'cuda', got {type(name).__name__}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise HetMoEError(f"device={name!r}: unknown device; use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HetMoEError(f"device={name!r}: CUDA is not available here; use device='cpu'")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise HetMoEError(f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


@dataclass(frozen=True)
class LoadOptions:
    """How the API's functions load a model given by path or hub id (see :func:`load_model`): ``device`` is cpu,
    cuda, cuda:N or auto (CUDA when available); ``device_map`` shards over devices instead, with ``max_memory`` and
    ``offload_folder``."""

    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None

    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved; one line for CUDA on a machine without it, or an unknown name."""
        return resolve_device(self.device)

    def check(self) -> None:
        """Refuse combinations that would be ignored: memory limits or an offload folder without a device map."""
        self.resolved_device()
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise HetMoEError("max_memory and offload_folder go with device_map; add device_map='auto'")

    def load(self, source: str) -> nn.Module:
        self.check()
        if self.device_map is None:
            return load_model(source, dtype=self.dtype, device=self.resolved_device())
        return load_model(
            source,
            dtype=self.dtype,
            device_map=self.device_map,
            max_memory=self.max_memory,
            offload_folder=self.offload_folder,
        )


def load_model(
    source: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
) -> nn.Module:
    """Load ``AutoModelForCausalLM`` from a directory or hub id, in eval mode.

    ``dtype="auto"`` follows the checkpoint (float16 checkpoints load as float32 on CPU); a hub id needs network
    access or the model in the local HF cache (used without network). ``device_map`` (``"auto"``, another accelerate
    strategy, or a dict of module name -> device) shards the model over devices instead of putting it on
    ``device``, with ``max_memory`` per device and ``offload_folder`` for layers offloaded to disk (see
    :mod:`.device_map`). A checkpoint that lacks a tensor of the model, or holds one of another shape, is an error.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .checkpoint import check_files
    from .device_map import check_dtype_on_device

    if device_map is None:
        device = resolve_device(device)  # before any file is read
    resolved = resolve_source(source)
    hub = hub_options(source, resolved)
    # a missing shard or a truncated file is named before transformers starts loading
    entries = check_files(Path(resolved)) if Path(resolved).is_dir() else {}
    on_cpu = torch.device(device).type == "cpu" if device_map is None else not torch.cuda.is_available()
    if dtype == "auto" and on_cpu:
        dtype = _cpu_dtype(resolved, hub)
    if isinstance(dtype, torch.dtype):
        check_dtype_on_device(dtype, device if device_map is None else ("cpu" if on_cpu else "cuda"))
    kwargs = (
        {} if device_map is None else dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    )
    try:
        with _quiet_load_report():
            # output_loading_info: (model, info); transformers types the call as returning the model alone
            loaded = cast(
                "tuple[nn.Module, dict[str, Any]]",
                AutoModelForCausalLM.from_pretrained(
                    resolved, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **hub, **kwargs
                ),
            )
            model, info = loaded
    except (OSError, ValueError) as exc:
        first = _first_line(exc)
        if device_map is not None and "offload_folder" in first:
            raise HetMoEError(
                f"{source}: the devices of --device-map {_describe(device_map)} cannot hold the model, "
                "and the rest would go to disk; pass --offload-folder DIR (or more memory with "
                "--max-memory, or more devices)"
            ) from exc
        raise HetMoEError(
            f"{source}: could not load the model ({first}); check the path or hub id, and network access for hub ids"
        ) from exc
    except RuntimeError as exc:
        if not _is_weights_error(exc):
            raise
        if Path(resolved).is_dir():
            _diagnose(source, resolved)  # say which tensor, from the files' headers
        what = (  # transformers' message points at its loading report, which is not shown
            "transformers could not merge its tensors into the model's layout"
            if "automatic conversion" in str(exc)
            else _first_line(exc)
        )
        raise HetMoEError(
            f"{source}: could not read the checkpoint's weights ({what}); "
            "re-download the model, or re-save it with save_pretrained"
        ) from exc
    except SafetensorError as exc:  # what the header check above does not see (a gap in a file)
        raise HetMoEError(
            f"{source}: a safetensors file of the model is corrupt ({_first_line(exc)}); "
            "re-download the model, or re-save it with save_pretrained"
        ) from exc
    _check_loading_info(source, info, entries)
    return (model if device_map is not None else model.to(device)).eval()


def _is_weights_error(exc: RuntimeError) -> bool:
    """A RuntimeError transformers raises about the checkpoint's tensors (not one of torch's own)."""
    text = str(exc)
    return any(s in text for s in ("Error(s) in loading state_dict", "automatic conversion", "PytorchStreamReader"))


def _diagnose(source: str, resolved: str) -> None:
    """Raise what :meth:`~.checkpoint.ParameterSource.check` finds wrong with a directory's checkpoint, when
    transformers failed to convert its tensors without saying which; return when it finds nothing (or cannot
    read the checkpoint that way)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import Checkpoint, ParameterSource

    try:
        checkpoint = Checkpoint(resolved)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved))
        parameters = ParameterSource(checkpoint, model)
    except (HetMoEError, OSError, ValueError):
        return
    parameters.check(model, source)


def _check_loading_info(source: str, info: dict, entries: dict) -> None:
    """Refuse what transformers reports as missing or mismatched (it initialised those weights at random);
    warn in one line about checkpoint tensors the model does not use."""
    from .checkpoint import missing_tensors_error, shape_mismatch_error, unused_tensors_warning

    if info.get("error_msgs"):
        raise HetMoEError(
            f"{source}: could not load the checkpoint's weights ({info['error_msgs'][0].splitlines()[0]}); "
            "re-download the model, or re-save it with save_pretrained"
        )
    if info.get("missing_keys"):
        raise missing_tensors_error(source, sorted(info["missing_keys"]))
    if info.get("mismatched_keys"):
        raise shape_mismatch_error(
            source, [(k, tuple(found), tuple(want)) for k, found, want in info["mismatched_keys"]], entries
        )
    if info.get("unexpected_keys"):
        _log.warning(unused_tensors_warning(source, sorted(info["unexpected_keys"])))


def _describe(device_map: str | dict) -> str:
    return device_map if isinstance(device_map, str) else f"({len(device_map)} entries)"


def load_meta_model(source: str, dtype: str | torch.dtype = "auto"):
    """``(model, parameters)``: the model of a local directory built on the meta device (its structure, no weights)
    and a :class:`~.checkpoint.ParameterSource` that reads its parameters from the safetensors files on demand.
    ``dtype`` as in :func:`load_model` (the meta model's dtype is the one the loaded model would have). The
    checkpoint is checked against the model from the files' headers, as loading would check it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import Checkpoint, ParameterSource

    resolved = resolve_source(source)
    if not Path(resolved).is_dir():
        raise HetMoEError(
            f"{source}: scoring without loading reads a local directory's safetensors files; download "
            "the model first, or load it (--load full)"
        )
    checkpoint = Checkpoint(resolved)
    config = AutoConfig.from_pretrained(resolved)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise HetMoEError(
            f"{source}: a quantized checkpoint ({method}); scoring without loading reads unquantized safetensors "
            "weights: load the model instead (--load full)"
        )
    if dtype == "auto":
        dtype = _cpu_dtype(resolved)
    if dtype == "auto":
        stored = getattr(config, "dtype", None)
        dtype = getattr(torch, str(stored).replace("torch.", "")) if stored else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    parameters = ParameterSource(checkpoint, model)
    parameters.check(model, source)
    return model.eval(), parameters


def load_tokenizer(source: str):
    """The tokenizer saved with the model (``tokenizer.json``); error if the model has none, or a file of it is
    corrupt (named)."""
    from transformers import AutoTokenizer

    resolved = resolve_source(source)
    directory = Path(resolved)
    if directory.is_dir() and not any(
        (directory / f).is_file() for f in (*_TOKENIZER_FILES, "tokenizer.model", "vocab.txt", "merges.txt")
    ):  # transformers would make an empty tokenizer of the config's model type
        raise _no_tokenizer(source)
    hub = hub_options(source, resolved)
    try:
        return AutoTokenizer.from_pretrained(resolved, **hub)
    except Exception as exc:  # tokenizers raises plain Exceptions for a file it cannot parse
        raise _tokenizer_error(source, resolved, exc) from exc


def _tokenizer_error(source: str, resolved: str, exc: Exception) -> HetMoEError:
    """Which tokenizer file beside the model is broken, or that there is none."""
    fix = "re-download the model's tokenizer files, or re-save them with tokenizer.save_pretrained"
    directory = Path(resolved)
    if not directory.is_dir():
        return HetMoEError(f"{source}: could not load the tokenizer ({_first_line(exc)}); {fix}")
    present = [directory / f for f in _TOKENIZER_FILES if (directory / f).is_file()]
    for path in present:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as bad:
            return HetMoEError(f"{path}: not valid JSON ({_first_line(bad)}); the file is corrupt: {fix}")
    if (directory / "tokenizer.json").is_file():
        return HetMoEError(
            f"{directory / 'tokenizer.json'}: not a tokenizer the tokenizers library reads ({_first_line(exc)}); {fix}"
        )
    if present:
        return HetMoEError(f"{source}: could not load the tokenizer ({_first_line(exc)}); {fix}")
    return _no_tokenizer(source)


def _no_tokenizer(source: str) -> HetMoEError:
    return NoTokenizerError(
        f"{source}: no tokenizer found beside the model; calibration text needs one (save tokenizer.json there)"
    )
