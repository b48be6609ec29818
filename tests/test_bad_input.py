"""Bad input and faults (issue 14): each cause answered with one line naming the problem and the fix, exit code 2
from the CLI (130 after Ctrl-C), and nothing written; a wrong value never runs silently."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO, REPO, one_line

import hetmoe_compile as hc
from hetmoe_compile.analog import analog_config, simulate
from hetmoe_compile.base.io import atomic_write_text, remove_stale_temps
from hetmoe_compile.cli.app import main
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.placement import Placement, PlacementPolicy

TEXT = REPO / "examples" / "calibration.txt"


# ---- placements must place every expert of every MoE layer exactly once ---------------------------------------


def _edited(demo_export, tmp_path, edit) -> str:
    doc = json.loads(demo_export[0].read_text())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _drop_layer(doc):
    del doc["layers"][1]


def _drop_expert(doc):
    del doc["layers"][0]["experts"][3]


def _twice(doc):
    doc["layers"][0]["experts"][3]["id"] = doc["layers"][0]["experts"][4]["id"]


def _expert_99(doc):
    doc["layers"][0]["experts"][3]["id"] = 99


def _layer_9(doc):
    doc["layers"][1]["index"] = 9


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_layer, "MoE layer(s) [1] are missing"),
        (_drop_expert, "layer 0 does not place expert(s) ["),
        (_twice, "layer 0 lists expert(s) ["),
        (_expert_99, "layer 0 names expert 99, but the layer has experts 0..15"),
        (_layer_9, "layer 9 is not an MoE layer of the model (its MoE layers are [0, 1, 2, 3])"),
        (lambda doc: None, None),  # the unedited file loads: the checks do not refuse good placements
    ],
)
def test_placement_naming_each_expert_other_than_once_is_refused(demo_export, tmp_path, edit, message):
    path = _edited(demo_export, tmp_path, edit)
    if message is None:
        assert len(Placement.load(path).layers) == 4
        return
    with pytest.raises(hc.HetMoEError, match="a placement names every expert of every MoE layer once"):
        Placement.load(path)
    with pytest.raises(hc.HetMoEError) as err:
        Placement.load(path)
    assert message in str(err.value)


def test_placement_edits_the_file_cannot_show_are_checked_against_the_model(tmp_path):
    """A placement whose model record was edited too is still checked against the model it is applied to."""
    model = tiny_model("olmoe")
    placement = hc.compile(model, PlacementPolicy(0.25)).placement
    doc = placement.to_dict()
    doc["model"]["num_experts"] = 7
    for layer in doc["layers"]:
        layer["experts"] = [e for e in layer["experts"] if e["id"] != 7]
    edited = Placement.from_dict(doc)
    with pytest.raises(hc.HetMoEError, match=r"placement: layer 0 does not place expert\(s\) \[7\]"):
        hc.compile(tiny_model("olmoe"), placement=edited)


@pytest.mark.parametrize("command", ["eval", "export"])
def test_cli_refuses_a_bad_placement_before_loading(demo_export, tmp_path, capsys, command, no_model_load):
    path = _edited(demo_export, tmp_path, _twice)
    out = tmp_path / "out"
    argv = [command, str(DEMO), "--placement", path, "--out", str(out / "x")]
    assert main(argv + (["--ppl", str(TEXT)] if command == "eval" else [])) == 2
    one_line(capsys, f"hetmoe-compile {command}: error:", "lists expert(s)")
    assert not out.exists()


def test_placement_that_is_a_json_array(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text("[1, 2]")
    assert main(["eval", str(DEMO), "--placement", str(path), "--ppl", str(TEXT), "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "a placement is a JSON object", "got a JSON array")


# ---- the Python API: types, seeds, stale handles -----------------------------------------------------------------


def test_a_handle_superseded_by_a_second_compile_refuses_to_act():
    model = tiny_model("olmoe")
    first = hc.compile(model, PlacementPolicy(0.25))
    second = hc.compile(model, PlacementPolicy(0.5))
    for act in (lambda: first.simulate(0), first.restore, lambda: first.export("unused"), first.report):
        with pytest.raises(hc.HetMoEError, match="this CompiledMoE is out of date"):
            act()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():  # the current handle simulates its own placement
        second.simulate(0)
        third = hc.compile(model, PlacementPolicy(0.25))  # compiling a simulated model again: the ideal model
        clean = tiny_model("olmoe")(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, clean, rtol=0, atol=1e-5)
    assert [len(l.ids("digital")) for l in third.placement.layers] == [2, 2]
    with pytest.raises(hc.HetMoEError, match="out of date"):
        second.simulate(0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: hc.compile(str(DEMO)), "model must be torch.nn.Module, got str"),
        (lambda m: hc.compile(m, {"digital_fraction": 0.25}), "policy must be PlacementPolicy, got dict"),
        (lambda m: hc.compile(m, analog=3), "analog must be AnalogConfig or str, got int"),
        (lambda m: hc.analyze(3), "model must be torch.nn.Module or str or Path, got int"),
        (lambda m: hc.analyze(m, "max-neuron-norm"), "selectors must be a list of names, got the string"),
        (lambda m: PlacementPolicy(digital_fraction="0.25"), "digital_fraction='0.25' must be a number in [0, 1]"),
        (lambda m: PlacementPolicy(seed=1.5), "placement seed=1.5 must be an integer >= 0"),
        (lambda m: hc.compile(m).simulate(seed=1.5), "seed=1.5 must be an integer >= 0"),
        (lambda m: hc.compile(m).simulate(seed="a"), "seed='a' must be an integer >= 0"),
        (lambda m: hc.compile(m).simulate(dense="quantum"), "dense='quantum' must be one of digital, analog"),
        (lambda m: hc.compile(m).export("unused", instance_seed="x"), "instance_seed='x' must be an integer >= 0"),
        (lambda m: analog_config("pcm", noise_scale=math.nan), "noise_scale=nan must be a finite number"),
        (lambda m: analog_config("pcm", t_inference=math.inf), "t_inference=inf must be a finite number"),
        (lambda m: analog_config("pcm", dac_bits=8.5), "dac_bits=8.5 must be an integer"),
    ],
)
def test_api_arguments_are_checked(call, message):
    model = tiny_model("olmoe")
    with pytest.raises(hc.HetMoEError) as err:
        call(model)
    assert message in str(err.value)


def test_simulate_checks_its_arguments_before_touching_the_model():
    model = tiny_model("olmoe")
    hc.compile(model)
    with pytest.raises(hc.HetMoEError, match="dense='quantum'"):
        simulate(model, analog_config("pcm"), 0, dense="quantum")
    assert not any(type(m).__name__ == "AnalogExpertGroup" for m in model.modules())


# ---- options are checked before any work; --out must be writable ---------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--noise-scale", "nan"], "argument --noise-scale: nan is not a finite number >= 0"),
        (["--noise-scale", "inf"], "argument --noise-scale: inf is not a finite number >= 0"),
        (["--t-inference", "0"], "argument --t-inference: 0 is not a finite number > 0"),
        (["--seed", "-3"], "argument --seed: -3 is negative"),
        (["--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
        (["--seeds", "0"], "argument --seeds: 0 must be >= 1"),
    ],
)
def test_eval_options_fail_at_parse_time(tmp_path, capsys, extra, message, no_model_load):
    out = tmp_path / "r.json"
    argv = ["eval", str(DEMO), "--digital-fraction", "0.25", "--ppl", str(TEXT), "--out", str(out), *extra]
    assert main(argv) == 2
    one_line(capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("command", ["place", "eval", "export", "analyze"])
def test_out_under_a_regular_file_or_unwritable_fails_before_loading(tmp_path, capsys, command, no_model_load):
    regular = tmp_path / "a-file"
    regular.write_text("")
    extra = {
        "place": ["--digital-fraction", "0.25"],
        "eval": ["--digital-fraction", "0.25", "--ppl", str(TEXT)],
        "export": ["--placement", str(tmp_path / "unused.json")],
        "analyze": [],
    }[command]
    for out, message in (
        (regular / "sub" / "out", f"{regular} is a file, not a directory"),
        ("/proc/hetmoe-test/out", "cannot create files in /proc"),  # /proc refuses new files, even for root
    ):
        assert main([command, str(DEMO), *extra, "--out", str(out)]) == 2
        one_line(capsys, f"hetmoe-compile {command}: error: --out {out}:", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_perplexity_text_below_the_minimum_is_refused(tmp_path, capsys, no_model_load):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    out = tmp_path / "r.json"
    assert main(["eval", str(DEMO), "--digital-fraction", "0.25", "--ppl", str(short), "--out", str(out)]) == 2
    one_line(capsys, "token(s) would be scored; a perplexity needs at least 32")
    argv = ["eval", str(DEMO), "--digital-fraction", "0.25", "--ppl", str(TEXT), "--ppl-tokens", "20"]
    assert main([*argv, "--out", str(out)]) == 2
    one_line(capsys, "19 token(s) would be scored (--ppl-tokens 20)")
    assert not out.exists()


def test_results_record_the_tokens_actually_scored(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "r.json"
    argv = ["eval", str(DEMO), "--digital-fraction", "1", "--noise", "ideal", "--seeds", "1", "--ppl", str(TEXT)]
    assert main([*argv, "--ppl-tokens", "100000", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ids = AutoTokenizer.from_pretrained(DEMO)(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    assert doc["ppl_tokens"] == len(ids) - 1 < 100000 and doc["ppl_max_tokens"] == 100000


# ---- interrupted and killed runs leave nothing ---------------------------------------------------------------


def _started(argv, cwd, wait: float = 0.3) -> subprocess.Popen:
    """The CLI in a subprocess, returned once it shows progress (it is inside the command then)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hetmoe_compile", *argv],
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        # as in a terminal: a test run started in the background inherits an ignored SIGINT, and Python keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    proc.stderr.read(1)  # the first progress output
    time.sleep(wait)
    return proc


