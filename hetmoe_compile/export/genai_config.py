"""``genai_config.json``: a KV-cached export described as an ONNX Runtime GenAI ``decoder-pipeline``.

One pipeline stage per partition, in the manifest's schedule order, each with its own session options, so that
``onnxruntime_genai.Model(dir)`` and its ``Generator`` run the partitioned model (prefill, then one token per step,
GenAI's search and sampling). GenAI hands tensors between stages by name: the digital partitions already use the
model-level names, and an analog partition's local names (``hidden_states``, ``top_k_index``, ``top_k_weights`` in,
``partial_output`` out) are mapped with ``output_names_forwarder`` on the stage producing them. The file runs the
programmed instance when the export holds one (as ``runtime.load(dir)`` does), else the ideal weights.
Format: https://onnxruntime.ai/docs/genai/reference/config.html and GenAI's ``src/config.cpp``.
"""

from __future__ import annotations

from typing import Any

from ..base.errors import HetMoEError

GENAI_CONFIG = "genai_config.json"
STAGE_SESSION_OPTIONS: dict[str, Any] = {
    "log_severity_level": 3,
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "session.force_spinning_stop": "1",  # idle stages stop spinning (see runtime.runner._session_options)
    "provider_options": [],  # CPU; add {"cuda": {}} (or an accelerator's provider) per stage to move it
}


class GenAIUnsupported(HetMoEError):
    """The export cannot be described as a GenAI pipeline (the reason is the message)."""


def genai_config(manifest: dict, model_config: Any, variant: str) -> dict:
    """The ``genai_config.json`` document of a KV-cached export's ``manifest`` (``variant``: which analog files
    the stages load, ``ideal`` or ``instance``); ``model_config`` is the Hugging Face config (head counts, sizes,
    special token ids). Raises :class:`GenAIUnsupported` when GenAI's one-shape cache cannot hold the export's."""
    cache = [t for t in manifest["inputs"] if t["name"].startswith("past_key_values.")]
    if not cache:
        raise GenAIUnsupported("the export has no KV cache (export with --kv-cache)")
    shapes = {(t["shape"][1], t["shape"][3], t["dtype"]) for t in cache}
    if len(shapes) != 1:
        raise GenAIUnsupported(f"its cache tensors differ in heads, width or dtype ({sorted(shapes)})")
    ((heads, width, _),) = shapes
    reads: dict[str, list[str]] = {}
    for step in manifest["schedule"]:
        for tensor in step["inputs"].values():
            reads.setdefault(tensor, []).append(step["partition"])
    parts = {p["name"]: p for p in manifest["partitions"]}
    stages = []
    for step in manifest["schedule"]:
        part = parts[step["partition"]]
        files = part["instance"] if variant == "instance" and "instance" in part else part
        forward = {local: tensor for local, tensor in step["outputs"].items() if local != tensor}
        for later in manifest["schedule"]:
            for local, tensor in later["inputs"].items():
                if local == tensor or tensor not in step["outputs"].values():
                    continue
                if len(reads[tensor]) > 1:
                    raise GenAIUnsupported(
                        f"tensor '{tensor}' feeds partition '{later['partition']}' as '{local}' and also "
                        f"{[p for p in reads[tensor] if p != later['partition']]}; GenAI passes one name per tensor"
                    )
                forward[tensor] = local
        stage: dict[str, Any] = {
            "filename": files["file"],
            "inputs": list(step["inputs"]),
            "outputs": list(step["outputs"]),
            "session_options": {"log_id": f"hetmoe-{part['name']}", **STAGE_SESSION_OPTIONS},
        }
        if forward:
            stage["output_names_forwarder"] = forward
        stages.append({part["name"]: stage})
    next(iter(stages[-1].values()))["is_lm_head"] = True
    model = manifest["model"]
    eos = model.get("eos_token_id")
    eos = eos if eos is not None else getattr(model_config, "eos_token_id", None)
    bos = getattr(model_config, "bos_token_id", None)
    pad = getattr(model_config, "pad_token_id", None)
    ids = [i for i in (eos, bos, pad) if isinstance(i, int)]
    fallback = ids[0] if ids else 0
    context = int(model.get("context_length") or getattr(model_config, "max_position_embeddings", 4096))
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": bos if isinstance(bos, int) else fallback,
            "eos_token_id": eos if eos is not None else fallback,
            "pad_token_id": pad if isinstance(pad, int) else fallback,
            "vocab_size": int(model["vocab_size"]),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "hetmoe", **STAGE_SESSION_OPTIONS},
                "head_size": int(width),
                "hidden_size": int(model_config.hidden_size),
                "num_attention_heads": int(model_config.num_attention_heads),
                "num_key_value_heads": int(heads),
                "num_hidden_layers": len(cache) // 2,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "pipeline": stages,
            },
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # a shared buffer needs GroupQueryAttention; ours is plain
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
