"""Front end: recognition of every tiny family, canonicalisation parity, the expert-group op, family weight
layouts, user-facing errors, and the trained reference model."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import FAMILIES, logits, reference_model

import hetmoe_compile.ir.expert_group as expert_group_mod
from hetmoe_compile.base.errors import HetMoEError, UnsupportedModelError
from hetmoe_compile.ir.expert_group import DEVICES, ExpertGroup, HetExperts
from hetmoe_compile.ir.grouped_routing import routed_slots
from hetmoe_compile.models import (
    DENSE_KINDS,
    ROUTED_EXPERTS,
    load_model,
    recognize,
    registered,
    supported_architectures,
)
from hetmoe_compile.models.expert_weights import canonical_expert_weights
from hetmoe_compile.models.tiny import TINY_CONFIGS, tiny_config, tiny_model
from hetmoe_compile.transforms.canonicalize import canonicalize

# What each tiny family must look like: MoE layer indices, dense-MLP layer indices, block/router attribute names
# and the shared-expert attributes of each MoE block.
EXPECTED = {
    "olmoe": dict(layers=2, moe=[0, 1], dense=[], block="mlp", router="gate", shared=()),
    "qwen2_moe": dict(
        layers=3, moe=[0, 2], dense=[1], block="mlp", router="gate", shared=("shared_expert", "shared_expert_gate")
    ),
    "qwen3_moe": dict(layers=2, moe=[0, 1], dense=[], block="mlp", router="gate", shared=()),
    "mixtral": dict(layers=2, moe=[0, 1], dense=[], block="mlp", router="gate", shared=()),
    "deepseek_v3": dict(layers=3, moe=[1, 2], dense=[0], block="mlp", router="gate", shared=("shared_experts",)),
    "gpt_oss": dict(layers=2, moe=[0, 1], dense=[], block="mlp", router="router", shared=()),
    "granitemoe": dict(layers=2, moe=[0, 1], dense=[], block="block_sparse_moe", router="router", shared=()),
}

PARITY_TOL = 1e-5  # measured: the largest parity gap of the tiny families is 4.2e-7 (GPT-OSS's transposed copies)


def _input_ids(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 128, (batch, seq), generator=gen)


def _split(info, kind: str, seed: int = 1234) -> dict[int, dict[int, str]]:
    rng = random.Random(seed)
    out = {}
    for layer in info.moe_layers:
        if kind == "all-digital":
            out[layer.index] = {e: "digital" for e in range(layer.num_experts)}
        elif kind == "all-analog":
            out[layer.index] = {e: "analog" for e in range(layer.num_experts)}
        elif kind == "alternating":
            out[layer.index] = {e: DEVICES[e % 2] for e in range(layer.num_experts)}
        elif kind == "random":
            out[layer.index] = {e: rng.choice(DEVICES) for e in range(layer.num_experts)}
        else:  # pragma: no cover - test bug
            raise AssertionError(kind)
    return out


def _param_path(name: str) -> str:
    return name.rsplit(".", 1)[0]


# ----------------------------------------------------------------------------------------------- recognition


def test_tiny_configs_cover_every_registered_family():
    assert set(TINY_CONFIGS) == set(EXPECTED)
    assert {a.name for a in registered().values()} == set(TINY_CONFIGS)
    assert set(supported_architectures()) == {t for a in registered().values() for t in a.model_types}


@pytest.mark.parametrize("family", FAMILIES)
def test_recognize_finds_moe_layers(family):
    exp = EXPECTED[family]
    model = tiny_model(family)
    info = recognize(model)
    cfg = model.config

    assert info.family == family
    assert info.model_type == cfg.model_type
    assert info.architecture == type(model).__name__
    assert info.num_layers == exp["layers"] == cfg.num_hidden_layers
    assert [l.index for l in info.moe_layers] == exp["moe"]
    for layer in info.moe_layers:
        prefix = f"model.layers.{layer.index}.{exp['block']}"
        assert layer.block == prefix
        assert layer.router == f"{prefix}.{exp['router']}"
        assert layer.experts == f"{prefix}.experts"
        assert layer.shared == tuple(f"{prefix}.{a}" for a in exp["shared"])
        assert layer.num_experts == 8
        assert layer.top_k == 2 == cfg.num_experts_per_tok
        assert layer.hidden_size == cfg.hidden_size == 32
        assert layer.intermediate_size == 16
        router = model.get_submodule(layer.router)
        assert tuple(router.weight.shape) == (layer.num_experts, layer.hidden_size)
        assert info.layer(layer.index) is layer
    for dense in exp["dense"]:
        with pytest.raises(KeyError, match=f"decoder layer {dense} has no MoE block"):
            info.layer(dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_recognize_module_kinds(family):
    exp = EXPECTED[family]
    model = tiny_model(family)
    info = recognize(model)
    kinds = info.module_kinds

    required = {"embedding", "lm_head", "norm", "attention", "router", ROUTED_EXPERTS}
    if exp["shared"]:
        required.add("shared_expert")
    if exp["dense"]:
        required.add("dense_mlp")
    assert required <= set(kinds.values())
    assert not ({"shared_expert", "dense_mlp"} - required) & set(kinds.values())
    assert set(kinds.values()) <= set(DENSE_KINDS) | {ROUTED_EXPERTS}

    assert kinds["model.embed_tokens"] == "embedding"
    assert kinds["lm_head"] == "lm_head"
    assert kinds["model.norm"] == "norm"
    for i in range(info.num_layers):
        assert kinds[f"model.layers.{i}.self_attn"] == "attention"
    for dense in exp["dense"]:
        assert kinds[f"model.layers.{dense}.mlp"] == "dense_mlp"
    for layer in info.moe_layers:
        assert kinds[layer.experts] == ROUTED_EXPERTS
        assert kinds[layer.router] == "router"
        for path in layer.shared:
            assert kinds[path] == "shared_expert"

    # Every parameter is classified; exactly the fused expert tensors are routed experts.
    expert_paths = {l.experts for l in info.moe_layers}
    routed_params = 0
    for name, p in model.named_parameters():
        kind = info.kind_of(_param_path(name))
        assert kind in set(DENSE_KINDS) | {ROUTED_EXPERTS}, name
        is_expert = _param_path(name) in expert_paths
        assert (kind == ROUTED_EXPERTS) == is_expert, name
        routed_params += p.numel() if is_expert else 0
    assert routed_params > 0
    assert info.kind_of("model.layers.0.self_attn.o_proj") == "attention"
    assert info.kind_of("no_such_module") == "other"


@pytest.mark.parametrize("family", FAMILIES)
def test_recognize_canonical_model_same_structure(family):
    model = tiny_model(family)
    before = recognize(model)
    canonicalize(model, _split(before, "alternating"))
    after = recognize(model)
    assert after.moe_layers == before.moe_layers
    assert after.num_layers == before.num_layers
    for layer in after.moe_layers:
        assert isinstance(model.get_submodule(layer.experts), HetExperts)
    for name, _ in model.named_parameters():
        in_experts = any(name.startswith(l.experts + ".") for l in after.moe_layers)
        assert (after.kind_of(_param_path(name)) == ROUTED_EXPERTS) == in_experts, name


# ------------------------------------------------------------------------------------------ canonical parity


@pytest.mark.parametrize("split", ["all-digital", "all-analog", "alternating", "random"])
@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_parity(family, split):
    model = tiny_model(family)
    info = recognize(model)
    ids = _input_ids()
    ref = logits(model, ids)
    devices = _split(info, split)
    originals = {l.index: model.get_submodule(l.experts) for l in info.moe_layers}
    n_routed = sum(sum(p.numel() for p in m.parameters()) for m in originals.values())

    assert canonicalize(model, devices) is model
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        assert isinstance(het, HetExperts)
        assert het.layer_index == layer.index
        assert het.device_of() == devices[layer.index]
        assert set(het.groups) == set(devices[layer.index].values())
        for name, group in het.groups.items():
            assert group.device_kind == name
            assert group.ids == sorted(group.ids)
    n_canonical = sum(sum(p.numel() for p in model.get_submodule(l.experts).parameters()) for l in info.moe_layers)
    assert n_canonical == n_routed

    out = logits(model, ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= PARITY_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_recanonicalize_keeps_parity(family):
    model = tiny_model(family)
    info = recognize(model)
    ids = _input_ids(seed=3)
    ref = logits(model, ids)

    canonicalize(model, _split(info, "alternating"))
    assert (logits(model, ids) - ref).abs().max().item() <= PARITY_TOL

    for kind in ("random", "all-analog", "all-digital"):
        devices = _split(info, kind, seed=7)
        canonicalize(model, devices)
        for layer in recognize(model).moe_layers:
            assert model.get_submodule(layer.experts).device_of() == devices[layer.index]
        assert (logits(model, ids) - ref).abs().max().item() <= PARITY_TOL, kind


def test_recanonicalize_with_the_same_devices_keeps_the_groups():
    """Asking for the split a layer already has copies nothing and keeps the groups (and their state)."""
    model = tiny_model("olmoe")
    info = recognize(model)
    devices = _split(info, "alternating")
    canonicalize(model, devices)
    before = {l.index: dict(model.get_submodule(l.experts).groups) for l in info.moe_layers}
    canonicalize(model, devices)
    for layer in info.moe_layers:
        groups = model.get_submodule(layer.experts).groups
        assert all(groups[d] is g for d, g in before[layer.index].items())
    canonicalize(model, _split(info, "all-digital"))
    assert model.get_submodule(info.moe_layers[0].experts).groups["digital"] is not before[0]["digital"]


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_check_is_sensitive(family):
    """Guard against a vacuous parity test: a visible change to one routed expert changes the logits."""
    model = tiny_model(family)
    info = recognize(model)
    ids = _input_ids()
    ref = logits(model, ids)
    canonicalize(model, _split(info, "all-analog"))
    layer = info.moe_layers[-1]
    group = model.get_submodule(layer.experts).groups["analog"]
    with torch.no_grad():
        group.down.mul_(1.5)
    assert (logits(model, ids) - ref).abs().max().item() > 100 * PARITY_TOL


def test_canonicalize_default_devices_are_digital():
    model = tiny_model("olmoe")
    info = recognize(model)
    canonicalize(model)
    for layer in info.moe_layers:
        het = model.get_submodule(layer.experts)
        assert set(het.groups) == {"digital"}
        assert het.device_of() == {e: "digital" for e in range(layer.num_experts)}

    model = tiny_model("olmoe")
    canonicalize(model, {1: {3: "analog"}})
    assert model.get_submodule(info.layer(1).experts).groups["analog"].ids == [3]
    assert set(model.get_submodule(info.layer(0).experts).groups) == {"digital"}


def test_canonicalize_rejects_unknown_device():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="unknown device"):
        canonicalize(model, {0: {0: "gpu"}})


# --------------------------------------------------------------------------------------- the expert-group op


def _routing(seed: int, tokens: int = 20, k: int = 2, num_experts: int = 8, low: int = 0):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([low + torch.randperm(num_experts - low, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    hidden = torch.randn(tokens, 32, generator=gen)
    return hidden, index, weights


def test_routed_slots_groups_pairs_by_local_expert():
    _, index, _ = _routing(0)
    k = index.shape[1]
    expert_ids = torch.tensor([5, 1, 6])
    token, flat_slot, counts = routed_slots(index, expert_ids, 8)

    in_group = torch.isin(index, expert_ids)
    assert sum(counts) == int(in_group.sum()) == token.numel() == flat_slot.numel()
    assert counts == [int((index == e).sum()) for e in expert_ids.tolist()]
    assert torch.equal(token, flat_slot // k)
    assert flat_slot.unique().numel() == flat_slot.numel()
    # Sorted by local expert: the routed expert of each slot, in order, is expert_ids repeated by counts.
    routed = index.reshape(-1)[flat_slot]
    assert torch.equal(routed, torch.repeat_interleave(expert_ids, torch.tensor(counts)))
    # Exactly the pairs routed to the group, nothing else.
    assert set(flat_slot.tolist()) == set(torch.nonzero(in_group.reshape(-1)).squeeze(1).tolist())


def test_routed_slots_empty_group():
    _, index, _ = _routing(0, low=0, num_experts=6)  # experts 0..5 only
    token, flat_slot, counts = routed_slots(index, torch.tensor([6, 7]), 8)
    assert counts == [0, 0]
    assert token.numel() == flat_slot.numel() == 0


def _olmoe_group(ids: list[int], device: str = "digital") -> tuple[torch.nn.Module, ExpertGroup]:
    model = tiny_model("olmoe")
    info = recognize(model)
    experts = model.get_submodule(info.moe_layers[0].experts)
    id_t = torch.tensor(ids)
    weights = canonical_expert_weights(experts, info.adapter.layout, id_t)
    return experts, ExpertGroup(weights, id_t, 8, device, info.adapter.layout.activation, "silu")


def test_expert_group_computes_only_routed_tokens(monkeypatch):
    experts, group = _olmoe_group([1, 4, 6])
    hidden, index, weights = _routing(1)
    rows_seen = []
    real = expert_group_mod.expert_mlp

    def counting(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(expert_group_mod, "expert_mlp", counting)
    with torch.no_grad():
        out = group(hidden, index, weights)

    pairs = int(torch.isin(index, group.expert_ids).sum())
    assert sum(rows_seen) == pairs  # compute scales with routed pairs, not experts x tokens
    assert len(rows_seen) == sum(1 for e in group.ids if (index == e).any())

    # Reference: sum over routed pairs of weight * expert(hidden[token]) with the family's own module maths.
    ref = torch.zeros_like(hidden)
    with torch.no_grad():
        for t in range(index.shape[0]):
            for s in range(index.shape[1]):
                e = int(index[t, s])
                if e in group.ids:
                    gate, up = torch.nn.functional.linear(hidden[t], experts.gate_up_proj[e]).chunk(2)
                    y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[e])
                    ref[t] += weights[t, s] * y
    untouched = ~torch.isin(index, group.expert_ids).any(dim=1)
    assert untouched.any()
    assert torch.equal(out[untouched], torch.zeros_like(out[untouched]))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # measured: 1.2e-7 apart, outputs up to 1.8


def test_expert_group_with_no_routed_tokens_returns_zeros(monkeypatch):
    _, group = _olmoe_group([6, 7], "analog")
    hidden, index, weights = _routing(2, num_experts=6)
    assert not torch.isin(index, group.expert_ids).any()
    calls = []
    monkeypatch.setattr(expert_group_mod, "expert_mlp", lambda *a, **k: calls.append(1))
    out = group(hidden, index, weights)
    assert calls == []
    assert out.shape == hidden.shape
    assert torch.equal(out, torch.zeros_like(hidden))


def test_het_experts_groups_sum_to_original_experts():
    model = tiny_model("gpt_oss")
    info = recognize(model)
    layer = info.moe_layers[0]
    experts = model.get_submodule(layer.experts)
    hidden, index, weights = _routing(4)
    weights = weights / weights.sum(1, keepdim=True)
    with torch.no_grad():
        ref = experts(hidden, index, weights)
    canonicalize(model, _split(info, "random"))
    het = model.get_submodule(layer.experts)
    with torch.no_grad():
        parts = {name: g(hidden, index, weights) for name, g in het.groups.items()}
        total = het(hidden, index, weights)
    assert set(parts) == {"digital", "analog"}
    # measured: the parts sum to the total exactly and to the original experts' output within 6e-8 (outputs up to 2.2)
    torch.testing.assert_close(parts["digital"] + parts["analog"], total, rtol=0, atol=1e-6)
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-6)
    # Each group alone is only a part of the answer: measured 0.58 and 2.1 short of it
    for part in parts.values():
        assert (part - ref).abs().max() > 0.1


def test_het_experts_without_groups_returns_zeros():
    het = HetExperts({}, num_experts=8, layer_index=0)
    hidden, index, weights = _routing(5)
    assert torch.equal(het(hidden, index, weights), torch.zeros_like(hidden))


def test_expert_group_rejects_unknown_device():
    with pytest.raises(ValueError, match="device must be one of"):
        _olmoe_group([0], "gpu")


# ------------------------------------------------------------------------------------------- weight layouts


def test_gpt_oss_canonical_weights_deinterleave_and_transpose():
    model = tiny_model("gpt_oss")
    info = recognize(model)
    experts = model.get_submodule(info.moe_layers[1].experts)
    ids = torch.tensor([5, 0, 2])
    w = canonical_expert_weights(experts, info.adapter.layout, ids)
    inter, hidden = 16, 32
    assert w.gate_up.shape == (3, 2 * inter, hidden)
    assert w.down.shape == (3, hidden, inter)
    assert w.gate_up_bias.shape == (3, 2 * inter)
    assert w.down_bias.shape == (3, hidden)
    for j, e in enumerate(ids.tolist()):
        gu = experts.gate_up_proj[e].detach()  # [H, 2I], gate/up interleaved along the last dim
        gate_ref, up_ref = gu[:, ::2].T, gu[:, 1::2].T
        assert torch.equal(w.gate_up[j, :inter], gate_ref)
        assert torch.equal(w.gate_up[j, inter:], up_ref)
        assert torch.equal(w.down[j], experts.down_proj[e].detach().T)
        b = experts.gate_up_proj_bias[e].detach()
        assert torch.equal(w.gate_up_bias[j], torch.cat([b[::2], b[1::2]]))
        assert torch.equal(w.down_bias[j], experts.down_proj_bias[e].detach())
    # Copies, not views: the model's tensors are untouched when the canonical ones change.
    before = experts.gate_up_proj.detach().clone()
    w.gate_up.add_(1.0)
    assert torch.equal(experts.gate_up_proj.detach(), before)


def test_gpt_oss_canonical_expert_matches_module_math():
    """The de-interleaved weights with the clamped swiglu reproduce GPT-OSS's own expert on random tokens."""
    model = tiny_model("gpt_oss")
    info = recognize(model)
    experts = model.get_submodule(info.moe_layers[0].experts)
    cfg = model.config
    w = canonical_expert_weights(experts, info.adapter.layout, torch.tensor([3]))
    x = 4.0 * torch.randn(10, 32, generator=torch.Generator().manual_seed(0))  # large enough to hit the clamp
    with torch.no_grad():
        ref = experts(x, torch.full((10, 1), 3), torch.ones(10, 1))
        out = expert_group_mod.expert_mlp(
            x,
            w.gate_up[0],
            w.down[0],
            w.gate_up_bias[0],
            w.down_bias[0],
            "gpt_oss_glu",
            "silu",
            cfg.swiglu_alpha,
            cfg.swiglu_limit,
        )
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # measured: equal (outputs up to 8.5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_plain_layout_canonical_weights(family):
    model = tiny_model(family)
    info = recognize(model)
    experts = model.get_submodule(info.moe_layers[0].experts)
    ids = torch.tensor([7, 3])
    w = canonical_expert_weights(experts, info.adapter.layout, ids)
    assert w.gate_up_bias is None and w.down_bias is None
    for j, e in enumerate(ids.tolist()):
        assert torch.equal(w.gate_up[j], experts.gate_up_proj[e].detach())
        assert torch.equal(w.down[j], experts.down_proj[e].detach())


