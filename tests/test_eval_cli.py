"""`hetmoe-compile eval` and `sweep` on the demo model: outputs, seeds, and bad input (one line, exit 2, nothing
written)."""

import json
from pathlib import Path

import pytest

from hetmoe_compile.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "olmoe-demo"
QA = REPO.parent / "shared" / "data" / "qa"
TEXT = REPO / "examples" / "calibration.txt"


def test_eval_on_the_fly_placement_writes_mean_and_std(tmp_path, capsys):
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
    assert len(ppl["values"]) == 2 and ppl["values"][0] != ppl["values"][1]  # two hardware instances differ
    assert ppl["mean"] == pytest.approx(sum(ppl["values"]) / 2) and ppl["std"] > 0
    assert doc["analog"]["noise_scale"] == 2.5 and doc["policy"]["digital_fraction"] == 0.25
    assert "ppl" in capsys.readouterr().out


def test_eval_placement_file_ideal_equals_digital_and_tasks(tmp_path):
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
                    "copa,lambada",
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
        metrics = json.loads(out.read_text())["metrics"]
        assert set(metrics) >= {"copa/acc", "copa/acc_norm", "lambada/acc"}
        assert all(0.0 <= m["mean"] <= 1.0 for m in metrics.values())


def test_sweep_writes_table_plots_and_rows(tmp_path):
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
    rows = {r["label"]: r["metrics"]["ppl"]["mean"] for r in doc["rows"]}
    assert rows["all-analog"] > rows["all-digital"] and rows["dense-digital"] > rows["all-digital"]
    table = (out / "results.md").read_text()
    assert "| max-neuron-norm 0.25 | max-neuron-norm | 0.25 | digital |" in table
    png = (out / "ppl.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "ppl.png", "results.json", "results.md"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--noise", "magic"], "unknown noise preset 'magic'; choose one of pcm, dac-adc, gaussian, ideal"),
        (["--noise-scale", "-1"], "noise scale must be >= 0"),
        (["--t-inference", "0"], "t_inference must be > 0"),
        (["--seeds", "0"], "seeds must be >= 1"),
        (["--tasks", "nope", "--tasks-dir", "{qa}"], "unknown task 'nope'; available: piqa"),
        (["--tasks", "piqa"], "--tasks needs --tasks-dir"),
        (["--ppl", "{short}"], "perplexity needs at least 2"),
        (["--ppl", "{missing}"], "text file not found"),
    ],
)
def test_eval_bad_input(tmp_path, capsys, extra, message):
    if "{qa}" in extra and not QA.is_dir():
        pytest.skip(f"task data not found at {QA}")
    short = tmp_path / "short.txt"
    short.write_text("a")
    extra = [e.format(qa=QA, short=short, missing=tmp_path / "missing.txt") for e in extra]
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
