"""AIMC simulation: presets, programming, the tiled MVM against aihwkit, the analog expert-group op, simulate()
and the rewrite_analog graph pass."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import FAMILIES, norm_rel_err, placed

from hetmoe_compile.analog import AnalogConfig, analog_config, analog_matmul, program_matrix, restore_digital, simulate
from hetmoe_compile.analog.aihwkit_reference import aihwkit_linear
from hetmoe_compile.analog.instance import program_group
from hetmoe_compile.analog.tiles import split_sizes
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.compose.pipeline import place_model
from hetmoe_compile.graph.capture import export_placed
from hetmoe_compile.graph.passes import PLACEMENT_META, RewriteAnalogPass, is_expert_group
from hetmoe_compile.models import recognize
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.placement import PlacementPolicy

# ---- configuration -------------------------------------------------------------------------------------------


def test_presets_and_json_round_trip():
    for name in ("pcm", "dac-adc", "gaussian", "reram-wan2022", "reram-cmo", "hermes-pcm", "ideal"):
        cfg = analog_config(name, noise_scale=1.5, t_inference=86400)
        assert AnalogConfig.from_json(cfg.to_json()) == cfg
    assert analog_config("ideal").is_ideal and not analog_config("pcm").is_ideal
    from hetmoe_compile.analog import PRESET_SUMMARIES, PRESETS

    assert list(PRESET_SUMMARIES) == list(PRESETS)  # --help lists the summaries: one per preset, same order
    assert analog_config("pcm").dac_bits == 8 and analog_config("pcm").tile_size == 512


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(preset="magic"),
            "unknown noise preset 'magic'; choose one of pcm, dac-adc, gaussian, standard-hwa, reram-wan2022, "
            "reram-cmo, hermes-pcm, ideal",
        ),
        (dict(preset="pcm", noise_management="none"), "noise_management must be one of abs-max, constant"),
        (dict(preset="pcm", noise_scale=-1), "noise scale must be >= 0"),
        (dict(preset="pcm", t_inference=0), "t_inference must be > 0"),
        (dict(preset="pcm", w_noise=-0.1), "w_noise and ir_drop must be >= 0"),
        (dict(preset="pcm", w_noise_type="pink"), "w_noise_type must be one of pcm-read, additive"),
        (dict(preset="pcm", ir_drop="high"), "ir_drop='high' must be a number"),
        (dict(preset="pcm", device="flash"), "device must be one of pcm, reram-wan2022, reram-cmo, hermes-pcm"),
        (dict(preset="pcm", drift_compensation_type="row"), "drift_compensation_type must be one of global, per-colu"),
        (
            dict(preset="reram-wan2022", t_inference=3600),
            "t_inference 3600 s: the reram-wan2022 device is characterised at 1, 86400 and 172800 s only",
        ),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(HetMoEError, match=message):
        analog_config(**kwargs)
    with pytest.raises(HetMoEError, match="unknown analog config key"):
        AnalogConfig.from_dict({"preset": "pcm", "bogus": 1})


# ---- programming and the tiled MVM --------------------------------------------------------------------------


def test_tiles_split_like_aihwkit():
    assert split_sizes(700, 512) == (2, 350)
    assert split_sizes(512, 512) == (1, 512)
    assert split_sizes(1025, 512) == (3, 342)
    prog = program_matrix(torch.randn(600, 700), analog_config("pcm"), seed=0)
    assert prog.weight.shape == (600, 2, 350) and prog.scale.shape == (600, 2)


def test_ideal_matmul_is_exact_and_per_row_scaled():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 700, generator=gen)
    w[3] *= 1000.0  # a huge neuron must not compress the others
    x = torch.randn(16, 700, generator=gen)
    prog = program_matrix(w, analog_config("ideal"), seed=0)
    assert prog.weight.abs().max() <= 1.0 + 1e-6
    # float32 sums of 700 products in another order: relative rounding up to a few 1e-5 on the 1000x row
    torch.testing.assert_close(analog_matmul(x, prog, analog_config("ideal")), x @ w.T, rtol=1e-4, atol=1e-3)


def test_programming_is_seeded_and_isolated():
    w = torch.randn(64, 128)
    cfg = analog_config("pcm")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = program_matrix(w, cfg, seed=5)
    assert torch.equal(torch.rand(1), before)  # the global RNG stream is untouched
    b = program_matrix(w, cfg, seed=5)
    c = program_matrix(w, cfg, seed=6)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize("preset", ["dac-adc", "pcm"])
def test_relative_mvm_error_agrees_with_aihwkit(preset):
    """Same weights, same preset: mean relative MVM error over 20 instances within 5 % of aihwkit's tiles."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 700, generator=gen) * 0.05  # two input tiles, as aihwkit maps it
    x = torch.randn(48, 700, generator=gen)
    ref = x @ w.T
    cfg = analog_config(preset)
    ours, theirs = [], []
    for seed in range(20):
        ours.append(
            norm_rel_err(analog_matmul(x, program_matrix(w, cfg, seed), cfg, torch.Generator().manual_seed(seed)), ref)
        )
        with torch.no_grad():
            theirs.append(norm_rel_err(aihwkit_linear(w, cfg, seed)(x), ref))
    ratio = np.mean(ours) / np.mean(theirs)
    assert abs(ratio - 1) < 0.05, (np.mean(ours), np.mean(theirs))