# -------------------------------------------------------------------------------------------------- errors


def test_non_moe_model_is_unsupported():
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError) as exc_info:
        recognize(model)
    msg = str(exc_info.value)
    assert "LlamaForCausalLM" in msg
    assert "'llama'" in msg
    assert "supported model types" in msg
    for model_type in supported_architectures():
        assert model_type in msg
    assert isinstance(exc_info.value, HetMoEError)


def test_model_without_moe_layer_is_rejected():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen2_moe")
    cfg.mlp_only_layers = list(range(cfg.num_hidden_layers))
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match="has no MoE layer") as exc_info:
        recognize(model)
    assert "Qwen2MoeForCausalLM" in str(exc_info.value)


def test_tiny_config_unknown_family():
    with pytest.raises(KeyError, match="olmoe"):
        tiny_config("llama")


def test_load_model_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(HetMoEError, match="no such model directory") as exc_info:
        load_model(str(missing))
    assert str(missing) in str(exc_info.value)


def test_load_model_on_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a model")
    with pytest.raises(HetMoEError, match="is a file, not a model directory") as exc_info:
        load_model(str(f))
    assert "config.json" in str(exc_info.value)


def test_load_model_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(HetMoEError, match="has no config.json") as exc_info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(exc_info.value)


def test_load_model_unloadable_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HetMoEError, match="could not load the model"):
        load_model(str(tmp_path))


# ----------------------------------------------------------------------------------- reference model (real)


def test_reference_model_recognized(ref_model):
    info = recognize(ref_model)
    assert info.family == "olmoe"
    assert info.architecture == "OlmoeForCausalLM"
    assert info.num_layers == 4
    assert [l.index for l in info.moe_layers] == [0, 1, 2, 3]
    for layer in info.moe_layers:
        assert layer.num_experts == 32
        assert layer.top_k == 4
        assert layer.hidden_size == 256
        assert layer.intermediate_size == 128
        assert layer.shared == ()
    assert not ref_model.training


def test_reference_model_canonical_parity(ref_model):
    model = reference_model()  # a private copy: canonicalize works in place
    info = recognize(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    canonicalize(model, _split(info, "random", seed=0))
    # measured: 9.1e-6 apart on logits up to 13.5 (a bound of 1.35e-4)
    assert (logits(model, ids) - ref).abs().max().item() <= PARITY_TOL * max(1.0, ref.abs().max().item())
