"""Evaluation: perplexity against hand-computed references, log-likelihood batching, task parsing, greedy LAMBADA."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO, FAMILIES, REPO, SHARED, placed
from torch import nn

from hetmoe_compile.analog import analog_config, restore_digital, simulate
from hetmoe_compile.errors import HetMoEError
from hetmoe_compile.eval import (
    TASKS,
    MCExample,
    available_tasks,
    encode_pair,
    evaluate_examples,
    evaluate_tasks,
    load_task,
    loglikelihoods,
    perplexity,
    perplexity_of_file,
    window_plan,
)
from hetmoe_compile.eval.under_noise import EvalSpec, Prepared, evaluate_under_noise
from hetmoe_compile.models.loader import load_model, load_tokenizer

QA = SHARED / "data" / "qa"
needs_qa = pytest.mark.skipif(not QA.is_dir(), reason=f"task data folder {QA} is absent")

CHOICES = {
    "piqa": {2},
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
    "boolq": {2},
    "hellaswag": {4},
    "winogrande": {2},
    "openbookqa": {4},
    "sciq": {4},
    "copa": {2},
    "lambada": {1},
}


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


# log-likelihood requests

REQUESTS = [
    ("Question: How do I boil water?\nAnswer:", " Put it in a pot on the stove."),
    ("Question: How do I boil water?\nAnswer:", " Freeze it."),
    ("To be, or not to be, that is the ", "question."),  # trailing space moves to the continuation
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou",
        " are",
    ),
]


def _direct(model, tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor(ctx + cont)
    with torch.no_grad():
        logprobs = model(input_ids=ids[None, :-1], use_cache=False).logits[0].float().log_softmax(-1)
    picked = logprobs[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return picked.gather(-1, target[:, None]).sum().item(), bool((picked.argmax(-1) == target).all())


def test_encode_pair_splits_like_lm_eval(demo):
    _, tok = demo
    ctx, cont = encode_pair(tok, "To be, or not to be, that is the ", "question.")
    assert ctx == _ids(tok, "To be, or not to be, that is the").tolist()
    assert ctx + cont == _ids(tok, "To be, or not to be, that is the question.").tolist()


def test_batched_loglikelihoods_equal_direct_computation_and_ignore_padding(demo):
    model, tok = demo
    one = loglikelihoods(model, tok, REQUESTS, batch_size=1)
    eight = loglikelihoods(model, tok, REQUESTS, batch_size=8)
    for (ctx, cont), a, b in zip(REQUESTS, one, eight):
        ref, greedy = _direct(model, tok, ctx, cont)
        # measured: batch 1 equals the direct sum exactly, batch 8 (padded) differs by <= 3.8e-6, one float32 step
        # of the largest |log-likelihood| (59)
        assert a.logprob == pytest.approx(ref, abs=1e-5) and a.is_greedy == greedy
        assert abs(a.logprob - b.logprob) < 1e-5 and a.is_greedy == b.is_greedy and a.tokens == b.tokens


def test_long_context_is_left_truncated(demo):
    model, tok = demo
    ctx, cont = encode_pair(tok, *REQUESTS[4])
    (res,) = loglikelihoods(model, tok, [REQUESTS[4]], max_length=8)
    ids = torch.tensor(ctx + cont)[-9:-1]
    with torch.no_grad():
        logprobs = model(input_ids=ids[None], use_cache=False).logits[0].float().log_softmax(-1)
    ref = logprobs[-len(cont) :].gather(-1, torch.tensor(cont)[:, None]).sum().item()
    assert res.logprob == pytest.approx(ref, abs=1e-6)  # measured: equal (a float32 step at 1.8 is 1.2e-7)


def test_multiple_choice_metrics_follow_loglikelihoods(demo):
    model, tok = demo
    examples = [
        MCExample((c,) * 2, (REQUESTS[0][1], REQUESTS[1][1]), label)
        for c, label in [(REQUESTS[0][0], 0), (REQUESTS[0][0], 1)]
    ]
    lls = [_direct(model, tok, *r)[0] for r in examples[0].requests()]
    best = int(lls[1] > lls[0])
    best_norm = int(lls[1] / len("Freeze it.") > lls[0] / len("Put it in a pot on the stove."))
    scores = evaluate_examples(model, tok, examples)
    assert scores == {"acc": 0.5, "acc_norm": 0.5}  # one of the two labels is right, whichever wins
    assert evaluate_examples(model, tok, [examples[best]])["acc"] == 1.0
    assert evaluate_examples(model, tok, [examples[best_norm]])["acc_norm"] == 1.0


# greedy (LAMBADA)


class ScriptedLM(nn.Module):
    """Predicts, at position j, token ``script[j + 1]`` (a fixed sequence) with all its probability mass."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = list(script), vocab
        self.config = SimpleNamespace(max_position_embeddings=512)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, n = input_ids.shape
        logits = torch.full((b, n, self.vocab), -1e4)
        for j in range(min(n, len(self.script) - 1)):
            logits[:, j, self.script[j + 1]] = 1e4
        return SimpleNamespace(logits=logits)