def test_the_transcribed_native_forward_equals_aihwkits_pytorch_tile():
    """The reference for IR drop and short-term weight noise (a transcription of aihwkit's C++ forward, whose
    tiles do not load under the pinned torch) gives aihwkit's PyTorch tile output for output where both apply:
    DAC and ADC on, noise off, three input tiles."""
    from hetmoe_compile.analog.aihwkit_reference import native_tile_forward

    gen = torch.Generator().manual_seed(6)
    w, x = torch.randn(40, 1100, generator=gen) * 0.05, torch.randn(24, 1100, generator=gen)
    cfg = analog_config("dac-adc", out_noise=0.0)
    with torch.no_grad():
        theirs = aihwkit_linear(w, cfg, 0)(x).double().numpy()
    ours = native_tile_forward(x.numpy(), w.numpy(), cfg)
    step = cfg.out_res * 2 * cfg.out_bound * float(x.abs().max()) * float(w.abs().max())  # one ADC step, at most
    assert np.abs(ours - theirs).max() < step and np.mean(np.abs(ours - theirs) > 1e-5) < 0.01


@pytest.mark.parametrize("preset, ir_drop", [("ideal", 1.0), ("ideal", 3.0), ("dac-adc", 1.0)])
def test_ir_drop_equals_aihwkits_native_forward(preset, ir_drop):
    """IR drop is deterministic: on exact devices the tiled MVM equals aihwkit's C++ forward (transcribed) output
    for output, converters off (to float rounding) and on (all but ADC rounding ties), three input tiles with a
    shorter last one, where the drop profile is per tile."""
    from hetmoe_compile.analog.aihwkit_reference import native_tile_forward

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 1100, generator=gen) * 0.05
    x = torch.randn(24, 1100, generator=gen)
    cfg = analog_config(preset, ir_drop=ir_drop, out_noise=0.0)
    ours = analog_matmul(x, program_matrix(w, cfg, 0), cfg).double().numpy()
    theirs = native_tile_forward(x.numpy(), w.numpy(), cfg)
    ideal = (x @ w.T).double().numpy()
    assert norm_rel_err(theirs, ideal) > 0.004 * ir_drop  # the drop is there, and grows with ir_drop
    scale = np.abs(ideal).max()
    if preset == "ideal":
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
    else:
        assert np.mean(np.abs(ours - theirs) > 1e-4 * scale) < 0.01


