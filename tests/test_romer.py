"""ROMER passes: router logit recalibration (percentile maps) and under-used analog expert replacement."""

import numpy as np
import pytest
import torch
from helpers import FAMILIES, logits, norm_rel_err, placed, token_ids

from hetmoe_compile.analog.config import analog_config
from hetmoe_compile.analog.simulate import AnalogExpertGroup, restore_digital, simulate
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.graph.capture import export_model
from hetmoe_compile.models.calibration import Calibration
from hetmoe_compile.models.recognize import recognize
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.peers.romer import (
    RecalibratedRouter,
    RouterCalibration,
    activation_frequencies,
    apply_router_calibration,
    fit_percentile_map,
    fit_router_calibration,
    remove_router_calibration,
    replace_underused_experts,
    restore_replaced_experts,
    router_outputs,
)

IDS = token_ids(2, 12, 128, seed=0)
CALIB = Calibration(token_ids(8, 32, 128, seed=1))
PCM8 = analog_config("pcm", noise_scale=8)


def _identity(info) -> RouterCalibration:
    layers = {
        l.index: {
            "layer": l.index,
            **{
                k: [1.0 if k == "scale" else 0.0] * l.num_experts
                for k in ("scale", "shift", "clean_lo", "clean_hi", "noisy_lo", "noisy_hi")
            },
        }
        for l in info.moe_layers
    }
    return RouterCalibration.from_dict({"layers": list(layers.values()), "percentiles": [5, 95], "seeds": [1000]})


@pytest.mark.parametrize(
    "family, dtype",
    [(f, torch.float32) for f in FAMILIES] + [("olmoe", torch.bfloat16), ("deepseek_v3", torch.bfloat16)],
)
def test_identity_recalibration_routes_exactly_like_the_original_router(family, dtype):
    model, info, _ = placed(family, 0.25, dtype=dtype)
    routers = {l.index: model.get_submodule(l.router) for l in info.moe_layers}
    with torch.no_grad():
        before = model(IDS, output_router_logits=True)
    apply_router_calibration(model, info, _identity(info))
    assert all(isinstance(model.get_submodule(l.router), RecalibratedRouter) for l in info.moe_layers)
    assert recognize(model).moe_layers == info.moe_layers  # weight, top_k read through to the original router
    with torch.no_grad():
        after = model(IDS, output_router_logits=True)
        hidden = torch.randn(5, info.moe_layers[0].hidden_size).to(dtype)
        for layer in info.moe_layers:
            for a, b in zip(routers[layer.index](hidden), model.get_submodule(layer.router)(hidden)):
                assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(after.logits, before.logits)
    # transformers' router-logit recorder (a hook on the original router) sees the wrapped routing
    assert len(after.router_logits) == len(before.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(after.router_logits, before.router_logits))
    remove_router_calibration(model, info)
    assert all(model.get_submodule(l.router) is routers[l.index] for l in info.moe_layers)