def test_lambada_accuracy_is_greedy_exact_match(demo):
    _, tok = demo
    context = "I look at him, feeling stunned. Like this is some sort of sign. But I don't care about"
    model = ScriptedLM(_ids(tok, context + " signs").tolist(), len(tok))
    right, wrong = MCExample((context,), (" signs",), 0), MCExample((context,), (" cats",), 0)
    assert evaluate_examples(model, tok, [right], kind="greedy") == {"acc": 1.0}
    assert evaluate_examples(model, tok, [wrong], kind="greedy") == {"acc": 0.0}
    assert evaluate_examples(model, tok, [right, wrong, right, right], kind="greedy", batch_size=3) == {"acc": 0.75}


# task files


@needs_qa
@pytest.mark.parametrize("name", list(TASKS))
def test_task_loader_parses_file(name):
    examples = load_task(name, QA, limit=7)
    assert len(examples) == 7
    for ex in examples:
        assert ex.num_choices in CHOICES[name] and len(ex.contexts) == ex.num_choices
        assert 0 <= ex.label < ex.num_choices
        assert all(c.startswith(" ") and c.strip() for c in ex.continuations)
        assert all(ctx and not ctx.endswith(" ") for ctx in ex.contexts)


def _first(name):
    return json.loads((QA / f"{name}.jsonl").open().readline())


@needs_qa
def test_prompt_formats():
    piqa = load_task("piqa", QA, limit=1)[0]
    doc = _first("piqa")
    assert piqa.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",) * 2
    assert piqa.continuations == (" " + doc["sol1"], " " + doc["sol2"]) and piqa.label == 0

    boolq = load_task("boolq", QA, limit=1)[0]
    doc = _first("boolq")
    question = "does ethanol take more energy make that produces"
    assert boolq.contexts[0] == f"{doc['passage']}\nQuestion: {question}?\nAnswer:"
    assert boolq.continuations == (" no", " yes") and boolq.label == 0

    wino = load_task("winogrande", QA, limit=1)[0]
    assert wino.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.label == 1

    hella = load_task("hellaswag", QA, limit=1)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella.continuations[3] == " starts pulling up roofing on a roof." and hella.label == 3

    arc = load_task("arc_easy", QA, limit=1)[0]
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == (" cellular telephone", " television", " refrigerator", " airplane") and arc.label == 0

    copa = load_task("copa", QA, limit=1)[0]
    assert copa.contexts[0] == "The man turned on the faucet therefore"
    assert copa.continuations == (" the toilet filled with water.", " water flowed from the spout.") and copa.label == 1

    sciq = load_task("sciq", QA, limit=1)[0]
    assert sciq.contexts[0] == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    assert sciq.continuations == (" Linnaeus", " shaw", " Scopes", " darwin") and sciq.label == 3

    obqa = load_task("openbookqa", QA, limit=1)[0]
    assert obqa.contexts[0].startswith("Frilled sharks") and obqa.continuations[0] == " Deep sea animals"

    lam = load_task("lambada", QA, limit=1)[0]
    assert lam.contexts[0] == _first("lambada")["context"] and lam.continuations == (" signs",)