def _saturating(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights whose first rows follow the inputs' signs, so those outputs saturate the ADC (out_bound 10)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 1100, generator=gen) * 0.05
    x = torch.randn(24, 1100, generator=gen)
    w[:8] = x[:3].sum(0).sign() * 0.05
    return w, x


@pytest.mark.parametrize("out_noise", [0.0, 0.04])
def test_bound_management_per_token_and_tile_follows_aihwkits_native_forward(out_noise):
    """Iterative bound management, per (tile, token) as aihwkit's C++ ``forwardVector`` does it (its PyTorch tile
    re-runs the whole batch instead): without output noise the outputs equal the transcribed forward's but for
    rounding ties; with it, the mean relative error over 20 MVMs is within 5 %; either way far below the
    saturated error without bound management."""
    from hetmoe_compile.analog.aihwkit_reference import native_tile_forward

    w, x = _saturating()
    ref = (x.double() @ w.double().T).numpy()
    cfg = analog_config("dac-adc", out_noise=out_noise, bound_management="iterative")
    prog = program_matrix(w, cfg, 0)
    plain = analog_config("dac-adc", out_noise=out_noise)
    saturated = norm_rel_err(
        analog_matmul(x, program_matrix(w, plain, 0), plain, torch.Generator().manual_seed(0)), ref
    )
    if out_noise == 0:
        ours = analog_matmul(x, prog, cfg).double().numpy()
        theirs = native_tile_forward(x.numpy(), w.numpy(), cfg)
        assert np.mean(np.abs(ours - theirs) > 1e-3 * np.abs(ref).max()) < 0.01
        assert norm_rel_err(ours, ref) < 0.1 * saturated
    else:
        gen_mvm, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        ours_err = [norm_rel_err(analog_matmul(x, prog, cfg, gen_mvm), ref) for _ in range(20)]
        theirs_err = [norm_rel_err(native_tile_forward(x.numpy(), w.numpy(), cfg, rng), ref) for _ in range(20)]
        assert abs(np.mean(ours_err) / np.mean(theirs_err) - 1) < 0.05, (np.mean(ours_err), np.mean(theirs_err))
        assert np.mean(ours_err) < 0.1 * saturated


@pytest.mark.parametrize("kind", ["pcm-read", "additive"])
def test_short_term_weight_noise_agrees_with_aihwkits_native_forward(kind):
    """``w_noise`` per MVM (converters on, exact devices): mean relative MVM error over 20 MVMs within 5 % of
    aihwkit's C++ forward (transcribed), a fresh draw at every MVM, and larger than without it."""
    from hetmoe_compile.analog.aihwkit_reference import native_tile_forward

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 700, generator=gen) * 0.05
    x = torch.randn(48, 700, generator=gen)
    ref = x @ w.T
    cfg = analog_config("dac-adc", w_noise=0.05, w_noise_type=kind)
    prog = program_matrix(w, cfg, 0)
    gen_mvm = torch.Generator().manual_seed(0)
    ours = [norm_rel_err(analog_matmul(x, prog, cfg, gen_mvm), ref) for _ in range(20)]
    rng = np.random.default_rng(0)
    theirs = [norm_rel_err(native_tile_forward(x.numpy(), w.numpy(), cfg, rng), ref) for _ in range(20)]
    base = analog_config("dac-adc")
    without = norm_rel_err(analog_matmul(x, program_matrix(w, base, 0), base, torch.Generator().manual_seed(0)), ref)
    assert len(set(ours)) == 20 and np.mean(ours) > 2 * without
    assert abs(np.mean(ours) / np.mean(theirs) - 1) < 0.05, (np.mean(ours), np.mean(theirs))


