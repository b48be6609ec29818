"""`hetmoe-compile eval` and `sweep` on the demo model: outputs, seeds, and bad input (one line, exit 2, nothing
written)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO, REPO, SHARED

from hetmoe_compile.analog import analog_config
from hetmoe_compile.cli.app import main
from hetmoe_compile.compose.api import compile
from hetmoe_compile.eval.harness import HarnessTasks, harness_metrics
from hetmoe_compile.models import load_model, load_tokenizer
from hetmoe_compile.placement import Placement, PlacementPolicy

QA = SHARED / "data" / "qa"
TEXT = REPO / "examples" / "calibration.txt"
PCM = analog_config("pcm", noise_scale=2.5)


def _ppl(model, ids):
    """By hand: one window of all 256 tokens, ``exp`` of the mean cross-entropy of ids[1:] given ids[:-1]."""
    with torch.no_grad():
        logits = model(input_ids=ids[None, :-1], use_cache=False).logits[0]
    return math.exp(F.cross_entropy(logits.float(), ids[1:]).item())


@pytest.fixture(scope="module")
def hand():
    """Perplexities of the first 256 tokens of ``TEXT`` (the CLI's ``--ppl-tokens 256``), computed by hand on the demo
    model placed through the Python API: the clean model, and hardware instances 0 and 1 of ``PCM`` at 25 % digital
    and all-analog (dense modules on tiles too). Each instance is freshly programmed before its one forward, as the
    CLI does (the output noise of a forward depends on the forwards before it)."""
    model, tok = load_model(str(DEMO)), load_tokenizer(str(DEMO))
    ids = torch.tensor(tok(TEXT.read_text(), add_special_tokens=False)["input_ids"][:256])
    out = {"clean": _ppl(model, ids)}
    for label, fraction, dense in [("max-neuron-norm 0.25", 0.25, "digital"), ("all-analog", 0.0, "analog")]:
        compiled = compile(model, PlacementPolicy(fraction, dense=dense), PCM)
        out[label] = []
        for seed in (0, 1):
            compiled.simulate(seed)
            out[label].append(_ppl(model, ids))
        compiled.restore()
    return out


def test_eval_on_the_fly_placement_writes_mean_and_std(tmp_path, capsys, hand):
    out = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            str(DEMO),
            "--digital-fraction",
            "0.25",
            "--noise",
            "pcm",
            "--noise-scale",
            "2.5",
            "--seeds",
            "2",
            "--ppl",
            str(TEXT),
            "--ppl-tokens",
            "256",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    ppl = doc["metrics"]["ppl"]
    # measured: the CLI's values are within 1e-7 (relative) of the hand-computed instances 0 and 1
    assert ppl["values"] == pytest.approx(hand["max-neuron-norm 0.25"], rel=1e-6)
    a, b = ppl["values"]
    assert ppl["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
    assert ppl["std"] == pytest.approx(abs(a - b) / 2, rel=1e-9)  # over the seeds, ddof 0
    # the two instances differ by 3.2e-4 (relative), 300x the tolerance above: the seeds really are different
    assert abs(a - b) > 1e-4 * a
    assert doc["analog"]["noise_scale"] == 2.5 and doc["policy"]["digital_fraction"] == 0.25
    assert "ppl" in capsys.readouterr().out


def test_eval_at_several_times_since_programming_uses_the_same_devices(tmp_path, hand):
    """``--t-inference 1,3600,31536000``: every metric at every time, keyed ``t=<time>/<metric>``; at 1 h the
    values are the single-time evaluation's (the default 3600 s), so each instance is the same devices at every
    time; the plot against time is written beside results.json."""
    out = tmp_path / "results.json"
    argv = ["eval", str(DEMO), "--digital-fraction", "0.25", "--noise-scale", "2.5", "--seeds", "2"]
    argv += ["--ppl", str(TEXT), "--ppl-tokens", "256", "--t-inference", "1,3600,31536000", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    ppl = [k for k in doc["metrics"] if "routing/" not in k]
    assert ppl == ["t=1s/ppl", "t=1h/ppl", "t=1y/ppl"] and doc["t_inference"] == [1, 3600, 31536000]
    assert {f"t={t}/routing/L0/topk_match" for t in ("1s", "1h", "1y")} <= set(doc["metrics"])  # diagnostics too
    assert doc["metrics"]["t=1h/ppl"]["values"] == pytest.approx(hand["max-neuron-norm 0.25"], rel=1e-6)
    mean = {k: v["mean"] for k, v in doc["metrics"].items() if k in ppl}
    assert len(set(mean.values())) == 3 and mean["t=1y/ppl"] > mean["t=1s/ppl"]  # drift and read noise grow
    assert out.with_suffix(".time.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_placement_file_ideal_equals_digital_and_tasks(tmp_path, hand):
    placement = tmp_path / "p.json"
    assert main(["place", str(DEMO), "--digital-fraction", "0.5", "--no-graph", "--out", str(placement)]) == 0
    ideal, digital = tmp_path / "ideal.json", tmp_path / "digital.json"
    common = ["--seeds", "3", "--ppl", str(TEXT), "--ppl-tokens", "256"]
    assert (
        main(["eval", str(DEMO), "--placement", str(placement), "--noise", "ideal", *common, "--out", str(ideal)]) == 0
    )
    assert main(["eval", str(DEMO), "--digital-fraction", "1", "--noise", "pcm", *common, "--out", str(digital)]) == 0
    a, b = json.loads(ideal.read_text())["metrics"]["ppl"], json.loads(digital.read_text())["metrics"]["ppl"]
    assert a["values"] == b["values"] and len(a["values"]) == 1  # ideal / nothing analog: one exact run
    assert a["values"] == pytest.approx([hand["clean"]], rel=1e-6)  # the clean model's (measured: 7e-8 apart)
    assert a["std"] == 0.0
    if QA.is_dir():
        out = tmp_path / "tasks.json"
        assert (
            main(
                [
                    "eval",
                    str(DEMO),
                    "--placement",
                    str(placement),
                    "--noise",
                    "dac-adc",
                    "--seeds",
                    "1",
                    "--tasks",
                    "copa,lambada_openai",
                    "--tasks-dir",
                    str(QA),
                    "--limit",
                    "8",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        doc = json.loads(out.read_text())
        metrics = doc["metrics"]
        # Reference: the same placement file through the Python API, instance 0 of dac-adc, the tasks scored by
        # lm-eval on that one instance in the same order (dac-adc's output noise makes each forward depend on those
        # before it); test_harness.py checks lm-eval's log-likelihoods against our scorer.
        model, tok = load_model(str(DEMO)), load_tokenizer(str(DEMO))
        compile(model, analog="dac-adc", placement=Placement.load(placement)).simulate(0)
        expected, record = harness_metrics(model, tok, HarnessTasks(["copa", "lambada_openai"], QA), limit=8)
        assert set(metrics) == set(expected) and {"copa/acc_stderr", "lambada_openai/perplexity"} <= set(metrics)
        for key, value in expected.items():
            assert metrics[key] == {"mean": value, "std": 0.0, "values": [value]}, key
        assert doc["lm_eval"]["versions"] == record["versions"] and doc["lm_eval"]["tasks_dir"] == str(QA)
        assert doc["lm_eval"]["configs"]["copa"]["dataset_kwargs"]["data_files"]["validation"].endswith("copa.jsonl")


def test_tasks_without_a_hub_or_a_tasks_dir_say_so_at_once(tmp_path, capsys, monkeypatch):
    """lm-eval's own datasets need the hub: with none (an endpoint nothing answers) one line, before the model
    loads, instead of datasets' minute of retries."""
    from huggingface_hub import constants

    from hetmoe_compile.models import loader

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(loader, "_PROBES", {})
    argv = ["eval", str(DEMO), "--digital-fraction", "0.25", "--tasks", "piqa", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be reached; pass --tasks-dir DIR" in err, err
    assert not (tmp_path / "r.json").exists()


def test_sweep_writes_table_plots_and_rows(tmp_path, hand):
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            str(DEMO),
            "--fractions",
            "0,0.25,1",
            "--selectors",
            "max-neuron-norm,random",
            "--noise",
            "pcm",
            "--noise-scale",
            "2.5",
            "--seeds",
            "2",
            "--ppl",
            str(TEXT),
            "--ppl-tokens",
            "256",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in doc["rows"]]
    assert labels == [
        "all-digital",
        "all-analog",
        "dense-digital",
        "max-neuron-norm 0.25",
        "random 0.25",
        "max-neuron-norm 0.25 (dense analog)",
    ]
    rows = {r["label"]: r["metrics"]["ppl"]["values"] for r in doc["rows"]}
    # Every placement runs the same hardware instances: the hand-computed ones (measured: within 1.2e-7, relative)
    assert rows["all-digital"] == pytest.approx([hand["clean"]], rel=1e-6)
    assert rows["max-neuron-norm 0.25"] == pytest.approx(hand["max-neuron-norm 0.25"], rel=1e-6)
    assert rows["all-analog"] == pytest.approx(hand["all-analog"], rel=1e-6)
    assert all(len(v) == 2 for k, v in rows.items() if k != "all-digital")
    # Noise on every expert costs perplexity: measured +13 % all-analog, +2.0 % with the dense modules digital
    mean = {k: sum(v) / len(v) for k, v in rows.items()}
    assert mean["all-analog"] > 1.1 * mean["all-digital"] and mean["dense-digital"] > 1.01 * mean["all-digital"]
    table = (out / "results.md").read_text()
    assert "| max-neuron-norm 0.25 | max-neuron-norm | 0.25 | digital |" in table
    assert "| ppl | routing/topk_match | routing/moe_rel_error |" in table
    png = (out / "ppl.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == [
        "pareto.png",
        "ppl.png",
        "results.json",
        "results.md",
        "routing.png",
        "sweep.json",
        "units",
    ]
    assert len(list((out / "units").glob("*.json"))) == 11  # one per (placement, instance); all-digital once
    # Routing against the clean model: all digital is the clean model (canonical vs original experts: float
    # rounding); with every expert analog, the first MoE layer's router still sees clean inputs, later ones do not
    routing = {r["label"]: r["metrics"] for r in doc["rows"]}
    assert routing["all-digital"]["routing/topk_match"]["mean"] == 1.0
    assert routing["all-digital"]["routing/moe_rel_error"]["mean"] < 1e-5
    assert routing["dense-digital"]["routing/L0/topk_match"]["values"] == [1.0, 1.0]
    assert routing["dense-digital"]["routing/L0/moe_rel_error"]["mean"] > 1e-3
    assert routing["dense-digital"]["routing/L3/topk_match"]["mean"] < 1.0
    assert doc["routing_reference"]["tokens"] > 0


def test_sweep_at_several_times_writes_the_time_plot(tmp_path, hand):
    """A sweep over times: each row's metrics at each time (the 1 h values those of the single-time sweep's
    instances), the table's columns per time, and ``time.png``."""
    out = tmp_path / "sweep"
    argv = ["sweep", str(DEMO), "--fractions", "0.25", "--selectors", "max-neuron-norm", "--no-ablation"]
    argv += ["--noise-scale", "2.5", "--seeds", "2", "--ppl", str(TEXT), "--ppl-tokens", "256"]
    assert main([*argv, "--t-inference", "3600,86400", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    row = {r["label"]: r["metrics"] for r in doc["rows"]}["max-neuron-norm 0.25"]
    assert [k for k in row if "routing/" not in k] == ["t=1h/ppl", "t=1d/ppl"] and doc["t_inference"] == [3600, 86400]
    assert row["t=1h/ppl"]["values"] == pytest.approx(hand["max-neuron-norm 0.25"], rel=1e-6)
    assert "| t=1h/ppl | t=1d/ppl |" in (out / "results.md").read_text()
    assert {"time.png", "t=1h_ppl.png", "t=1d_ppl.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--noise", "magic"],
            "unknown noise preset 'magic'; choose one of pcm, dac-adc, gaussian, standard-hwa, reram-wan2022, "
            "reram-cmo, hermes-pcm, ideal",
        ),
        (["--noise-scale", "-1"], "--noise-scale: -1 is not a finite number >= 0"),
        (["--t-inference", "0"], "--t-inference: 0 is not a finite number > 0"),
        (["--t-inference", "1,3600,1"], "--t-inference: '1,3600,1' lists a time twice"),
        (["--t-inference", "1,x"], "--t-inference: 'x' is not a number"),
        (
            ["--noise", "reram-wan2022", "--t-inference", "1,3600"],
            "--t-inference 3600 s: the reram-wan2022 device is characterised at 1, 86400 and 172800 s only",
        ),
        (["--seeds", "0"], "--seeds: 0 must be >= 1"),
        (["--tasks", "nope", "--tasks-dir", "{qa}"], "--tasks nope: no local file in"),
        (["--tasks", "piqa", "--tasks-dir", "{missing}"], "no such folder"),
        (["--ppl", "{text}", "--num-fewshot", "2"], "--num-fewshot applies to --tasks"),
        (["--ppl", "{short}"], "a perplexity needs at least"),
        (["--ppl", "{missing}"], "text file not found"),
    ],
)
def test_eval_bad_input(tmp_path, capsys, extra, message):
    if "{qa}" in extra and not QA.is_dir():
        pytest.skip(f"task data not found at {QA}")
    short = tmp_path / "short.txt"
    short.write_text("a")
    extra = [e.format(qa=QA, short=short, missing=tmp_path / "missing.txt", text=TEXT) for e in extra]
    argv = ["eval", str(DEMO), "--digital-fraction", "0.25", "--out", str(tmp_path / "out" / "r.json")]
    if "--ppl" not in extra and "--tasks" not in extra:
        extra += ["--ppl", str(TEXT)]
    rc = main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_eval_rejects_placement_of_another_model(tmp_path, capsys):
    from hetmoe_compile.models.tiny import tiny_model

    other = tmp_path / "tiny"
    tiny_model("olmoe").save_pretrained(other)
    placement = tmp_path / "p.json"
    assert main(["place", str(other), "--no-graph", "--out", str(placement)]) == 0
    rc = main(["eval", str(DEMO), "--placement", str(placement), "--ppl", str(TEXT), "--out", str(tmp_path / "r.json")])
    assert rc == 2 and "placement was made for another model" in capsys.readouterr().err
