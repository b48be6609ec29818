"""Evaluation: perplexity against hand-computed references (tasks run through lm-eval: test_harness.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO, FAMILIES, REPO, placed

from hetmoe_compile.analog import analog_config, restore_digital, simulate
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.eval import perplexity, perplexity_of_file, window_plan
from hetmoe_compile.eval.under_noise import EvalSpec, Prepared, evaluate_under_noise
from hetmoe_compile.models.loader import load_model, load_tokenizer


@pytest.fixture(scope="module")
def demo():
    return load_model(str(DEMO)), load_tokenizer(str(DEMO))


@pytest.fixture(scope="module")
def text():
    return (REPO / "examples" / "calibration.txt").read_text()[:1500]


def _ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


# perplexity


def test_single_window_equals_full_sequence_cross_entropy(demo, text):
    model, tok = demo
    ids = _ids(tok, text[:400])
    with torch.no_grad():
        logits = model(input_ids=ids[None], use_cache=False).logits[0]
    ref = F.cross_entropy(logits[:-1].float(), ids[1:]).item()
    res = perplexity(model, tok, text[:400])
    assert (res.tokens, res.windows, res.context, res.stride) == (ids.numel() - 1, 1, 1024, 1024)
    # measured: 4.4e-8 apart (float32 sums of the same 100 log-probabilities in another order)
    assert res.nll == pytest.approx(ref, abs=1e-6) and res.ppl == pytest.approx(math.exp(ref), rel=1e-6)


@pytest.mark.parametrize("context,stride", [(32, 12), (32, 32), (17, 1)])
def test_strided_windows_equal_simple_loop_and_score_each_token_once(demo, text, context, stride):
    """Reference, one window at a time: the first window predicts its ``context`` next tokens, each later one
    the next ``stride`` tokens from the ``context`` ids just before them (a full-length window, as lm-eval's
    rolling windows); the ids seen before the new targets are context only."""
    model, tok = demo
    ids = _ids(tok, text)[:150]
    n = ids.numel()
    nll, scored, done, windows = 0.0, [], 0, 0  # done: ids[1 : done + 1] are scored
    with torch.no_grad():
        while done < n - 1:
            end = min(done + (stride if done else context), n - 1)  # the window's inputs are ids[start:end]
            start = max(0, end - context)
            logprobs = model(input_ids=ids[None, start:end], use_cache=False).logits[0].log_softmax(-1)
            for t in range(done + 1, end + 1):  # target ids[t] is predicted at input position t - 1
                nll -= logprobs[t - 1 - start, ids[t]].item()
                scored.append(t)
            done, windows = end, windows + 1
    assert scored == list(range(1, n))
    res = perplexity(model, tok, text, context=context, stride=stride, max_tokens=150, batch_size=3)
    assert (res.tokens, res.windows) == (n - 1, windows)
    assert res.nll == pytest.approx(nll / (n - 1), abs=2e-6)  # measured: at most 1.1e-7 apart
    plan = window_plan(n, context, stride)
    assert res.windows == len(plan) and sum(s for _, _, s in plan) == n - 1
    if stride == context:
        assert res.windows == math.ceil((n - 1) / context)
        assert all(b[0] == a[1] for a, b in zip(plan, plan[1:-1]))  # non-overlapping inputs; the last one ends at
        assert plan[-1][1] == n - 1 and plan[-1][1] - plan[-1][0] == context  # the end with a full window


def test_text_shorter_than_window_is_one_short_window(demo):
    model, tok = demo
    res = perplexity(model, tok, "To be, or not to be", context=64)
    assert res.windows == 1 and res.tokens == _ids(tok, "To be, or not to be").numel() - 1


def test_perplexity_of_file_and_its_errors(demo, tmp_path, text):
    model, tok = demo
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert perplexity_of_file(model, tok, path, context=64) == perplexity(model, tok, text, context=64)
    with pytest.raises(HetMoEError, match="not found"):
        perplexity_of_file(model, tok, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(HetMoEError, match="empty"):
        perplexity_of_file(model, tok, tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("a")
    with pytest.raises(HetMoEError, match=r"1 token\(s\).*at least 2"):
        perplexity_of_file(model, tok, tmp_path / "short.txt")
    with pytest.raises(HetMoEError, match="stride"):
        perplexity(model, tok, text, context=16, stride=32)
    with pytest.raises(HetMoEError, match="context"):
        perplexity(model, tok, text, context=4096)


class _ByteTokenizer:
    """Token ids = UTF-8 bytes mod 128 (the tiny models' vocabulary): a tokenizer for models that ship none."""

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [b % 128 for b in text.encode()]}


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_under_noise_equals_a_hand_computation_on_every_family(family):
    """evaluate_under_noise on each family: instance s's perplexity equals exp(mean NLL) of the model simulated
    with seed s, computed here from the logits (one window: the text is shorter than the context)."""
    model, info, _ = placed(family)
    text = "The quick brown fox jumps over the lazy dog; " * 2
    ids = torch.tensor([_ByteTokenizer()(text)["input_ids"]])
    cfg = analog_config("pcm")
    got = evaluate_under_noise(model, info, _ByteTokenizer(), cfg, EvalSpec(ppl_path="text", seeds=2), Prepared(text))
    hand = []
    for seed in (0, 1):
        simulate(model, cfg, seed, info=info)  # a fresh instance: its output-noise stream starts over
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], use_cache=False).logits[0].double()
        hand.append(math.exp(F.cross_entropy(out, ids[0, 1:]).item()))
    restore_digital(model, info)
    assert got["ppl"]["values"] == pytest.approx(hand, rel=1e-6)
    assert abs(hand[0] - hand[1]) > 1e-5 * hand[0]  # two instances, two perplexities (granitemoe: 9e-5 apart)


def test_sweep_with_a_global_scope_evaluates_the_global_placement():
    """``run_sweep(scope="global")``: the selector's row is the placement that ranks every expert of every layer
    together (not the same experts per layer as the fixed fraction), evaluated on the same instances."""
    from hetmoe_compile.compose.api import compile
    from hetmoe_compile.eval.sweep.plan import run_sweep
    from hetmoe_compile.placement import PlacementPolicy

    model, tok = load_model(str(DEMO)), load_tokenizer(str(DEMO))
    info = compile(model, PlacementPolicy(0.25)).info
    cfg = analog_config("pcm", noise_scale=8.0)
    spec = EvalSpec(ppl_path=str(REPO / "examples" / "calibration.txt"), ppl_tokens=128, seeds=1)
    rows = {
        r.label: r
        for r in run_sweep(model, info, tok, [0.25], ["max-neuron-norm"], cfg, spec, None, False, scope="global")
    }
    per_layer = compile(model, PlacementPolicy(0.25, "max-neuron-norm"), cfg).placement
    glob = compile(model, PlacementPolicy(0.25, "max-neuron-norm", "global"), cfg)
    assert [l.ids("digital") for l in glob.placement.layers] != [l.ids("digital") for l in per_layer.layers]
    prepared = Prepared(open(spec.ppl_path).read())
    want = evaluate_under_noise(model, glob.info, tok, cfg, spec, prepared)["ppl"]["values"]
    assert rows["max-neuron-norm 0.25"].metrics["ppl"]["values"] == pytest.approx(want, rel=1e-9)