@pytest.mark.parametrize("out_noise", [0.0, 0.04], ids=["weight-noise-only", "with-output-noise"])
@pytest.mark.parametrize("kind", ["pcm-read", "additive"])
def test_weight_and_output_noise_are_one_gaussian_of_their_summed_variance(kind, out_noise):
    """The short-term weight noise and the output noise are drawn as one normal per output: on exact devices
    without converters, the residuals ``y - x W^T`` over the predicted standard deviation of each output
    (``nm s_i sqrt(w_noise^2 sum_j |w_ij / s_i| a_j^2 + out_noise^2)``, ``a = x / nm``; ``a_j^2`` for additive
    noise) have mean 0 and standard deviation 1 (92,160 residuals)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 300, generator=gen) * 0.05
    x = torch.randn(48, 300, generator=gen)
    cfg = analog_config("ideal", w_noise=0.05, w_noise_type=kind, out_noise=out_noise)
    prog = program_matrix(w, cfg, 0)  # one tile, the weights exact
    s = w.abs().amax(1)  # [out]: each row's scale
    nm = x.abs().amax(1, keepdim=True)  # [n, 1]: abs-max noise management
    a = x / nm
    wn = (w.abs() / s[:, None]) if kind == "pcm-read" else torch.ones_like(w)
    std = nm * s * (0.05**2 * (a * a) @ wn.T + out_noise**2).sqrt()
    mvm = torch.Generator().manual_seed(1)
    z = torch.cat([(analog_matmul(x, prog, cfg, mvm) - x @ w.T) / std for _ in range(10)])
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01, (float(z.mean()), float(z.std()))


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # inside aihwkit's Hermes model
@pytest.mark.parametrize("preset", ["reram-wan2022", "reram-cmo", "hermes-pcm"])
def test_device_presets_agree_with_aihwkit(preset):
    """Each device preset: mean relative MVM error over 20 instances within 5 % of aihwkit's tiles with that
    noise model, at the preset's time (and for Wan 2022 at 1 s); instances are seeded and differ."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 700, generator=gen) * 0.05
    x = torch.randn(48, 700, generator=gen)
    ref = x @ w.T
    times = [None, 1.0] if preset == "reram-wan2022" else [None]
    for cfg in [analog_config(preset, t_inference=t) for t in times]:
        ours = [
            norm_rel_err(analog_matmul(x, program_matrix(w, cfg, s), cfg, torch.Generator().manual_seed(s)), ref)
            for s in range(20)
        ]
        with torch.no_grad():
            theirs = [norm_rel_err(aihwkit_linear(w, cfg, s)(x), ref) for s in range(20)]
        assert len(set(ours)) == 20
        assert abs(np.mean(ours) / np.mean(theirs) - 1) < 0.05, (cfg.t_inference, np.mean(ours), np.mean(theirs))
    a, b = program_matrix(w, cfg, 3), program_matrix(w, cfg, 3)
    assert torch.equal(a.weight, b.weight)


def test_per_column_drift_compensation_agrees_with_aihwkit():
    """``drift_compensation_type="per-column"`` (one factor per output of each tile, aihwkit's
    ``PerColumnDriftCompensation``): within 5 % of aihwkit's tiles over 20 instances, and not the global factor."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 700, generator=gen) * 0.05
    x = torch.randn(48, 700, generator=gen)
    ref = x @ w.T
    cfg = analog_config("pcm", t_inference=86400, drift_compensation_type="per-column")
    ours = [
        norm_rel_err(analog_matmul(x, program_matrix(w, cfg, s), cfg, torch.Generator().manual_seed(s)), ref)
        for s in range(20)
    ]
    with torch.no_grad():
        theirs = [norm_rel_err(aihwkit_linear(w, cfg, s)(x), ref) for s in range(20)]
    assert abs(np.mean(ours) / np.mean(theirs) - 1) < 0.05, (np.mean(ours), np.mean(theirs))
    glob = program_matrix(w, analog_config("pcm", t_inference=86400), 0)
    per = program_matrix(w, cfg, 0)
    assert torch.equal(glob.weight, per.weight) and not torch.allclose(glob.scale, per.scale)


@pytest.mark.parametrize("drift", [False, True])
def test_fused_pcm_statistics_match_aihwkit(drift):
    """The fused programming step draws weights with aihwkit's distribution (programming, drift, read noise)."""
    from aihwkit.inference import PCMLikeNoiseModel

    from hetmoe_compile.analog.pcm_fused import pcm_program

    gen = torch.Generator().manual_seed(4)
    target = torch.rand(1, 256, 256, generator=gen) * 2 - 1
    ours, _ = pcm_program(target, [11], noise_scale=1.0, programming=True, drift=drift, t_inference=3600.0)
    model = PCMLikeNoiseModel()
    torch.manual_seed(11)
    ref, nu = model.apply_programming_noise(target[0])
    if drift:
        ref = model.apply_drift_noise(ref, nu, 3600.0)
    err_ours, err_ref = (ours[0] - target[0]), (ref - target[0])
    assert err_ours.std().item() == pytest.approx(err_ref.std().item(), rel=0.03)
    assert err_ours.mean().item() == pytest.approx(err_ref.mean().item(), abs=0.1 * err_ref.std().item())
    # the conductance-dependent spread: small and large weights see different noise, as in aihwkit
    small, large = target[0].abs() < 0.2, target[0].abs() > 0.8
    for mask in (small, large):
        assert err_ours[mask].std().item() == pytest.approx(err_ref[mask].std().item(), rel=0.06)


