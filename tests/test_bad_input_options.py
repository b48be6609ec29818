"""Bad input, cause 3 of issue 33: an option either acts or is refused, never silently ignored."""

import shutil

import pytest
import torch
from helpers import DEMO, one_line

from hetmoe_compile import runtime
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device is there")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", str(DEMO), "--placement", "{placement}", "--selector", "random", "--noise", "ideal"],
            "--selector places with --digital-fraction; --placement is placed already",
        ),
        (
            ["place", str(DEMO), "--override", "0:1=digital", "--override", "0:1=analog", "--no-graph"],
            "--override 0:1=analog: expert 0:1 is overridden twice",
        ),
        (["place", str(DEMO), "--max-memory", "cpu=1GiB", "--no-graph"], "--max-memory and --offload-folder go with"),
        (["place", str(DEMO), "--load", "meta", "--device", "cpu", "--no-graph"], "--device place a loaded model"),
        pytest.param(
            ["place", str(DEMO), "--device", "cuda", "--no-graph"], "CUDA is not available here", marks=NO_CUDA
        ),
    ],
    ids=["eval-selector-with-placement", "override-twice", "max-memory-without-map", "meta-with-device", "auto-cuda"],
)
def test_an_option_that_would_be_ignored_is_refused(demo_export, tmp_path, capsys, argv, message):
    """``place --load auto`` reads a data-free selector's scores from the files; given a device, a device map or
    memory limits it loads the model where they say instead, so bad values are refused as with ``--load full``."""
    argv = [a.format(placement=demo_export[0]) for a in argv] + ["--out", str(tmp_path / "out.json")]
    assert main(argv) == 2
    one_line(capsys, message)
    assert not (tmp_path / "out.json").exists()


def test_place_auto_with_a_device_loads_the_model_there(tmp_path, capsys, monkeypatch):
    """With ``--device cpu`` the model is loaded (not scored from its files), and the placement is the same."""
    calls = []
    import hetmoe_compile.models.loader as loader

    real = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: calls.append(k.get("device")) or real(*a, **k))
    monkeypatch.setattr("hetmoe_compile.models.load_model", loader.load_model)
    assert main(["place", str(DEMO), "--no-graph", "--device", "cpu", "--out", str(tmp_path / "a.json")]) == 0
    assert calls == ["cpu"]
    assert main(["place", str(DEMO), "--no-graph", "--out", str(tmp_path / "b.json")]) == 0
    assert calls == ["cpu"]  # without it: from the files, no model loaded
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_executors_for_a_device_the_export_does_not_have_are_refused(demo_export, tmp_path):
    _, out = demo_export
    with pytest.raises(HetMoEError, match=r"executors for 'Analog': the export's partitions run on analog, digital"):
        runtime.load(out, executors={"Analog": lambda partition, feeds: None})
    with pytest.raises(HetMoEError, match=r"executors\['analog'\] is not callable"):
        runtime.load(out, executors={"analog": "not a function"})
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert runtime.load(copy, executors={"analog": lambda partition, feeds: None}).executors  # a real device: kept


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", str(DEMO), "--placement", "{placement}", "--seed", "3"], "--seed has no effect here"),
        (["eval", str(DEMO), "--digital-fraction", "0.25", "--seed", "3"], "--seed has no effect here"),
        (["eval", str(DEMO), "--placement", "{placement}", "--hpd-rank", "4"], "--hpd-rank has no effect here"),
        (["eval", str(DEMO), "--placement", "{placement}", "--hpd-targets", "lm_head"], "--hpd-targets has no"),
        (["eval", str(DEMO), "--placement", "{placement}", "--group-size", "32"], "--group-size has no effect here"),
        (["eval", str(DEMO), "--placement", "{placement}", "--romer-threshold", "0.1"], "--romer-threshold has no"),
        (["place", str(DEMO), "--seed", "3", "--no-graph"], "--seed has no effect here"),
        (["calibrate-ranges", str(DEMO), "--calib", str(DEMO), "--seed", "1"], "--seed has no effect here"),
        (["export", str(DEMO), "--placement", "{placement}", "--group-size", "32"], "--group-size has no effect"),
    ],
    ids=[
        "eval-seed-placement",
        "eval-seed-mnn",
        "hpd-rank",
        "hpd-targets",
        "group-size",
        "romer",
        "place-seed",
        "calibrate-seed",
        "export-group-size",
    ],
)
def test_an_option_whose_feature_is_off_is_refused(demo_export, tmp_path, capsys, no_model_load, argv, message):
    argv = [a.format(placement=demo_export[0]) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    one_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_the_same_options_act_with_their_feature(demo_export, tmp_path):
    """With their feature on they are taken: ``--seed`` with the random selector changes the placement."""
    out = [tmp_path / f"p{seed}.json" for seed in (1, 2)]
    for seed, path in zip((1, 2), out):
        argv = ["place", str(DEMO), "--selector", "random", "--seed", str(seed), "--no-graph", "--out", str(path)]
        assert main(argv) == 0
    assert out[0].read_text() != out[1].read_text()
