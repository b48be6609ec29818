"""Hybrid projection decomposition (HPD): exact full-rank split, SVD-tail truncation error, tied embeddings,
simulation of the analog U·Σ half (noise streams, restore), undoing, parameter accounting, errors, export refusal."""

import json

import numpy as np
import pytest
import torch
from helpers import FAMILIES, max_rel_err, placed
from torch import nn

from hetmoe_compile.analog import AnalogLinear, analog_config, restore_digital, simulate
from hetmoe_compile.analog.instance import linear_seed, output_noise_seed
from hetmoe_compile.analog.simulate import HPD_KEY_BASE, hpd_stream_key
from hetmoe_compile.analog.tiles import analog_matmul, program_matrix
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.export import export_onnx
from hetmoe_compile.models import recognize
from hetmoe_compile.models.tiny import tiny_config, tiny_model
from hetmoe_compile.transforms.hpd import (
    TARGETS,
    HPDLinear,
    hpd_modules,
    hpd_output_error,
    split_projections,
    unsplit_projections,
)

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _routing(model, info):
    """Each MoE layer's top-k expert indices (captured at the canonical experts interface) and the logits."""
    seen = {}
    hooks = [
        model.get_submodule(l.experts).register_forward_pre_hook(
            lambda mod, args, i=l.index: seen.__setitem__(i, args[1].clone())
        )
        for l in info.moe_layers
    ]
    try:
        logits = _logits(model)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_split_is_exact_keeps_routing_and_unsplits_bit_identically(family):
    model, info, _ = placed(family)
    routes, ref = _routing(model, info)
    o_projs = [n for n, m in model.named_modules() if n.endswith("self_attn.o_proj")]
    records = split_projections(model, info)
    assert sorted(r.module for r in records) == sorted(o_projs + ["lm_head"])
    assert {r.kind for r in records} == set(TARGETS)
    for r in records:
        assert r.rank == r.full_rank == min(r.shape) and r.rel_error < 1e-6 and r.tail_bound < 1e-6
        mod = model.get_submodule(r.module)
        assert isinstance(mod, HPDLinear) and type(mod.v_t) is nn.Linear and type(mod.u_sigma) is nn.Linear
        assert mod.v_t.weight.shape == (r.rank, r.shape[1]) and mod.u_sigma.weight.shape == (r.shape[0], r.rank)
    json.dumps([r.to_dict() for r in records])
    routes_split, out = _routing(model, info)
    assert max_rel_err(out, ref) < 1e-5  # measured: 3.3e-7 to 6.5e-7 over the seven families
    assert routes_split.keys() == routes.keys() and all(torch.equal(routes[i], routes_split[i]) for i in routes)
    assert sorted(unsplit_projections(model)) == sorted(o_projs + ["lm_head"])
    assert not hpd_modules(model) and torch.equal(_logits(model), ref)


