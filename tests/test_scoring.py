"""Expert selectors against hand-written references, calibration, and the PCM programming-noise model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import FAMILIES
from torch.utils._python_dispatch import TorchDispatchMode

from hetmoe_compile.analog.programming_noise import program_rows, stream_seed
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.models import recognize
from hetmoe_compile.models.calibration import Calibration, calibration_from_text
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.scoring import base as scoring_base
from hetmoe_compile.scoring import check_selectors, get_selector, score, score_all, selectors
from hetmoe_compile.scoring.max_neuron_norm import max_neuron_norms
from hetmoe_compile.transforms.canonicalize import canonicalize

DATA_FREE = ("max-neuron-norm", "router-norm", "random")
DATA_DRIVEN = ("activation-frequency", "activation-weight", "expected-damage", "measured")


def _calib_ids(seed: int = 0, windows: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(2, 128, (windows, length), generator=torch.Generator().manual_seed(seed))


def _mixed_split(info, seed: int = 11) -> dict[int, dict[int, str]]:
    rng = np.random.default_rng(seed)
    return {
        l.index: {e: ("digital", "analog")[int(rng.integers(2))] for e in range(l.num_experts)} for l in info.moe_layers
    }


def _naive_max_neuron_norm(model, info) -> dict[int, np.ndarray]:
    """By hand, one expert at a time: gate [I,H], up [I,H], down [H,I] ([out, in]) from the stored layout."""
    out = {}
    for layer in info.moe_layers:
        experts = model.get_submodule(layer.experts)
        gate_up = experts.gate_up_proj.detach().double()
        down_all = experts.down_proj.detach().double()
        inter, hidden = layer.intermediate_size, layer.hidden_size
        scores = []
        for e in range(layer.num_experts):
            if info.model_type == "gpt_oss":  # [H, 2I] with gate/up interleaved; down [I, H]
                gate, up, down = gate_up[e][:, ::2].T, gate_up[e][:, 1::2].T, down_all[e].T
            else:  # [2I, H] gate block then up block; down [H, I]
                gate, up, down = gate_up[e][:inter], gate_up[e][inter:], down_all[e]
            assert gate.shape == up.shape == (inter, hidden)
            assert down.shape == (hidden, inter)
            product = 1.0
            for w in (gate, up, down):
                product *= max(math.sqrt(sum(float(v) ** 2 for v in row)) for row in w.tolist())
            scores.append(product)
        out[layer.index] = np.array(scores)
    return out


def _hook_routing(model, info, input_ids: torch.Tensor, batch: int = 8) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Independent reference: what each experts module receives, via our own forward pre-hooks."""
    seen: dict[int, list] = {l.index: [] for l in info.moe_layers}
    handles = []
    for layer in info.moe_layers:

        def hook(module, args, index=layer.index):
            seen[index].append((args[1].detach().clone(), args[2].detach().float().clone()))

        handles.append(model.get_submodule(layer.experts).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch):
                model(input_ids=input_ids[start : start + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for i, v in seen.items()}


# ----------------------------------------------------------------------------------------- max-neuron-norm


@pytest.mark.parametrize("family", FAMILIES)
def test_max_neuron_norm_matches_naive_reference(family):
    model = tiny_model(family)
    info = recognize(model)
    ref = _naive_max_neuron_norm(model, info)
    got = score(model, info, "max-neuron-norm")
    assert got.selector == "max-neuron-norm"
    assert got.seconds >= 0
    assert set(got.layers) == {l.index for l in info.moe_layers}
    for index, expected in ref.items():
        assert got.layers[index].shape == (8,)
        np.testing.assert_allclose(got.layers[index], expected, rtol=1e-6)
    # The tiny models' per-expert scale spread makes the scores distinct (a useful ranking).
    assert len(set(np.round(np.concatenate(list(ref.values())), 12))) == sum(len(v) for v in ref.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_max_neuron_norm_same_on_canonical_model(family):
    model = tiny_model(family)
    info = recognize(model)
    before = score(model, info, "max-neuron-norm").layers
    components = {
        l.index: max_neuron_norms(model.get_submodule(l.experts), info.adapter.layout) for l in info.moe_layers
    }
    canonicalize(model, _mixed_split(info))
    cinfo = recognize(model)
    after = score(model, cinfo, "max-neuron-norm").layers
    for layer in cinfo.moe_layers:
        het = model.get_submodule(layer.experts)
        assert set(het.groups) == {"digital", "analog"}
        # float32 reductions: strided (GPT-OSS columns) and contiguous rows may differ in the last bits
        np.testing.assert_allclose(after[layer.index], before[layer.index], rtol=1e-6)
        parts = max_neuron_norms(het, cinfo.adapter.layout)
        for k in ("gate", "up", "down"):
            torch.testing.assert_close(parts[k], components[layer.index][k], rtol=1e-6, atol=0)


def test_max_neuron_norm_gpt_oss_uses_columns_not_rows():
    """Transposed storage: scaling one stored *column* (one neuron) changes exactly that expert's score."""
    model = tiny_model("gpt_oss")
    info = recognize(model)
    before = score(model, info, "max-neuron-norm").layers[0]
    experts = model.get_submodule(info.moe_layers[0].experts)
    with torch.no_grad():
        experts.gate_up_proj[2][:, 1] *= 50.0  # one up neuron (odd column) of expert 2
    after = score(model, info, "max-neuron-norm").layers[0]
    norms = max_neuron_norms(experts, info.adapter.layout)
    # the by-hand reference reads the stored columns of the changed tensor (measured: 1e-7 apart)
    np.testing.assert_allclose(after, _naive_max_neuron_norm(model, info)[0], rtol=1e-6)
    assert after[2] > 10 * before[2]
    np.testing.assert_allclose(np.delete(after, 2), np.delete(before, 2), rtol=1e-12)
    assert norms["up"][2] == pytest.approx(torch.linalg.vector_norm(experts.gate_up_proj[2][:, 1].double()).item())


# -------------------------------------------------------------------------------------- router-norm / random


@pytest.mark.parametrize("family", FAMILIES)
def test_router_norm_is_router_row_norm(family):
    model = tiny_model(family)
    info = recognize(model)
    got = score(model, info, "router-norm").layers
    for layer in info.moe_layers:
        w = model.get_submodule(layer.router).weight.detach().double()
        expected = np.array([math.sqrt(sum(v * v for v in row)) for row in w.tolist()])
        np.testing.assert_allclose(got[layer.index], expected, rtol=1e-12)


def test_random_scores_reproducible_per_seed():
    model = tiny_model("olmoe")
    info = recognize(model)
    a = score(model, info, "random", seed=5).layers
    b = score(model, info, "random", seed=5).layers
    c = score(model, info, "random", seed=6).layers
    # The baseline as documented: numpy's seeded uniform generator, one draw of E scores per layer in layer order
    for seed, got in ((5, a), (6, c)):
        rng = np.random.default_rng(seed)
        for layer in info.moe_layers:
            np.testing.assert_array_equal(got[layer.index], rng.random(layer.num_experts))
    for layer in info.moe_layers:
        np.testing.assert_array_equal(a[layer.index], b[layer.index])


# ------------------------------------------------------------------------------------ routing statistics


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_expected_damage_is_max_neuron_norm_times_the_routed_weight_mass(family):
    """max-neuron-norm x the sum of routing weights over the tokens routed to the expert, from hooks on the
    experts module; an expert no token reaches scores 0."""
    model = tiny_model(family)
    info = recognize(model)
    ids = _calib_ids(windows=4, length=12)
    calib = Calibration(input_ids=ids)
    got = score(model, info, "expected-damage", calib).layers
    mnn = score(model, info, "max-neuron-norm").layers
    ref = _hook_routing(model, info, ids)
    for layer in info.moe_layers:
        index, weights = ref[layer.index]
        mass = np.array([weights[index == e].double().sum().item() for e in range(layer.num_experts)])
        np.testing.assert_allclose(got[layer.index], mnn[layer.index] * mass, rtol=1e-6, atol=1e-12)
        idle = [e for e in range(layer.num_experts) if not (index == e).any()]
        assert all(got[layer.index][e] == 0 for e in idle)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_frequency_and_weight_match_hooks(family):
    model = tiny_model(family)
    info = recognize(model)
    ids = _calib_ids(windows=10, length=8)  # 10 windows: two batches of the default size 8
    calib = Calibration(input_ids=ids)
    freq = score(model, info, "activation-frequency", calib).layers
    weight = score(model, info, "activation-weight", calib).layers
    ref = _hook_routing(model, info, ids)
    tokens = ids.numel()
    captured = calib.routing(model, info)
    for layer in info.moe_layers:
        index, weights = ref[layer.index]
        cap = captured[layer.index]
        assert cap.hidden.shape == (tokens, layer.hidden_size)
        assert torch.equal(cap.top_k_index, index)
        assert index.shape == (tokens, layer.top_k)
        f = freq[layer.index]
        assert f.sum() == pytest.approx(layer.top_k)
        expected_f = np.array([(index == e).sum().item() / tokens for e in range(layer.num_experts)])
        np.testing.assert_allclose(f, expected_f, rtol=1e-12)
        expected_w = np.array(
            [
                weights[index == e].double().mean().item() if (index == e).any() else 0.0
                for e in range(layer.num_experts)
            ]
        )
        np.testing.assert_allclose(weight[layer.index], expected_w, rtol=1e-6, atol=1e-9)
        assert (weight[layer.index] >= 0).all()


def test_calibration_routing_capture_is_cached_and_complete():
    model = tiny_model("qwen2_moe")
    info = recognize(model)
    ids = _calib_ids(windows=3, length=12)
    calib = Calibration(input_ids=ids, source="random")
    assert calib.num_tokens == 36
    routing = calib.routing(model, info)
    assert calib.routing(model, info) is routing
    assert set(routing) == {l.index for l in info.moe_layers}
    for layer in info.moe_layers:
        cap = routing[layer.index]
        assert cap.hidden.shape == (36, layer.hidden_size)
        assert cap.top_k_index.shape == cap.top_k_weights.shape == (36, layer.top_k)
        # Each token picks top_k distinct experts.
        assert (cap.top_k_index.sort(dim=1).values.diff(dim=1) > 0).all()


def test_unrouted_expert_has_zero_frequency_and_weight():
    model = tiny_model("gpt_oss")
    info = recognize(model)
    router = model.get_submodule(info.moe_layers[0].router)
    with torch.no_grad():
        router.bias[5] = -1e4  # expert 5 of layer 0 never wins the top-k
    calib = Calibration(input_ids=_calib_ids(1))
    freq = score(model, info, "activation-frequency", calib).layers[0]
    weight = score(model, info, "activation-weight", calib).layers[0]
    assert freq[5] == 0.0 and weight[5] == 0.0
    assert freq.sum() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------ measured


def test_measured_deterministic_non_negative_and_seeded():
    model = tiny_model("olmoe")
    info = recognize(model)
    ids = _calib_ids(2)
    a = score(model, info, "measured", Calibration(ids), seed=0).layers
    b = score(model, info, "measured", Calibration(ids), seed=0).layers
    c = score(model, info, "measured", Calibration(ids), seed=1).layers
    for layer in info.moe_layers:
        i = layer.index
        assert a[i].shape == (layer.num_experts,)
        np.testing.assert_array_equal(a[i], b[i])
        assert np.isfinite(a[i]).all() and (a[i] >= 0).all()
        assert (a[i] > 0).any()
        # Another seed programs other devices: each score (a mean over MEASURED_SEEDS draws) moves by a few per cent
        # (measured: 4.4 % and 5.1 % on average over the layer's experts), far above rounding
        assert np.abs(a[i] - c[i]).mean() > 1e-2 * a[i].mean()


def test_measured_matches_hand_reference():
    """One layer by hand from the family's own tensors: mean over seeds of ||w * (noisy - clean)|| / ||y_layer||,
    with each matrix programmed from its (seed, draw, layer, expert, matrix) stream."""
    from hetmoe_compile.scoring.measured import MEASURED_SEEDS

    model = tiny_model("olmoe")
    info = recognize(model)
    ids = _calib_ids(6)
    got = score(model, info, "measured", Calibration(ids), seed=2).layers
    layer = info.moe_layers[1]
    experts = model.get_submodule(layer.experts)
    cap = Calibration(ids).routing(model, info)[layer.index]
    silu = torch.nn.functional.silu

    def expert(x, gate_up, down):
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        return (silu(gate) * up) @ down.T

    with torch.no_grad():
        denom = experts(cap.hidden, cap.top_k_index, cap.top_k_weights).norm().item()
        for e in range(layer.num_experts):
            tok, slot = torch.nonzero(cap.top_k_index == e, as_tuple=True)
            x, w = cap.hidden[tok], cap.top_k_weights[tok, slot][:, None]
            gu, dn = experts.gate_up_proj[e], experts.down_proj[e]
            clean = expert(x, gu, dn)
            changes = []
            for s in range(MEASURED_SEEDS):
                noisy = expert(
                    x,
                    program_rows(gu, stream_seed(2, s, layer.index, e, 0)),
                    program_rows(dn, stream_seed(2, s, layer.index, e, 1)),
                )
                changes.append((w * (noisy - clean)).norm().item() / denom)
            expected = float(np.mean(changes)) if tok.numel() else 0.0
            # measured: equal (the same float32 operations in the same order)
            assert got[layer.index][e] == pytest.approx(expected, rel=1e-6, abs=1e-12), e


def test_measured_never_routed_expert_scores_zero():
    model = tiny_model("gpt_oss")
    info = recognize(model)
    with torch.no_grad():
        model.get_submodule(info.moe_layers[0].router).bias[5] = -1e4
    calib = Calibration(_calib_ids(3))
    routing = calib.routing(model, info)
    assert not (routing[0].top_k_index == 5).any()  # precondition
    got = score(model, info, "measured", calib).layers
    assert got[0][5] == 0.0
    routed = [e for e in range(8) if (routing[0].top_k_index == e).any()]
    assert routed and all(got[0][e] > 0 for e in routed)


def test_measured_grows_when_an_expert_is_scaled_up():
    ids = _calib_ids(4)
    layer_index, e, factor = 1, 3, 3.0
    base = tiny_model("olmoe")
    info = recognize(base)
    before = score(base, info, "measured", Calibration(ids)).layers[layer_index]

    scaled = tiny_model("olmoe")
    experts = scaled.get_submodule(info.layer(layer_index).experts)
    with torch.no_grad():  # in the family's own fused tensors, before any canonicalisation
        experts.gate_up_proj[e] *= factor
        experts.down_proj[e] *= factor
    after = score(scaled, recognize(scaled), "measured", Calibration(ids)).layers[layer_index]

    assert before[e] > 0
    assert after[e] > before[e]
    others = np.arange(8) != e
    # Relative to every other expert of the layer (same layer denominator), expert e gained by well over `factor`.
    assert np.all((after[e] / after[others]) > factor * (before[e] / before[others]))


def test_measured_same_on_canonical_model():
    model = tiny_model("gpt_oss")
    info = recognize(model)
    ids = _calib_ids(5)
    before = score(model, info, "measured", Calibration(ids)).layers
    canonicalize(model, _mixed_split(info))
    after = score(model, recognize(model), "measured", Calibration(ids)).layers
    for i in before:
        np.testing.assert_allclose(after[i], before[i], rtol=1e-6, atol=1e-9)  # measured: 6e-8 (relative) apart


# ------------------------------------------------------------------------------------- selector checking


def test_selector_registry():
    assert set(selectors()) == set(DATA_FREE) | set(DATA_DRIVEN)
    for name in DATA_FREE:
        assert not get_selector(name).needs_calibration
    for name in DATA_DRIVEN:
        assert get_selector(name).needs_calibration


def test_unknown_selector_lists_valid_ones():
    with pytest.raises(HetMoEError, match="unknown selector 'max-norm'") as exc_info:
        check_selectors(["max-neuron-norm", "max-norm"], have_calibration=True)
    msg = str(exc_info.value)
    for name in selectors():
        assert name in msg


@pytest.mark.parametrize("name", DATA_DRIVEN)
def test_data_driven_selector_needs_calibration(name):
    with pytest.raises(HetMoEError, match="--calib"):
        check_selectors([name], have_calibration=False)
    check_selectors([name], have_calibration=True)  # fine with calibration


def test_data_free_selectors_need_no_calibration():
    check_selectors(list(DATA_FREE), have_calibration=False)
    model = tiny_model("mixtral")
    info = recognize(model)
    got = score_all(model, info, list(DATA_FREE))
    assert list(got) == list(DATA_FREE)
    for name, s in got.items():
        assert s.selector == name
        assert all(len(s.layers[l.index]) == 8 for l in info.moe_layers)


def test_score_all_fails_before_any_work(monkeypatch):
    model = tiny_model("olmoe")
    info = recognize(model)
    called = []
    sel = get_selector("max-neuron-norm")
    spy = dataclasses.replace(sel, fn=lambda *a: called.append(a) or sel.fn(*a))
    monkeypatch.setitem(scoring_base._SELECTORS, "max-neuron-norm", spy)
    with pytest.raises(HetMoEError, match="--calib"):
        score_all(model, info, ["max-neuron-norm", "measured"])
    with pytest.raises(HetMoEError, match="unknown selector"):
        score_all(model, info, ["max-neuron-norm", "nope"])
    assert called == []  # the valid first name did not run
    with pytest.raises(HetMoEError, match="unknown selector"):
        score(model, info, "nope")
    assert set(score_all(model, info, ["max-neuron-norm"])) == {"max-neuron-norm"}
    assert len(called) == 1


def test_calibration_from_text_empty():
    def tokenizer(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("tokenizer called on empty text")

    for text in ("", "   \n\t  "):
        with pytest.raises(HetMoEError, match="empty"):
            calibration_from_text(tokenizer, text, source="calib.txt")


def test_calibration_from_text_windows():
    def tokenizer(text, return_tensors, add_special_tokens):
        assert return_tensors == "pt" and add_special_tokens is False
        return {"input_ids": torch.arange(len(text.split()))[None]}

    calib = calibration_from_text(tokenizer, " ".join(["w"] * 11), window=4, source="x.txt")
    assert calib.source == "x.txt"
    assert torch.equal(calib.input_ids, torch.arange(8).reshape(2, 4))
    calib = calibration_from_text(tokenizer, " ".join(["w"] * 50), window=8, max_tokens=20)
    assert calib.input_ids.shape == (2, 8)
    calib = calibration_from_text(tokenizer, "a b c", window=256)
    assert calib.input_ids.shape == (1, 3)
    with pytest.raises(HetMoEError, match="1 token"):
        calibration_from_text(tokenizer, "one", window=4)


# -------------------------------------------------------------------------------------- programming noise


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))


def _row_rel_err(noisy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (noisy - w).norm(dim=1) / w.norm(dim=1)


def test_program_rows_seeded():
    w = _weight()
    a, b, c = program_rows(w, 1), program_rows(w, 1), program_rows(w, 2)
    assert torch.equal(a, b)
    # Another seed is another draw of the noise, not a rounding change: two independent draws differ by about sqrt(2)
    # x the noise of one (measured: 1.37 x); a shared draw gives 0
    assert (a - c).norm() > (a - w).norm() > 0.01 * w.norm()
    assert a.shape == w.shape and a.dtype == w.dtype
    assert stream_seed(0, 1, 2, 3) == stream_seed(0, 1, 2, 3) != stream_seed(0, 1, 2, 4)


def test_program_rows_leaves_global_rng_alone():
    state = torch.get_rng_state()
    program_rows(_weight(), 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_program_rows_zero_noise_is_exact():
    w = _weight(1)
    out = program_rows(w, 7, noise_scale=0.0)
    torch.testing.assert_close(out, w, rtol=1e-6, atol=0)  # measured: 1.4e-7 (relative), the row scaling's rounding


def test_program_rows_noise_has_aihwkits_size():
    """Each row programmed on its own scale with aihwkit's PCM law: the mean row error over 40 instances is that of
    aihwkit's own programming step applied to the rows scaled to abs-max 1 (measured: 1.0 % apart, 0.072 vs 0.071;
    the standard error of either mean is about 1 %)."""
    from aihwkit.inference import PCMLikeNoiseModel

    w = _weight(2)
    scale = w.abs().amax(-1, keepdim=True)
    pcm = PCMLikeNoiseModel()
    ours, theirs = [], []
    for seed in range(40):
        ours.append(_row_rel_err(program_rows(w, seed), w).mean().item())
        torch.manual_seed(seed)
        ref, _ = pcm.apply_programming_noise(w / scale)
        theirs.append(_row_rel_err(ref * scale, w).mean().item())
    assert np.mean(ours) == pytest.approx(np.mean(theirs), rel=0.05)


def test_program_rows_error_grows_with_noise_scale():
    w = _weight(5)
    small = _row_rel_err(program_rows(w, 4, noise_scale=0.5), w)
    large = _row_rel_err(program_rows(w, 4, noise_scale=2.0), w)
    # The same normals, a spread linear in the scale: 4x the error, a little less where a conductance clips at zero
    # (measured: 3.98 x)
    assert (large.mean() / small.mean()).item() == pytest.approx(4.0, rel=0.02)


def test_program_rows_zero_row_stays_zero():
    w = _weight(6)
    w[2] = 0.0
    out = program_rows(w, 1)
    assert torch.isfinite(out).all()
    # Noise is on the row's own scale, which is ~0 here: the row stays (numerically) zero, no NaN from 0/0.
    assert out[2].abs().max().item() < 1e-30


def test_program_rows_rejects_negative_scale():
    with pytest.raises(HetMoEError, match="noise scale"):
        program_rows(_weight(), 0, noise_scale=-0.1)


def test_program_rows_per_row_scaling():
    """A row 100x larger is programmed on its own scale: same relative error as before, others unaffected."""
    w = _weight(3)
    big = w.clone()
    big[5] *= 100.0
    noisy, noisy_big = program_rows(w, 9), program_rows(big, 9)
    err, err_big = _row_rel_err(noisy, w), _row_rel_err(noisy_big, big)
    others = torch.arange(16) != 5
    # Not compressed: the other rows are programmed exactly as before (their own scales, the same normals), and the
    # big row has the relative error it had at its old size (measured: 3.6e-7 apart, float32 rounding of the scale)
    assert torch.equal(noisy_big[others], noisy[others])
    assert err_big[5].item() == pytest.approx(err[5].item(), rel=5e-6)


def test_program_rows_keeps_dtype_and_batch_dims():
    w = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = program_rows(w, 1)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------- reference model (real)


class _LargeOutputs(TorchDispatchMode):
    """Records the size of every tensor an aten op produces."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("no_grad", [True, False], ids=["no_grad", "grad"])
def test_max_neuron_norm_reference_model(ref_model, no_grad):
    info = recognize(ref_model)
    experts = [ref_model.get_submodule(l.experts) for l in info.moe_layers]
    ptrs = [(m.gate_up_proj.data_ptr(), m.down_proj.data_ptr()) for m in experts]
    smallest = min(min(m.gate_up_proj.numel(), m.down_proj.numel()) for m in experts)
    recorder = _LargeOutputs()
    with torch.no_grad() if no_grad else torch.enable_grad(), recorder:
        got = score(ref_model, info, "max-neuron-norm").layers
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        assert got[i].shape == (32,)
        assert np.isfinite(got[i]).all() and (got[i] > 0).all()
    # Read in place: no aten op produced anything as big as a fused expert tensor, and nothing moved.
    assert recorder.sizes, "dispatch mode saw no ops"
    assert max(n for _, n in recorder.sizes) < smallest
    assert [(m.gate_up_proj.data_ptr(), m.down_proj.data_ptr()) for m in experts] == ptrs
    norms = max_neuron_norms(experts[0], info.adapter.layout)
    assert not any(t.requires_grad for t in norms.values())


def test_max_neuron_norm_reference_model_matches_naive(ref_model):
    info = recognize(ref_model)
    got = score(ref_model, info, "max-neuron-norm").layers
    # A vectorised naive reference (the per-element loop is too slow at 4 x 32 x 256 x 128).
    for layer in info.moe_layers:
        experts = ref_model.get_submodule(layer.experts)
        gu, dn = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
        inter = layer.intermediate_size
        expected = gu[:, :inter].norm(dim=2).amax(1) * gu[:, inter:].norm(dim=2).amax(1) * dn.norm(dim=2).amax(1)
        np.testing.assert_allclose(got[layer.index], expected.numpy(), rtol=1e-6)
        assert len(np.unique(got[layer.index])) == 32
