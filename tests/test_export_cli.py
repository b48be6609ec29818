"""The export and run commands on the demo model: files, printed output, and bad input (one line, exit 2)."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import DEMO

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main


def test_export_writes_partitions_manifest_and_tokenizer(demo_export, capsys):
    placement, out = demo_export
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["model"]["source"] == str(DEMO) and doc["tokenizer"] == "tokenizer"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert doc["analog"]["config"]["preset"] == "pcm" and doc["analog"]["instance_seed"] == 5
    names = [p["name"] for p in doc["partitions"]]
    assert names == [
        "digital_0",
        "analog_L0",
        "digital_1",
        "analog_L1",
        "digital_2",
        "analog_L2",
        "digital_3",
        "analog_L3",
        "digital_4",
    ]
    files = {p.name for p in out.iterdir()}
    assert {f"{n}.onnx" for n in names} | {f"analog_L{i}.instance.onnx" for i in range(4)} <= files
    assert not [f for f in out.parent.iterdir() if f.name.startswith(".")]  # no temporary leftovers


def test_run_generates_from_a_prompt_and_from_ids(demo_export, capsys):
    _, out = demo_export
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "The king said", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The king said")
    assert "new tokens in" in captured.err and "analog partitions: instance" in captured.err
    assert main(["run", str(out), "--ids", "5,6,7", "--max-new-tokens", "3", "--analog", "ideal"]) == 0
    captured = capsys.readouterr()
    tokens = captured.out.split()
    assert tokens[:3] == ["5", "6", "7"] and 3 < len(tokens) <= 6
    assert "analog partitions: ideal" in captured.err


def test_run_decodes_a_left_padded_batch_and_samples_with_a_seed(demo_export, capsys):
    """Two prompts of different lengths in one batch give each prompt's own tokens; --sample draws what
    ``Runner.generate`` draws with the same seed, and the seed decides. (Ideal partitions: the instance's output
    noise is drawn per MVM, so its tokens depend on what else is in the batch.)"""
    from hetmoe_compile import runtime

    _, out = demo_export
    runner = runtime.load(out, analog="ideal")
    capsys.readouterr()
    ideal = ["--analog", "ideal"]
    assert main(["run", str(out), "--ids", "5,6,7,8,9", "--ids", "11,12", "--max-new-tokens", "4", *ideal]) == 0
    printed = capsys.readouterr().out.split("\n\n")
    rows = [block.split("\n", 1)[1].split() for block in printed]
    assert rows[0] == [str(t) for t in runner.generate([[5, 6, 7, 8, 9]], 4)[0]]
    assert rows[1] == [str(t) for t in runner.generate([[11, 12]], 4)[0]]

    def sampled(seed):
        argv = ["run", str(out), "--ids", "5,6,7", "--max-new-tokens", "8", "--sample", "--seed", str(seed), *ideal]
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert f"sampled, seed {seed}" in captured.err
        return captured.out.split()

    expected = runner.generate([[5, 6, 7]], 8, sampling=runtime.Sampling(seed=3))[0]
    assert sampled(3) == [str(t) for t in expected] == sampled(3)
    assert sampled(4) != sampled(3)


def test_analog_partitions_take_their_own_thread_count_and_compute_the_same(demo_export, capsys):
    import numpy as np

    from hetmoe_compile import runtime

    _, out = demo_export
    base = runtime.load(out, analog="ideal", threads=2)
    split = runtime.load(out, analog="ideal", threads=2, analog_threads=1)
    counts = {n: s.get_session_options().intra_op_num_threads for n, s in split.sessions.items()}
    assert counts == {n: 1 if n.startswith("analog") else 2 for n in base.sessions}
    assert {s.get_session_options().intra_op_num_threads for s in base.sessions.values()} == {2}
    ids = np.array([[5, 6, 7, 8]])
    assert np.array_equal(split(ids), base(ids))
    capsys.readouterr()
    argv = ["run", str(out), "--ids", "5,6,7", "--max-new-tokens", "4", "--analog", "ideal"]
    assert main([*argv, "--threads", "2", "--analog-threads", "1"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in base.generate([[5, 6, 7]], 4)[0]]
    with pytest.raises(HetMoEError, match="analog_threads must be an integer >= 0"):
        runtime.load(out, analog_threads=-1)


def test_reexport_replaces_the_directory(demo_export, tmp_path):
    placement, out = demo_export
    target = tmp_path / "again"
    shutil.copytree(out, target)  # a partitioned export with instance partitions
    assert any(p.name.endswith(".instance.onnx") for p in target.iterdir())
    (target / "stale.txt").write_text("from an earlier run")
    assert main(["export", str(DEMO), "--placement", str(placement), "--monolithic", "--out", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.onnx", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name != "again"]  # no temporary sibling left


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", str(DEMO), "--placement", "{tmp}/missing.json", "--out", "{tmp}/x"], "placement file not found"),
        (
            ["export", str(DEMO), "--placement", "{placement}", "--noise", "loud", "--out", "{tmp}/x"],
            "unknown noise preset 'loud'",
        ),
        (
            [
                "export",
                str(DEMO),
                "--placement",
                "{placement}",
                "--noise",
                "ideal",
                "--instance-seed",
                "1",
                "--out",
                "{tmp}/x",
            ],
            "'ideal' preset programs nothing",
        ),
        (
            ["export", str(DEMO), "--placement", "{placement}", "--t-inference", "1,3600", "--out", "{tmp}/x"],
            "--t-inference 1,3600: export programs one instance at one time; give one value",
        ),
        (
            ["export", str(DEMO), "--placement", "{placement}", "--w-noise", "-1", "--out", "{tmp}/x"],
            "-1 is not a finite number >= 0",
        ),
        (
            ["export", str(DEMO), "--placement", "{placement}", "--out", "{tmp}/full"],
            "directory is not empty and holds no manifest.json",
        ),
        (["export", "{other}", "--placement", "{placement}", "--out", "{tmp}/x"], "placement was made for another"),
        (["run", "{tmp}", "--prompt", "hi"], "no manifest.json"),
        (["run", "{export}", "--ids", "1,x"], "expected comma-separated integers"),
        (["run", "{export}", "--ids", "99999"], "token ids must lie in [0, 4096)"),
        (["run", "{export}", "--ids", "5", "--temperature", "0.5"], "--temperature only apply with --sample"),
        (["run", "{export}", "--ids", "5", "--sample", "--top-p", "1.5"], "top_p must lie in (0, 1]"),
        (["run", "{export}", "--ids", "5", "--sample", "--temperature", "0"], "0 is not a finite number > 0"),
        (["run", "{export}", "--ids", "5", "--analog-threads", "0"], "0 must be >= 1"),
    ],
)
def test_bad_input_one_line_exit_2(demo_export, tmp_path, argv, message, capsys):
    placement, out = demo_export
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((DEMO / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        AutoModelForCausalLM.from_pretrained(DEMO).config.__class__(**{**cfg, "num_hidden_layers": 2})
    ).save_pretrained(other)
    argv = [a.format(tmp=tmp_path, placement=placement, export=out, other=other) for a in argv]
    capsys.readouterr()  # the set-up's own output (transformers' loading bars, unless an earlier CLI call hid them)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


def test_run_console_script_without_tokenizer_names_the_fix(demo_export, tmp_path):
    import shutil

    _, out = demo_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "tokenizer")
    res = subprocess.run(
        [sys.executable, "-m", "hetmoe_compile", "run", str(copy), "--prompt", "hello"], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "the export has no tokenizer" in res.stderr and "--ids" in res.stderr