def test_percentile_map_takes_noisy_percentiles_onto_clean_ones():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(2000, 4, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 1
    noisy = torch.randn(3000, 4, generator=gen, dtype=torch.float64) * 1.7 - 0.4
    noisy[:, 3] = 2.5  # no spread: the scale cannot be estimated
    m = fit_percentile_map(clean, noisy, (10, 90))
    c = np.percentile(clean.numpy(), [10, 90], axis=0)
    n = np.percentile(noisy.numpy(), [10, 90], axis=0)
    np.testing.assert_allclose(m.scale[:3] * n[:, :3] + m.shift[:3], c[:, :3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.percentile(noisy.numpy() * m.scale + m.shift, [10, 90], axis=0)[:, :3], c[:, :3], atol=1e-12
    )
    assert m.scale[3] == 1.0 and m.shift[3] == pytest.approx(c[:, 3].mean() - 2.5)
    exact = fit_percentile_map(clean, clean * 2 + 3)  # a known affine distortion is undone exactly
    np.testing.assert_allclose(exact.scale, 0.5, rtol=1e-12)
    np.testing.assert_allclose(exact.shift, -1.5, rtol=1e-12)


def test_ideal_preset_fits_identity_maps():
    model, info, _ = placed(fraction=0.0)
    rc = fit_router_calibration(model, info, CALIB, analog_config("ideal"))
    for layer in rc.layers.values():  # noisy = clean, so the percentiles are equal: scale 1, shift 0 exactly (measured)
        assert torch.equal(layer.scale, torch.ones_like(layer.scale))
        assert torch.equal(layer.shift, torch.zeros_like(layer.shift))


def _router_logits(model, info, ids):
    """Each MoE layer's router logits ``[tokens, E]`` in one forward on ``ids``, from our own forward hooks."""
    seen = {}

    def hook(index, experts):
        return lambda module, args, out: seen.__setitem__(index, out[0].detach().float().reshape(-1, experts))

    handles = [
        model.get_submodule(l.router).register_forward_hook(hook(l.index, l.num_experts)) for l in info.moe_layers
    ]
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_pcm_maps_move_noisy_logit_percentiles_toward_clean_ones():
    model, info, _ = placed(fraction=0.0)
    before = logits(model, IDS)
    rc = fit_router_calibration(model, info, CALIB, PCM8)
    assert rc.to_dict() == fit_router_calibration(model, info, CALIB, PCM8).to_dict()  # same seeds, same fit
    assert torch.equal(logits(model, IDS), before)  # left digital, as it came
    assert rc.seeds == (1000,) and rc.percentiles == (5, 95)
    # By hand: the router logits of the clean model and of instance 1000, percentiles over the calibration tokens,
    # and the affine map taking the noisy 5th/95th percentiles onto the clean ones
    clean = _router_logits(model, info, CALIB.input_ids)
    simulate(model, PCM8, 1000, info=info)
    noisy = _router_logits(model, info, CALIB.input_ids)
    restore_digital(model, info)
    scales = []
    for layer in info.moe_layers:
        c = np.percentile(clean[layer.index].numpy(), rc.percentiles, axis=0)
        n = np.percentile(noisy[layer.index].numpy(), rc.percentiles, axis=0)
        scale = (c[1] - c[0]) / (n[1] - n[0])
        fit = rc.layers[layer.index]
        # measured: the percentiles within 6e-8 (float32 storage), the scales within 4.4e-8 (relative), the shifts 2e-9
        for got, want in [(fit.clean_lo, c[0]), (fit.clean_hi, c[1]), (fit.noisy_lo, n[0]), (fit.noisy_hi, n[1])]:
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(fit.scale.numpy(), scale, rtol=2e-6)
        np.testing.assert_allclose(fit.shift.numpy(), c[0] - scale * n[0], rtol=0, atol=1e-7)
        scales.append(scale)
    first, second = (rc.layers[l.index] for l in info.moe_layers)
    # layer 0's router input sees no analog expert: nothing to undo (exactly); layer 1's drifts
    assert torch.equal(first.scale, torch.ones(8)) and torch.equal(first.shift, torch.zeros(8))
    # measured: drifts of 0.046 and 0.041 on logits up to 1.6; the scales move by up to 0.095, the shifts by 0.074
    assert second.lo_drift > 1e-2 and second.hi_drift > 1e-2
    assert float((second.scale - 1).abs().max()) > 3e-2 and float(second.shift.abs().max()) > 3e-2
    summary = rc.to_dict()
    assert summary["scale_min"] == pytest.approx(np.min(scales), rel=2e-6)
    assert summary["scale_max"] == pytest.approx(np.max(scales), rel=2e-6)
    assert summary["seeds"] == [1000]
    apply_router_calibration(model, info, rc)
    _, noisy = router_outputs(model, info, CALIB, PCM8, rc.seeds)
    lo, hi = np.percentile(noisy.logits[1].numpy(), rc.percentiles, axis=0)
    # Layer 1's router input does not depend on its own routing: the mapped noisy percentiles land on the clean ones
    # to float32 rounding (measured: 4e-7 and 7e-7 of the drift)
    assert np.abs(lo - second.clean_lo.numpy()).mean() < 1e-5 * second.lo_drift
    assert np.abs(hi - second.clean_hi.numpy()).mean() < 1e-5 * second.hi_drift
    # the maps reroute some tokens of the clean model: measured 0.072 (relative) on its logits
    assert norm_rel_err(logits(model, IDS), before) > 0.02
    remove_router_calibration(model, info)
    assert torch.equal(logits(model, IDS), before)


@pytest.mark.parametrize("dense", ["digital", "analog"])
def test_fit_leaves_a_simulated_model_on_its_hardware_instance(dense):
    model, info, _ = placed(fraction=0.0)
    simulate(model, PCM8, 3, dense=dense, info=info)
    before = logits(model, IDS)
    rc = fit_router_calibration(model, info, CALIB, PCM8, seeds=(7, 8))
    group = model.get_submodule(info.moe_layers[0].experts).groups["analog"]
    assert isinstance(group, AnalogExpertGroup) and group.seed == 3
    assert torch.equal(logits(model, IDS), before)
    assert rc.seeds == (7, 8) and rc.num_tokens == CALIB.num_tokens


def test_recalibrated_model_exports():
    model, info, _ = placed("olmoe", 0.25)
    apply_router_calibration(model, info, fit_router_calibration(model, info, CALIB, PCM8))
    ep = export_model(model)
    with torch.no_grad():
        # measured: equal (the same aten ops on the same inputs)
        torch.testing.assert_close(ep.module()(IDS, torch.ones_like(IDS)), logits(model, IDS), atol=0, rtol=0)
    assert any(k.endswith("gate.scale") for k in ep.state_dict)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_replacement_copies_popular_experts_into_underused_analog_ones_and_restores(family):
    model, info, _ = placed(family, 0.25)
    simulate(model, PCM8, 5, info=info)
    before = logits(model, IDS)
    restore_digital(model, info)
    clean_before = logits(model, IDS)
    hets = {l.index: model.get_submodule(l.experts) for l in info.moe_layers}
    groups = {i: {d: g for d, g in het.groups.items()} for i, het in hets.items()}
    weights = {
        (i, d): {
            n: getattr(g, n).clone()
            for n in ("gate_up", "down", "gate_up_bias", "down_bias")
            if getattr(g, n) is not None
        }
        for i, gs in groups.items()
        for d, g in gs.items()
    }
    clean, noisy = activation_frequencies(model, info, CALIB, PCM8)
    simulate(model, PCM8, 5, info=info)
    reps = replace_underused_experts(model, info, CALIB, PCM8, threshold=0.5)
    assert model.get_submodule(info.moe_layers[0].experts).groups["analog"].seed == 5  # re-programmed
    assert reps
    after = logits(model, IDS)
    restore_digital(model, info)  # while simulated, the ideal weights' storage holds the programmed tiles
    for layer in info.moe_layers:
        i, e_count = layer.index, layer.num_experts
        f = noisy[i]
        analog = groups[i]["analog"].ids
        expected = sorted((e for e in analog if f[e] < 0.5 / e_count), key=lambda e: (float(f[e]), e))
        mine = [r for r in reps if r.layer == i]
        assert [r.expert for r in mine] == expected  # least used first
        sources = sorted((e for e in range(e_count) if e not in expected), key=lambda e: (-float(f[e]), e))
        assert [r.source for r in mine] == sources[: len(expected)]
        for r in mine:
            assert r.frequency == float(f[r.expert]) and r.clean_frequency == float(clean[i][r.expert])
            assert r.source_frequency == float(f[r.source])
            dev = next(d for d, g in groups[i].items() if r.source in g.ids)
            assert r.source_device == dev
            src_local = groups[i][dev].ids.index(r.source)
            dst_local = analog.index(r.expert)
            for name in weights[(i, "analog")]:
                assert torch.equal(getattr(groups[i]["analog"], name)[dst_local], weights[(i, dev)][name][src_local])
        for local, e in enumerate(analog):  # everything else untouched
            if e not in expected:
                assert torch.equal(groups[i]["analog"].gate_up[local], weights[(i, "analog")]["gate_up"][local])
        assert torch.equal(groups[i]["digital"].gate_up, weights[(i, "digital")]["gate_up"])
    # 3 of the 12 analog experts of each model now compute another one: measured 0.30 (olmoe), 0.20 (gpt_oss) apart
    assert norm_rel_err(after, before) > 0.05
    simulate(model, PCM8, 5, info=info)  # the programmed tiles are those of the new weights
    assert torch.equal(logits(model, IDS), after)
    restore_replaced_experts(model, info, reps)
    simulate(model, PCM8, 5, info=info)
    assert torch.equal(logits(model, IDS), before)
    restore_digital(model, info)
    assert torch.equal(logits(model, IDS), clean_before)
    assert [r.to_dict()["expert"] for r in reps] == [r.expert for r in reps]


def test_replacement_cap_and_threshold():
    model, info, _ = placed(fraction=0.0)
    _, noisy = activation_frequencies(model, info, CALIB, PCM8)
    capped = replace_underused_experts(model, info, CALIB, PCM8, threshold=1.0, max_per_layer=1)
    assert len(capped) == len(info.moe_layers)
    for r in capped:
        assert r.expert == int(np.argmin(noisy[r.layer].numpy())) and r.source == int(np.argmax(noisy[r.layer]))
    restore_replaced_experts(model, info, capped)
    assert replace_underused_experts(model, info, CALIB, PCM8, threshold=1e-9) == []


def test_bad_inputs_name_the_fix():
    model = tiny_model("olmoe")
    info = recognize(model)
    with pytest.raises(HetMoEError, match="canonical, placed model.*call canonicalize"):
        fit_router_calibration(model, info, CALIB, PCM8)
    with pytest.raises(HetMoEError, match="canonical, placed model"):
        replace_underused_experts(model, info, CALIB, PCM8)
    model, info, _ = placed(fraction=0.0)
    for threshold in (0, -0.1, 1.5):
        with pytest.raises(HetMoEError, match=r"threshold must be in \(0, 1\]"):
            replace_underused_experts(model, info, CALIB, PCM8, threshold=threshold)
    empty = Calibration(torch.zeros(0, 8, dtype=torch.long))
    for fn in (fit_router_calibration, replace_underused_experts):
        with pytest.raises(HetMoEError, match="needs calibration tokens.*calibration_from_text"):
            fn(model, info, empty, PCM8)
        with pytest.raises(HetMoEError, match="needs calibration tokens"):
            fn(model, info, None, PCM8)
        with pytest.raises(HetMoEError, match="at least one calibration seed"):
            fn(model, info, CALIB, PCM8, seeds=())
    for pct in ((95, 5), (-1, 50), (5, 101), (50, 50), (5,)):
        with pytest.raises(HetMoEError, match="percentiles must"):
            fit_router_calibration(model, info, CALIB, PCM8, percentiles=pct)
    with pytest.raises(HetMoEError, match="max_per_layer must be >= 0"):
        replace_underused_experts(model, info, CALIB, PCM8, max_per_layer=-1)
    apply_router_calibration(model, info, _identity(info))
    with pytest.raises(HetMoEError, match="recalibrated already; call remove_router_calibration"):
        fit_router_calibration(model, info, CALIB, PCM8)
    remove_router_calibration(model, info)
    other, other_info, _ = placed("qwen2_moe", 0.0)
    with pytest.raises(HetMoEError, match="covers MoE layers .* fit it on this model"):
        apply_router_calibration(other, other_info, _identity(info))