def test_noise_scale_and_drift_increase_error():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 256, generator=gen), torch.randn(32, 256, generator=gen)
    ref = x @ w.T

    def err(cfg):
        return np.mean(
            [
                norm_rel_err(analog_matmul(x, program_matrix(w, cfg, s), cfg, torch.Generator().manual_seed(s)), ref)
                for s in range(5)
            ]
        )

    assert err(analog_config("pcm", noise_scale=2.5)) > err(analog_config("pcm", noise_scale=1.0))
    assert err(analog_config("gaussian", noise_scale=2.0)) > err(analog_config("gaussian"))
    assert err(analog_config("dac-adc")) < err(analog_config("pcm"))


def test_program_group_common_random_numbers():
    """An expert's programmed weights depend only on (seed, layer, expert, matrix), not on its group."""
    gen = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(4, 32, 16, generator=gen), torch.randn(4, 16, 16, generator=gen)
    cfg = analog_config("pcm")
    full = program_group(gate_up, down, torch.tensor([1, 3, 5, 7]), cfg, seed=9, layer=2)
    part = program_group(gate_up[2:3], down[2:3], torch.tensor([5]), cfg, seed=9, layer=2)
    assert torch.equal(full["gate_up_weight"][2], part["gate_up_weight"][0])
    assert torch.equal(full["down_scale"][2], part["down_scale"][0])
    other_layer = program_group(gate_up[2:3], down[2:3], torch.tensor([5]), cfg, seed=9, layer=3)
    assert not torch.equal(other_layer["gate_up_weight"][0], part["gate_up_weight"][0])


# ---- simulate() on models ------------------------------------------------------------------------------------


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES)
def test_simulate_ideal_is_exact_noisy_is_seeded(family):
    model, info, _ = placed(family)
    with torch.no_grad():
        clean = model(input_ids=IDS).logits
        simulate(model, analog_config("ideal"), seed=0)
        assert torch.equal(model(input_ids=IDS).logits, clean)
        cfg = analog_config("pcm")
        simulate(model, cfg, seed=0)
        a = model(input_ids=IDS).logits
        simulate(model, cfg, seed=0)
        b = model(input_ids=IDS).logits
        simulate(model, cfg, seed=1)
        c = model(input_ids=IDS).logits
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, clean)
        restore_digital(model)
        assert torch.equal(model(input_ids=IDS).logits, clean)


NOISE_FREE = analog_config(
    "pcm", programming_noise=False, drift=False, dac_bits=0, adc_bits=0, out_noise=0.0, tile_size=16
)  # the physics with every effect off; 16x16 tiles: each tiny matrix spans several, summed digitally


@pytest.fixture
def forced_analog(monkeypatch):
    """The analog op runs even on a noise-free config (``is_ideal`` normally routes it to the digital op)."""
    monkeypatch.setattr(AnalogConfig, "is_ideal", property(lambda self: False))
    return NOISE_FREE