def test_task_errors(tmp_path):
    with pytest.raises(HetMoEError, match="--tasks-dir"):
        load_task("piqa", tmp_path / "nowhere")
    (tmp_path / "piqa.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}\n')
    (tmp_path / "copa.jsonl").write_text('{"premise": "p."}\n')
    (tmp_path / "boolq.jsonl").write_text("not json\n")
    (tmp_path / "sciq.jsonl").write_text("\n")
    assert available_tasks(tmp_path) == ["piqa", "boolq", "sciq", "copa"]
    with pytest.raises(HetMoEError, match="unknown task 'squad'; available: piqa, boolq, sciq, copa"):
        load_task("squad", tmp_path)
    with pytest.raises(HetMoEError, match="hellaswag.jsonl: task file not found"):
        load_task("hellaswag", tmp_path)
    with pytest.raises(HetMoEError, match=r"copa.jsonl:1: .*layout"):
        load_task("copa", tmp_path)
    with pytest.raises(HetMoEError, match=r"boolq.jsonl:1: not valid JSON"):
        load_task("boolq", tmp_path)
    with pytest.raises(HetMoEError, match="no examples"):
        load_task("sciq", tmp_path)
    with pytest.raises(HetMoEError, match="limit"):
        load_task("piqa", tmp_path, limit=0)
    assert load_task("piqa", tmp_path)[0].label == 1
    with pytest.raises(HetMoEError, match="unknown task"):
        evaluate_tasks(None, None, ["piqa", "squad"], tmp_path)  # fails before any model call


def _by_hand(model, tok, examples, kind):
    """Metrics from one unbatched forward per request: the argmax of the summed log-likelihood (``acc``) and of the
    log-likelihood per character of the choice without its leading delimiter (``acc_norm``), or the greedy match."""
    if kind == "greedy":
        return {"acc": sum(_direct(model, tok, *ex.requests()[0])[1] for ex in examples) / len(examples)}, []
    acc = acc_norm = 0
    gaps = []  # the best choice's lead over the runner-up, both metrics
    for ex in examples:
        lls = [_direct(model, tok, c, x)[0] for c, x in ex.requests()]
        per_char = [ll / len(x[1:]) for ll, x in zip(lls, ex.continuations)]
        for values in (lls, per_char):
            top = sorted(values)
            gaps.append(top[-1] - top[-2])
        acc += lls.index(max(lls)) == ex.label
        acc_norm += per_char.index(max(per_char)) == ex.label
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples)}, gaps


@needs_qa
def test_evaluate_tasks_on_demo_model(demo):
    model, tok = demo
    names = ["piqa", "arc_easy", "lambada"]
    scores = evaluate_tasks(model, tok, names, QA, limit=8, batch_size=4)
    assert list(scores) == names
    for name in names:
        expected, gaps = _by_hand(model, tok, load_task(name, QA, limit=8), TASKS[name].kind)
        assert scores[name] == expected, name
        # measured: the closest choices are 3.5e-4 apart, batching moves a log-likelihood by <= 4e-6: no tie flips
        assert not gaps or min(gaps) > 1e-4


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
    got = evaluate_under_noise(model, info, _ByteTokenizer(), cfg, EvalSpec("text", seeds=2), Prepared(text))
    hand = []
    for seed in (0, 1):
        simulate(model, cfg, seed, info=info)  # a fresh instance: its output-noise stream starts over
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], use_cache=False).logits[0].double()
        hand.append(math.exp(F.cross_entropy(out, ids[0, 1:]).item()))
    restore_digital(model, info)
    assert got["ppl"]["values"] == pytest.approx(hand, rel=1e-6)
    assert abs(hand[0] - hand[1]) > 1e-5 * hand[0]  # two instances, two perplexities (granitemoe: 9e-5 apart)
