"""The ONNX Runtime GenAI pipeline file and the cache layout it relies on (the end-to-end GenAI run on every
family is in test_export.py::test_kv_cached_export_decodes_like_full_recomputation)."""

from types import SimpleNamespace

import pytest
import torch

from hetmoe_compile.export.genai_config import GenAIUnsupported, genai_config
from hetmoe_compile.graph.kv_cache import LayerCache, _pack, _unpack

CONFIG = SimpleNamespace(hidden_size=32, num_attention_heads=4, bos_token_id=None, pad_token_id=None)


def _tensor(name, shape):
    return {"name": name, "dtype": "float32", "shape": shape}


def _manifest(analog_inputs=("h", "idx", "w"), also_read=False, value_width=8):
    """digital_0 -> analog_L0 -> digital_1, one cached layer."""
    past = [_tensor("past_key_values.0.key", ["batch", 2, "past", 8])]
    past.append(_tensor("past_key_values.0.value", ["batch", 2, "past", value_width]))
    d1_inputs = {"expert_group_1": "expert_group_1", "res": "res"}
    if also_read:
        d1_inputs["h"] = "h"
    return {
        "model": {"vocab_size": 128, "eos_token_id": 1, "context_length": 64},
        "inputs": [_tensor("input_ids", ["batch", "seq"]), *past],
        "partitions": [
            {"name": "digital_0", "device": "digital", "file": "digital_0.onnx"},
            {
                "name": "analog_L0",
                "device": "analog",
                "file": "analog_L0.onnx",
                "instance": {"file": "analog_L0.instance.onnx"},
            },
            {"name": "digital_1", "device": "digital", "file": "digital_1.onnx"},
        ],
        "schedule": [
            {
                "partition": "digital_0",
                "inputs": {"input_ids": "input_ids", "past_key_values.0.key": "past_key_values.0.key"},
                "outputs": {"h": "h", "idx": "idx", "w": "w", "res": "res", "present.0.key": "present.0.key"},
            },
            {
                "partition": "analog_L0",
                "inputs": dict(zip(("hidden_states", "top_k_index", "top_k_weights"), analog_inputs)),
                "outputs": {"partial_output": "expert_group_1"},
            },
            {"partition": "digital_1", "inputs": d1_inputs, "outputs": {"logits": "logits"}},
        ],
    }


def test_stages_follow_the_schedule_and_forward_the_analog_names():
    doc = genai_config(_manifest(), CONFIG, "instance")
    decoder = doc["model"]["decoder"]
    assert doc["model"]["type"] == "decoder-pipeline" and doc["search"]["past_present_share_buffer"] is False
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (8, 2, 1)
    stages = [next(iter(s.items())) for s in decoder["pipeline"]]
    assert [name for name, _ in stages] == ["digital_0", "analog_L0", "digital_1"]
    d0, a0, d1 = (stage for _, stage in stages)
    assert d0["output_names_forwarder"] == {"h": "hidden_states", "idx": "top_k_index", "w": "top_k_weights"}
    assert a0["filename"] == "analog_L0.instance.onnx" and a0["inputs"] == [
        "hidden_states",
        "top_k_index",
        "top_k_weights",
    ]
    assert a0["output_names_forwarder"] == {"partial_output": "expert_group_1"}
    assert d1.get("is_lm_head") and not d0.get("is_lm_head") and "output_names_forwarder" not in d1
    assert genai_config(_manifest(), CONFIG, "ideal")["model"]["decoder"]["pipeline"][1]["analog_L0"]["filename"] == (
        "analog_L0.onnx"
    )
    assert (doc["model"]["bos_token_id"], doc["model"]["eos_token_id"], doc["model"]["pad_token_id"]) == (1, 1, 1)


def test_a_tensor_read_under_two_names_or_mixed_cache_widths_are_refused():
    with pytest.raises(GenAIUnsupported, match="tensor 'h' feeds partition 'analog_L0' as 'hidden_states' and also"):
        genai_config(_manifest(also_read=True), CONFIG, "ideal")
    with pytest.raises(GenAIUnsupported, match="cache tensors differ in heads, width or dtype"):
        genai_config(_manifest(value_width=4), CONFIG, "ideal")
    no_cache = _manifest()
    no_cache["inputs"] = no_cache["inputs"][:1]
    with pytest.raises(GenAIUnsupported, match="no KV cache"):
        genai_config(no_cache, CONFIG, "ideal")


@pytest.mark.parametrize("key,value", [(8, 4), (5, 4), (512, 64), (8, 8)])
def test_a_layer_with_two_widths_is_stored_split_evenly_and_read_back_exactly(key, value):
    layer = LayerCache(1, key, value)
    k, v = torch.randn(2, 1, 7, key), torch.randn(2, 1, 7, value)
    slots = _pack(layer, k, v)
    assert [s.shape[-1] for s in slots] == [layer.width] * 2
    assert 2 * layer.width - (key + value) == (0 if key == value else (key + value) % 2)  # no padding but parity
    back = _unpack(layer, *slots)
    assert torch.equal(back[0], k) and torch.equal(back[1], v)