@pytest.mark.parametrize("grouped", ["0", "1"], ids=["loop", "grouped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_analog_path_without_noise_or_converters_equals_clean(family, grouped, forced_analog, monkeypatch):
    """Programming (per-row scaling onto tiles), routing, the tiled MVMs and the digital tile sums with every
    effect off: the clean logits to float rounding, on every family and on both expert-group paths."""
    monkeypatch.setenv("HETMOE_GROUPED_MM", grouped)
    model, info, _ = placed(family)
    with torch.no_grad():
        clean = model(input_ids=IDS).logits
        simulate(model, forced_analog, seed=0)
        assert all(
            type(model.get_submodule(layer.experts).groups["analog"]).__name__ == "AnalogExpertGroup"
            for layer in info.moe_layers
        )
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, clean, rtol=0, atol=1e-5)
    assert not torch.equal(got, clean)  # the tiles' float sums in another order: not the digital op itself


@pytest.mark.parametrize("family", FAMILIES)
def test_ir_drop_weight_noise_and_bound_management_on_both_expert_group_paths(family, monkeypatch):
    """IR drop and bound management (deterministic without noise; a low out_bound so that outputs saturate and
    are re-run) give the same logits on the per-expert loop and the grouped GEMM path; with short-term weight
    noise on top, each path repeats under its seed and another seed differs."""
    managed = dict(tile_size=16, ir_drop=2.0, out_bound=0.5, bound_management="iterative")
    ir = analog_config("pcm", programming_noise=False, drift=False, out_noise=0.0, **managed)
    noisy = analog_config("pcm", w_noise=0.02, **managed)
    model, info, _ = placed(family)
    out = {}
    with torch.no_grad():
        clean = model(input_ids=IDS).logits
        for grouped in ("0", "1"):
            monkeypatch.setenv("HETMOE_GROUPED_MM", grouped)
            simulate(model, ir, seed=0)
            out[grouped] = model(input_ids=IDS).logits
            simulate(model, noisy, seed=0)
            a = model(input_ids=IDS).logits
            simulate(model, noisy, seed=0)
            b = model(input_ids=IDS).logits
            simulate(model, noisy, seed=1)
            assert torch.equal(a, b) and not torch.equal(a, model(input_ids=IDS).logits)
        restore_digital(model)
        simulate(model, replace(ir, bound_management="none"), seed=0)
        unmanaged = model(input_ids=IDS).logits
        restore_digital(model)
    torch.testing.assert_close(out["0"], out["1"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["0"], clean, atol=1e-4)
    assert (out["0"] - clean).abs().max() < (unmanaged - clean).abs().max()  # re-runs undo saturation


def test_simulate_only_touches_analog_experts():
    model, info, placement = placed("qwen2_moe")
    het = model.get_submodule(info.moe_layers[0].experts)
    digital_before = het.groups["digital"]
    simulate(model, analog_config("pcm"), seed=0)
    assert het.groups["digital"] is digital_before
    assert type(het.groups["analog"]).__name__ == "AnalogExpertGroup"
    assert het.groups["analog"].ids == placement.layers[0].ids("analog")


def test_dense_on_analog_ablation_swaps_dense_linears():
    model, info, _ = placed("qwen2_moe")
    simulate(model, analog_config("pcm"), seed=0, dense="analog")
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "AnalogLinear"}
    assert any(".self_attn.q_proj" in n for n in swapped) and "lm_head" in swapped
    assert any(".shared_expert." in n for n in swapped)
    assert not any(".gate" == n[-5:] for n in swapped)  # routers stay digital
    restore_digital(model)
    assert not any(type(m).__name__ == "AnalogLinear" for m in model.modules())


def test_simulate_needs_canonical_model():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="canonical model"):
        simulate(model, analog_config("pcm"))


# ---- graph path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_analog_pass_matches_eager_simulation(family):
    model = tiny_model(family)
    info = recognize(model)
    placement = place_model(model, PlacementPolicy(0.25), info=info)
    gm = export_placed(model, placement, info).module()
    cfg = analog_config("pcm")
    result = RewriteAnalogPass(cfg, seed=3)(gm)
    assert result.modified
    nodes = list(result.graph_module.graph.nodes)
    analog_ops = [n for n in nodes if "analog_expert_group" in str(n.target)]
    assert len(analog_ops) == len(info.moe_layers)
    assert all(n.meta[PLACEMENT_META].device == "digital" for n in nodes if is_expert_group(n))  # digital untouched
    assert all("AIMC pcm, seed 3" in n.meta[PLACEMENT_META].reason for n in analog_ops)
    simulate(model, cfg, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            result.graph_module(IDS, torch.ones_like(IDS)), model(input_ids=IDS).logits, rtol=0, atol=0
        )


def test_simulated_model_runs_under_torch_compile():
    model, info, _ = placed("olmoe")
    simulate(model, analog_config("gaussian"), seed=0)  # no quantisation: compiled numerics stay close
    with torch.no_grad():
        eager = model(input_ids=IDS).logits
        simulate(model, analog_config("gaussian"), seed=0)
        compiled = torch.compile(model)(input_ids=IDS).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