def test_truncated_rank_error_is_the_svd_tail():
    model = tiny_model("olmoe")
    weights = {
        n: m.weight.detach().double().numpy().copy()
        for n, m in model.named_modules()
        if n == "lm_head" or n.endswith("o_proj")
    }
    records = split_projections(model, rank=0.5)
    assert len(records) == len(weights)
    for r in records:
        w = weights[r.module]
        s = np.linalg.svd(w, compute_uv=False)
        assert r.rank == 16 == -(-min(w.shape) // 2)
        bound = np.sqrt(np.sum(s[r.rank :] ** 2)) / np.linalg.norm(w)
        assert bound > 0.1  # a random matrix has a heavy tail: the truncation is visible
        assert r.tail_bound == pytest.approx(bound, rel=1e-9)
        assert r.rel_error == pytest.approx(bound, rel=1e-5)
        mod = model.get_submodule(r.module)
        recon = mod.u_sigma.weight.double() @ mod.v_t.weight.double()
        assert float(np.linalg.norm(w - recon.detach().numpy()) / np.linalg.norm(w)) == pytest.approx(bound, rel=1e-5)
    unsplit_projections(model)
    assert [r.rank for r in split_projections(model, targets=("lm_head",), rank=8)] == [8]
    unsplit_projections(model)
    assert {r.rank for r in split_projections(model, rank=0.3)} == {10}  # ceil(0.3 * 32)


def test_tied_lm_head_leaves_the_embedding_alone():
    from transformers import AutoModelForCausalLM

    config = tiny_config("olmoe")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    before, n_before, ref = embed.detach().clone(), _n_params(model), _logits(model)
    (record,) = split_projections(model, targets="lm_head")
    assert record.tied and model.model.embed_tokens.weight is embed and torch.equal(embed, before)
    # the tied weight stays counted once (by the embedding); the split adds its own factors
    assert _n_params(model) == n_before + record.digital_params + record.analog_params
    assert max_rel_err(_logits(model), ref) < 1e-5  # a full-rank split: float rounding only
    unsplit_projections(model)
    assert model.lm_head.weight is embed and torch.equal(_logits(model), ref)


def test_parameter_accounting_and_state_dict_are_the_split():
    model, info, _ = placed("gpt_oss")
    n_before = _n_params(model)
    original = {
        n: sum(p.numel() for p in m.parameters())
        for n, m in model.named_modules()
        if n == "lm_head" or n.endswith("o_proj")
    }
    records = split_projections(model, info, rank=0.5)
    for r in records:  # gpt_oss's o_proj has a bias: it is counted on the digital side
        bias = original[r.module] - r.shape[0] * r.shape[1]
        assert r.digital_params == r.rank * r.shape[1] + bias and r.analog_params == r.shape[0] * r.rank
    assert any(r.digital_params > r.rank * r.shape[1] for r in records)
    expected = n_before - sum(original.values()) + sum(r.digital_params + r.analog_params for r in records)
    assert _n_params(model) == expected
    keys = set(model.state_dict())
    assert {"lm_head.v_t.weight", "lm_head.u_sigma.weight"} <= keys and "lm_head.weight" not in keys
    assert not any("original" in k or "hpd_rank" in k for k in keys)
    kinds = recognize(model)  # a split model is still recognised: the halves keep their module's kind
    assert kinds.kind_of("lm_head.u_sigma") == "lm_head"
    assert kinds.kind_of("model.layers.0.self_attn.o_proj.v_t") == "attention"


def _analog_keys(model):
    return {n: m.key for n, m in model.named_modules() if isinstance(m, AnalogLinear)}


def test_simulate_puts_u_sigma_on_tiles_and_keeps_v_t_digital():
    model, info, _ = placed("olmoe", fraction=1.0)  # every expert digital: HPD's u_sigma is the only analog part
    simulate(model, analog_config("pcm"), seed=0, dense="analog", info=info)
    keys_unsplit = _analog_keys(model)
    restore_digital(model, info)
    records = split_projections(model, info)
    split = _logits(model)

    simulate(model, analog_config("ideal"), seed=0, info=info)
    assert all(isinstance(m.u_sigma, AnalogLinear) for m in hpd_modules(model).values())
    assert torch.equal(_logits(model), split)
    pcm = analog_config("pcm")
    ideal_u = {path: mod.u_sigma.source.weight.detach().clone() for path, mod in hpd_modules(model).items()}
    a = _logits(simulate(model, pcm, seed=0, info=info))
    b = _logits(simulate(model, pcm, seed=0, info=info))
    assert torch.equal(a, b)  # the same instance again
    simulate(model, pcm, seed=1, info=info)  # a fresh output-noise stream for the direct calls below
    for path, mod in hpd_modules(model).items():
        assert type(mod.v_t) is nn.Linear and mod.u_sigma.key == hpd_stream_key(path) >= HPD_KEY_BASE
        x = torch.randn(64, mod.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():  # instance 1 of u_sigma, rebuilt from its ideal weight and its two seeds
            prog = program_matrix(ideal_u[path], pcm, linear_seed(1, hpd_stream_key(path)))
            gen = torch.Generator().manual_seed(output_noise_seed(1, hpd_stream_key(path)))
            t = mod.v_t(x)
            torch.testing.assert_close(mod.u_sigma(t), analog_matmul(t, prog, pcm, gen), rtol=0, atol=0)
        assert hpd_output_error(mod, x) > 1e-3

    simulate(model, pcm, seed=0, dense="analog", info=info)
    keys = _analog_keys(model)
    for path, mod in hpd_modules(model).items():
        assert type(mod.v_t) is nn.Linear  # the digital half stays digital even with dense="analog"
        assert keys.pop(f"{path}.u_sigma") == hpd_stream_key(path)
    # every other dense layer keeps the noise stream it has without HPD
    assert keys == {n: k for n, k in keys_unsplit.items() if n not in {r.module for r in records}}
    assert _logits(model).isfinite().all()

    restore_digital(model, info)
    assert not _analog_keys(model)
    assert all(type(m.u_sigma) is nn.Linear and type(m.v_t) is nn.Linear for m in hpd_modules(model).values())
    assert torch.equal(_logits(model), split)
    mod = model.lm_head
    x = torch.randn(64, mod.in_features, generator=torch.Generator().manual_seed(1))
    assert hpd_output_error(mod, x) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(targets=("lm_head", "q_proj")),
            r"unknown HPD target\(s\) \['q_proj'\]; valid targets: lm_head, "
            "attention_output",
        ),
        (dict(targets=()), "valid targets: lm_head, attention_output"),
        (dict(rank=0), r"HPD rank 0 is out of range for .* \(full rank 32\): use 1..32"),
        (dict(rank=33), r"HPD rank 33 is out of range .* use 1..32, a fraction in \(0, 1\], or None"),
        (dict(rank=1.5), r"rank fraction must be in \(0, 1\], got 1.5"),
        (dict(rank=0.0), r"rank fraction must be in \(0, 1\]"),
        (dict(rank="full"), "HPD rank must be None"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = tiny_model("olmoe")
    with pytest.raises(HetMoEError, match=message):
        split_projections(model, **kwargs)
    assert not hpd_modules(model)  # nothing was split


def test_errors_split_twice_nothing_to_split_and_simulated_model():
    model, info, _ = placed("olmoe")
    split_projections(model, info, targets="attention_output")
    with pytest.raises(HetMoEError, match=r"HPD-split already; call hpd.unsplit_projections\(model\)"):
        split_projections(model, info, targets="lm_head")
    unsplit_projections(model)
    assert unsplit_projections(model) == []
    simulate(model, analog_config("pcm"), seed=0, dense="analog", info=info)
    with pytest.raises(
        HetMoEError,
        match=r"o_proj is a AnalogLinear around its nn.Linear: restore the digital "
        r"model \(analog.restore_digital\(model\)\)",
    ):
        split_projections(model, info)
    restore_digital(model, info)
    headless = tiny_model("olmoe")
    headless.lm_head = nn.Identity()
    with pytest.raises(
        HetMoEError, match="found no projection to HPD-split .* valid targets: lm_head, attention_output"
    ):
        split_projections(headless, targets=("lm_head",))
    with pytest.raises(HetMoEError, match="needs an HPDLinear"):
        hpd_output_error(model.lm_head, torch.zeros(1, 32))


def test_export_and_backend_refuse_hpd(tmp_path):
    import hetmoe_compile as hc

    model, info, placement = placed("olmoe")
    split_projections(model, info)
    with pytest.raises(
        HetMoEError,
        match=r"ONNX export does not support HPD-split projections yet .* "
        r"call hetmoe_compile.transforms.hpd.unsplit_projections\(model\) first",
    ):
        export_onnx(model, placement, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(HetMoEError, match="the torch.compile backend does not support HPD-split"):
        hc.prepare(model)
