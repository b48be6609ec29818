"""Routing diagnostics against the clean model: the definitions (checked against a plain re-computation), the
clean and ideal cases, noise upstream of a router, and low-bit digital experts."""

import math

import numpy as np
import pytest
import torch
from helpers import placed, token_ids

from hetmoe_compile.analog import analog_config, restore_digital, simulate
from hetmoe_compile.eval.routing_diagnostics import NAMES, SMOOTHING, reference_from_ids, routing_diagnostics
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.transforms.lowbit import quantize_digital_experts

IDS = token_ids(3, 24, seed=4)


def _by_hand(model, info, ids):
    """Each MoE layer's (top_k_index, top_k_weights, output) from plain forward hooks."""
    seen = {}
    handles = []
    for layer in info.moe_layers:

        def hook(module, args, output, index=layer.index):
            seen[index] = (args[1].clone(), args[2].clone(), output.detach().float().clone())

        handles.append(model.get_submodule(layer.experts).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_diagnostics_follow_their_definitions_on_a_noisy_instance():
    model, info, _ = placed("qwen2_moe", 0.25)
    clean = _by_hand(model, info, IDS)
    ref = reference_from_ids(model, info, IDS)
    cfg = analog_config("pcm", noise_scale=8.0)
    simulate(model, cfg, seed=1, info=info)
    try:
        got = routing_diagnostics(model, info, ref)
        simulate(model, cfg, seed=1, info=info)  # the same instance and output-noise stream again
        noisy = _by_hand(model, info, IDS)
    finally:
        restore_digital(model, info)
    for layer in info.moe_layers:
        (ci, cw, cy), (ni, nw, ny) = clean[layer.index], noisy[layer.index]
        e = layer.num_experts
        sets = [set(a.tolist()) == set(b.tolist()) for a, b in zip(ci, ni)]
        top1 = [a[int(wa.argmax())] == b[int(wb.argmax())] for a, wa, b, wb in zip(ci, cw, ni, nw)]
        p = np.bincount(ci.reshape(-1).numpy(), minlength=e) / ci.numel()
        q = np.bincount(ni.reshape(-1).numpy(), minlength=e) / ni.numel()
        ps, qs = (p + SMOOTHING) / (p + SMOOTHING).sum(), (q + SMOOTHING) / (q + SMOOTHING).sum()
        want = {
            "topk_match": np.mean(sets),
            "top1_match": np.mean(top1),
            "load_kl": float(np.sum(qs * np.log(qs / ps))),
            "load_entropy": -sum(x * math.log(x) for x in q if x > 0),
            "moe_rel_error": float((ny - cy).norm() / cy.norm()),
        }
        for name, value in want.items():
            assert got[f"routing/L{layer.index}/{name}"] == pytest.approx(value, rel=1e-6, abs=1e-9), (layer, name)
    for name in NAMES:
        per_layer = [got[f"routing/L{l.index}/{name}"] for l in info.moe_layers]
        assert got[f"routing/{name}"] == pytest.approx(np.mean(per_layer))
    first, last = info.moe_layers[0].index, info.moe_layers[-1].index
    assert got[f"routing/L{first}/topk_match"] == 1.0  # its router sees the digital embeddings and attention
    assert got[f"routing/L{first}/moe_rel_error"] > 1e-3  # its analog experts are noisy
    assert got[f"routing/L{last}/topk_match"] < 1.0  # noise upstream moved some tokens to other experts


def test_the_clean_model_and_ideal_hardware_match_the_reference():
    model, info, _ = placed("olmoe", 0.25)
    ref = reference_from_ids(model, info, IDS)
    for run in ("clean", "ideal"):
        if run == "ideal":
            simulate(model, analog_config("ideal"), seed=0, info=info)
        got = routing_diagnostics(model, info, ref)
        restore_digital(model, info)
        assert got["routing/topk_match"] == 1.0 and got["routing/top1_match"] == 1.0
        assert got["routing/load_kl"] == pytest.approx(0.0, abs=1e-12)
        assert got["routing/moe_rel_error"] == 0.0
        entropy = ref.clean_entropy()
        for layer in info.moe_layers:
            assert got[f"routing/L{layer.index}/load_entropy"] == pytest.approx(entropy[layer.index])


def test_low_bit_digital_experts_against_the_full_precision_reference():
    """The reference is the unquantised model, taken before quantisation: INT4 experts move every layer's output;
    the first layer's routing cannot move (its router's input is upstream of every expert)."""
    model = tiny_model("olmoe")
    model, info, _ = placed("olmoe", 1.0, model=model)
    ref = reference_from_ids(model, info, IDS)
    quantize_digital_experts(model, bits=4, group_size=16, info=info)
    got = routing_diagnostics(model, info, ref)
    first = info.moe_layers[0].index
    assert got[f"routing/L{first}/topk_match"] == 1.0
    assert all(got[f"routing/L{l.index}/moe_rel_error"] > 1e-3 for l in info.moe_layers)
