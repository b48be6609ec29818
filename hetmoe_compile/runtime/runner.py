"""Run an exported model with ONNX Runtime: one session per partition, in the manifest's schedule (no torch).

Tensors pass between partitions as ``OrtValue``s (``run_with_ort_values``), so nothing is copied through numpy
between sessions, and each is released after its last use. Sessions stop spinning between runs and share one
memory arena (see :func:`_session_options`). A caller may hand any device's partitions to its own executor (an
accelerator toolchain): ``load(dir, executors={"analog": fn})`` calls ``fn(partition, feeds)`` with the
partition's manifest entry and numpy inputs, and expects ``{output_name: array}`` back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from ..base.errors import HetMoEError
from .manifest import check_files, partition_variants, read_manifest
from .sampling import Sampling, TokenChooser

Executor = Callable[[dict, dict[str, np.ndarray]], dict[str, np.ndarray]]
VARIANTS = ("auto", "ideal", "instance")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # what the runner feeds, besides the KV cache


class Runner:
    """``runner(input_ids, attention_mask=None) -> logits [batch, seq, vocab]`` and greedy :meth:`generate`."""

    def __init__(
        self,
        directory: Path,
        manifest: dict,
        sessions: dict,
        executors: dict[str, Executor],
        variant: str,
        vocab_size: int | None = None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.sessions = sessions
        self.executors = executors
        self.variant = variant
        self.partitions = {p["name"]: p for p in manifest["partitions"]}
        self.output = manifest["outputs"][0]["name"]
        self._last_use = _last_use(manifest["schedule"], self.output)
        self._plan = [  # per schedule step: partition, its (local, model-level) inputs and outputs, what dies after it
            (
                self.partitions[step["partition"]],
                list(step["inputs"].items()),
                list(step["outputs"].items()),
                self._last_use.get(i, []),
            )
            for i, step in enumerate(manifest["schedule"])
        ]
        self._vocab_size = vocab_size if vocab_size is not None else manifest["model"].get("vocab_size")

    @property
    def vocab_size(self) -> int | None:
        """The logits' last dimension (token ids must lie below it); ``None`` when neither file nor manifest says."""
        return self._vocab_size

    @property
    def context_length(self) -> int | None:
        """The model's context (its config's ``max_position_embeddings``); ``None`` for exports before schema 1.1."""
        return self.manifest["model"].get("context_length")

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` saved with the export (its files checked against the manifest's sha256);
        one line naming ``ids`` prompts as the way out when the export has none."""
        from .tokenizer import load_export_tokenizer

        return load_export_tokenizer(Path(self.directory), self.manifest)

    @property
    def cache_inputs(self) -> list[dict]:
        """The ``past_key_values.<i>.key|value`` inputs of a KV-cached export (empty without a cache)."""
        return [t for t in self.manifest["inputs"] if t["name"].startswith("past_key_values.")]

    def __call__(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits of the whole sequence (a KV-cached export runs it as one prefill with an empty cache)."""
        ids, mask = self._check_inputs(input_ids, attention_mask)
        if not self.cache_inputs:
            return self._run({"input_ids": ids, "attention_mask": mask})[self.output]
        return self.step(ids, mask, self.empty_cache(ids.shape[0]))[0]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors for a prefill, in the manifest's input order."""
        return [
            np.zeros((batch, t["shape"][1], 0, t["shape"][3]), dtype=np.dtype(t["dtype"])) for t in self.cache_inputs
        ]

    def step(self, input_ids, attention_mask, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One cached step: ``input_ids [b, s]`` after ``past`` (``[b, heads, p, dim]`` each, :meth:`empty_cache`
        for none), ``attention_mask [b, p + s]`` over past and new tokens. Returns the new tokens' logits and the
        present cache (``[b, heads, p + s, dim]``), to pass as ``past`` to the next step."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        names = self.cache_inputs
        if len(past) != len(names):
            raise HetMoEError(f"past: expected {len(names)} cache tensors, got {len(past)}")
        if mask.shape != (ids.shape[0], past[0].shape[2] + ids.shape[1]):
            raise HetMoEError(
                f"attention_mask: expected shape [{ids.shape[0]}, {past[0].shape[2] + ids.shape[1]}] (past + new "
                f"tokens), got {list(mask.shape)}"
            )
        env = self._run(self._step_feeds(ids, mask, [np.ascontiguousarray(a) for a in past]))
        presents = [env[t["name"].replace("past_key_values.", "present.")] for t in names]
        return env[self.output], presents

    def _step_feeds(self, ids: np.ndarray, mask: np.ndarray, past: list) -> dict:
        """The feeds of one cached step (``past``: arrays or ``OrtValue``s), position ids as transformers makes
        them (a running count of the mask; 1 on padding)."""
        seq = ids.shape[1]
        position_ids = (np.cumsum(mask, axis=1) - 1)[:, -seq:]
        position_ids = np.where(mask[:, -seq:] == 0, 1, position_ids).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        feeds.update({t["name"]: a for t, a in zip(self.cache_inputs, past)})
        return feeds

    def _run(self, arrays: dict, ort_outputs: bool = False) -> dict:
        """Run the schedule on the model inputs ``arrays`` (numpy arrays, or values an earlier ``ort_outputs`` run
        returned); returns the model outputs as numpy copies, or with ``ort_outputs`` as ONNX Runtime's own values
        (no copy), to feed back as inputs. The values made here borrow the arrays (contiguous copies where needed), kept
        alive until the end. Tensors stay ONNX Runtime values between partitions and are freed after their last
        use; sessions are called through ONNX Runtime's C binding (its Python wrapper's checks and re-wrapping of
        every output cost about 65 us a call, 0.6 ms a decoded token over nine partitions)."""
        held = {k: np.ascontiguousarray(v) for k, v in arrays.items() if not _is_value(v)}  # what values borrow
        env = {k: _from_numpy(held[k]) if k in held else arrays[k] for k in arrays}
        for part, inputs, outputs, dead in self._plan:
            executor = self.executors.get(part["device"])
            names = [local for local, _ in outputs]
            if executor is not None:
                copies = {local: np.array(env[glob].numpy()) for local, glob in inputs}  # the caller may keep them
                got = executor(part, copies)
                _check_executor_outputs(part, got, names)
                results = [_owned(np.ascontiguousarray(got[n])) for n in names]
            else:
                results = _run_session(self.sessions[part["name"]], {local: env[glob] for local, glob in inputs}, names)
            for (_, glob), value in zip(outputs, results):
                env[glob] = value
            for glob in dead:
                env.pop(glob, None)
        if ort_outputs:
            return {t["name"]: env[t["name"]] for t in self.manifest["outputs"]}
        # a value's numpy() shares its buffer, which is freed with it: return copies
        return {t["name"]: np.array(env[t["name"]].numpy(), copy=True) for t in self.manifest["outputs"]}

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 20,
        eos_token_id: int | None = None,
        attention_mask=None,
        sampling: Sampling | None = None,
    ) -> np.ndarray:
        """Prompt plus up to ``max_new_tokens`` tokens ``[batch, prompt + new]``: greedy, or drawn as ``sampling``
        says (temperature, top-k, top-p, seed). ``attention_mask`` for left-padded batches; a row that produced
        ``eos_token_id`` (the manifest's by default) continues with it, and decoding stops when every row has. A
        KV-cached export prefills once and then runs one token per step, holding the cache as ONNX Runtime values;
        an export without a cache re-runs the whole prefix every step."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise HetMoEError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise HetMoEError(f"sampling must be a runtime.Sampling or None, got {type(sampling).__name__}")
        ids = self._check_inputs(input_ids, None)[0]
        context = self.context_length
        if context is not None and ids.shape[1] + max_new_tokens > context:
            raise HetMoEError(
                f"a prompt of {ids.shape[1]} tokens plus max_new_tokens {max_new_tokens} exceeds the model's context "
                f"of {context} tokens; shorten the prompt or lower max_new_tokens (--max-new-tokens)"
            )
        if eos_token_id is None:
            eos_token_id = self.manifest["model"].get("eos_token_id")
        mask = self._check_inputs(ids, attention_mask)[1]
        choose = TokenChooser(sampling)
        done = np.zeros(ids.shape[0], dtype=bool)
        cached = bool(self.cache_inputs)
        past: list = self.empty_cache(ids.shape[0]) if cached else []
        new = ids
        out = [ids]
        presents = [t["name"].replace("past_key_values.", "present.") for t in self.cache_inputs]
        for _ in range(max_new_tokens):
            if cached:
                env = self._run(self._step_feeds(new, mask, past), ort_outputs=True)
                past = [env[n] for n in presents]  # stays in ONNX Runtime: no copy between steps
                nxt = choose(env[self.output].numpy()[:, -1])
            else:
                nxt = choose(
                    self._run({"input_ids": np.concatenate(out, 1), "attention_mask": mask})[self.output][:, -1]
                )
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            new = nxt[:, None]
            out.append(new)
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=mask.dtype)], axis=1)
            if done.all():
                break
        return np.concatenate(out, axis=1)

    def _check_inputs(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise HetMoEError(f"input_ids: expected shape [batch, seq] with seq >= 1, got {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise HetMoEError(f"input_ids: expected integer token ids (int64), got dtype {ids.dtype}")
        context = self.context_length
        if context is not None and ids.shape[1] > context:
            raise HetMoEError(
                f"input_ids: {ids.shape[1]} tokens exceed the model's context of {context} tokens; shorten the input"
            )
        vocab = self.vocab_size
        if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise HetMoEError(f"input_ids: token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        if attention_mask is None:
            mask = np.ones_like(ids, dtype=np.int64)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise HetMoEError(
                    f"attention_mask: expected the shape of input_ids {list(ids.shape)}, got {list(mask.shape)}"
                )
            if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
                raise HetMoEError(f"attention_mask: expected 0/1 integers (int64), got dtype {mask.dtype}")
        return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)


@cache
def _binding():
    """ONNX Runtime's C binding (its values and sessions) and its CPU device; imported on first use."""
    from onnxruntime.capi import _pybind_state

    return _pybind_state, _pybind_state.OrtDevice(
        _pybind_state.OrtDevice.cpu(), _pybind_state.OrtDevice.default_memory(), 0
    )


def _is_value(v) -> bool:
    return isinstance(v, _binding()[0].OrtValue)


def _from_numpy(array: np.ndarray):
    """A CPU value borrowing the memory of ``array`` (C-contiguous), which the caller keeps alive while it is used."""
    c, cpu = _binding()
    return c.OrtValue.ortvalue_from_numpy(array, cpu)


def _owned(array: np.ndarray):
    """A value holding a copy of ``array`` (an executor's caller may reuse its array, and a borrowed one would
    die before a value handed back to the caller)."""
    c, cpu = _binding()
    value = c.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, cpu)
    value.update_inplace(array)
    return value


def _run_session(session, feeds: dict, names: list[str]) -> list:
    """``session.run_with_ort_values`` on C values, without the Python wrapper's per-call checks and wrapping. The
    returned ``OrtValueVector`` is read by index: ``list()`` of it ends with a C++ ``IndexError`` crossing into Python,
    which cost about 75 us a call (0.7 ms a decoded token over nine partitions)."""
    values = session._sess.run_with_ort_values(feeds, names, None)
    return [values[i] for i in range(len(values))]


def _last_use(schedule: list[dict], keep: str) -> dict[int, list[str]]:
    """Step index -> model-level tensors that no later step reads (freed after that step)."""
    last: dict[str, int] = {}
    for i, step in enumerate(schedule):
        for glob in step["inputs"].values():
            last[glob] = i
    out: dict[int, list[str]] = {}
    for glob, i in last.items():
        if glob != keep:
            out.setdefault(i, []).append(glob)
    return out


def _check_executor_outputs(part: dict, got, names: list[str]) -> None:
    if not isinstance(got, dict) or any(n not in got for n in names):
        raise HetMoEError(
            f"executor for partition '{part['name']}' must return a dict with {names}, "
            f"got {sorted(got) if isinstance(got, dict) else type(got).__name__}"
        )
    for spec in part["outputs"]:
        arr = np.asarray(got[spec["name"]])
        if str(arr.dtype) != spec["dtype"]:
            raise HetMoEError(
                f"executor for partition '{part['name']}': output '{spec['name']}' must be "
                f"{spec['dtype']}, got {arr.dtype}"
            )


_SHARED_ARENA: list[bool] = []  # [True] once this process registered the shared CPU arena, [False] if it could not


def _session_options(threads: int):
    """Session options for partitions that run one after another.

    Each session's intra-op threads stop spinning when its run ends (``session.force_spinning_stop``): otherwise the
    idle partitions' threads spin and steal cores from the running one. Sessions share one CPU memory arena
    registered with ONNX Runtime's environment, so a partition reuses the warm memory its predecessor released.
    Without both, partitioned inference was 1.2-4x slower than one monolithic session on the reference model.
    Neither option changes what is computed, and other sessions in the process are unaffected."""
    import onnxruntime as ort

    if not _SHARED_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _SHARED_ARENA.append(True)
        except Exception:  # another library registered one already: sessions keep their own arenas
            _SHARED_ARENA.append(False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if _SHARED_ARENA[0]:
        options.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


def load(
    directory: str | Path,
    analog: str = "auto",
    executors: dict[str, Executor] | None = None,
    providers: list[str] | None = None,
    verify_hashes: bool = True,
    threads: int = 0,
    analog_threads: int | None = None,
) -> Runner:
    """Load the export in ``directory``: check its manifest (schema, version, schedule), every file it lists (sha256,
    and that each holds the partition its entry claims), the vocabulary size, and open one ONNX Runtime session per
    partition (``threads``: intra-op threads per session, 0 = one per core; ``analog_threads``: the analog
    partitions' own count, ``None``: ``threads``; with small experts one thread decodes faster and may prefill
    slower, see ``benchmarks/RESULTS.md``). ``analog``:
    ``ideal`` weights, the programmed ``instance`` (needs an export with ``--instance-seed``), or ``auto`` (the
    instance when there is one). Partitions of a device in ``executors`` run through that callable instead of ONNX
    Runtime. ``providers`` default to CUDA when ONNX Runtime has it, else CPU."""
    import onnxruntime as ort

    if analog not in VARIANTS:
        raise HetMoEError(f"analog must be one of {', '.join(VARIANTS)}, got '{analog}'")
    directory = Path(directory)
    manifest = read_manifest(directory)
    has_instance = manifest["analog"]["instance_seed"] is not None
    if analog == "instance" and not has_instance:
        raise HetMoEError(
            f"{directory}: the export holds no programmed instance; re-export with --instance-seed N "
            "or run the ideal partitions (--analog ideal; runtime.load(..., analog='ideal'))"
        )
    variant = "instance" if (analog == "instance" or (analog == "auto" and has_instance)) else "ideal"
    for name, value in (("threads", threads), ("analog_threads", analog_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise HetMoEError(f"{name} must be an integer >= 0 (0: one per core), got {value!r}")
    executors = dict(executors or {})
    devices = sorted({p["device"] for p in manifest["partitions"]})
    unknown = [k for k in executors if k not in devices]
    if unknown:
        raise HetMoEError(
            f"executors for {', '.join(map(repr, unknown))}: the export's partitions run on {', '.join(devices)}; "
            "key the executors by one of those (they would never be called)"
        )
    bad = [k for k, fn in executors.items() if not callable(fn)]
    if bad:
        raise HetMoEError(f"executors[{bad[0]!r}] is not callable; give a function fn(partition, feeds) -> outputs")
    options = {
        "digital": _session_options(threads),
        "analog": _session_options(threads if analog_threads is None else analog_threads),
    }
    providers = providers or [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()
    ]
    extra = [
        t["name"]
        for t in manifest["inputs"]
        if t["name"] not in MODEL_INPUTS and not t["name"].startswith("past_key_values.")
    ]
    if extra:
        raise HetMoEError(
            f"{directory}: the model takes inputs {extra}, but this runtime feeds only {list(MODEL_INPUTS)}; "
            "restore the manifest's inputs or re-export"
        )
    # every listed file, before any session opens: the variant that runs must be complete; the files of the other
    # variant may be absent (deleted to save space) but, where present, must be what the manifest says
    paths = {}
    for part in manifest["partitions"]:
        run = variant if (part["device"] == "analog" and "instance" in part) else "ideal"
        for v in sorted(partition_variants(part), key=lambda v: v != run):  # the one that runs first
            path = check_files(directory, part, v, verify_hashes, required=v == run)
            if v == run:
                paths[part["name"]] = path
    sessions = {}
    for part in manifest["partitions"]:
        if part["device"] in executors:
            continue
        path = paths[part["name"]]
        try:
            sessions[part["name"]] = ort.InferenceSession(
                str(path), options["analog" if part["device"] == "analog" else "digital"], providers=providers
            )
        except Exception as exc:
            raise HetMoEError(
                f"partition '{part['name']}': ONNX Runtime cannot load {path.name}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
    vocab = _logits_vocab(manifest, sessions)
    claimed = manifest["model"].get("vocab_size")
    if vocab is not None and claimed is not None and claimed != vocab:
        raise HetMoEError(
            f"{directory}: the manifest's model.vocab_size is {claimed}, but the partitions compute logits over "
            f"{vocab} tokens (the manifest was edited); restore manifest.json or re-export"
        )
    return Runner(directory, manifest, sessions, executors, variant, vocab)


def _logits_vocab(manifest: dict, sessions: dict) -> int | None:
    """The static last dimension of the model output as the partition producing it declares it: its ONNX Runtime
    session's output (the file itself), or its manifest entry when an executor runs it."""
    output = manifest["outputs"][0]["name"]
    for step in reversed(manifest["schedule"]):
        for local, tensor in step["outputs"].items():
            if tensor != output:
                continue
            session = sessions.get(step["partition"])
            if session is not None:
                shape = next((o.shape for o in session.get_outputs() if o.name == local), None)
            else:
                entry = next(p for p in manifest["partitions"] if p["name"] == step["partition"])
                shape = next((t["shape"] for t in entry["outputs"] if t["name"] == local), None)
            last = shape[-1] if shape else None
            return last if isinstance(last, int) else None
    return None