@pytest.mark.parametrize("command", ["eval", "export"])
def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(demo_export, tmp_path, command):
    out = tmp_path / "out" / ("r.json" if command == "eval" else "onnx")
    extra = {
        "eval": ["--digital-fraction", "0.25", "--seeds", "40", "--ppl", str(TEXT)],  # a few seconds of work
        "export": ["--placement", str(demo_export[0]), "--instance-seed", "1"],
    }[command]
    proc = _started([command, str(DEMO), *extra, "--out", str(out)], tmp_path)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == f"hetmoe-compile {command}: interrupted; nothing was written" and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _interrupted_then(error: str, chained: bool):
    """A torch.export that is Ctrl-C'd and whose cleanup raises another error over it (as torch's mode stack
    does: "Trying to pop empty mode stack"), or that swallows the KeyboardInterrupt and fails later."""

    def export(*args, **kwargs):
        if chained:
            try:
                signal.raise_signal(signal.SIGINT)
            finally:
                raise RuntimeError(error)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise RuntimeError(error)  # no trace of the interrupt left in the exception

    return export


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "swallowed"])
def test_ctrl_c_that_a_library_turns_into_another_error_is_still_an_interruption(
    demo_export, tmp_path, capsys, monkeypatch, chained
):
    monkeypatch.setattr(torch.export, "export", _interrupted_then("Trying to pop empty mode stack", chained))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        out = tmp_path / "out" / "onnx"
        assert main(["export", str(DEMO), "--placement", str(demo_export[0]), "--out", str(out)]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "hetmoe-compile export: interrupted; nothing was written" and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert signal.getsignal(signal.SIGINT) is previous


def test_an_interruption_is_found_in_the_exception_chain_without_a_signal():
    from hetmoe_compile.cli.interrupts import interrupted, watching_interrupts

    def raised_over(inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            finally:
                raise RuntimeError("cleanup failed")
        except RuntimeError as exc:
            return exc

    with watching_interrupts():  # resets what an earlier SIGINT in this process left noted
        assert interrupted(raised_over(KeyboardInterrupt()))
        assert not interrupted(raised_over(ValueError("not an interruption")))
        assert not interrupted(RuntimeError("plain"))


def test_an_error_without_ctrl_c_is_still_reported_as_that_error(demo_export, tmp_path, capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("Trying to pop empty mode stack")

    monkeypatch.setattr(torch.export, "export", failing)
    out = tmp_path / "onnx"
    assert main(["export", str(DEMO), "--placement", str(demo_export[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "hetmoe-compile export: error: torch.export failed for OlmoeForCausalLM: Trying to pop empty mode stack"
    )
    assert not out.exists()


def test_a_killed_export_leaves_only_what_the_next_run_removes(demo_export, tmp_path):
    """kill -9 cannot be cleaned up after; what it leaves is one pid-named sibling of --out (torch.onnx's scratch
    inside it, not in the temp dir), which the next write to that --out removes."""
    import tempfile

    out = tmp_path / "onnx"
    scratch_before = set(Path(tempfile.gettempdir()).glob("hetmoe-onnx-*"))
    argv = ["export", str(DEMO), "--placement", str(demo_export[0]), "--out", str(out)]
    proc = _started(argv, tmp_path)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".onnx.tmp-*/.scratch/*")) and time.time() < deadline:
        time.sleep(0.05)  # until torch.onnx writes its scratch files
    proc.kill()
    proc.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [f".onnx.tmp-{proc.pid}-" + left[0].rsplit("-", 1)[1]], left
    assert set(Path(tempfile.gettempdir()).glob("hetmoe-onnx-*")) == scratch_before
    remove_stale_temps(out)  # what every atomic write to `out` does first
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "placement.json"
    stale_dir = tmp_path / f".placement.json.tmp-{dead.pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "half.onnx").write_bytes(b"\0" * 10)
    stale_file = tmp_path / f".placement.json.old-{dead.pid}-xyz"
    stale_file.write_text("")
    live = tmp_path / f".placement.json.tmp-{os.getpid()}-live"  # a run still at work: kept
    live.mkdir()
    other = tmp_path / f".other.json.tmp-{dead.pid}-abc"  # another output's temporaries: not ours to judge
    other.mkdir()
    atomic_write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["placement.json", live.name, other.name])
    shutil.rmtree(live)
