"""Bad input, cause 1 of issue 33: no command may destroy a user's files. An export replaces only a directory that
an earlier export wrote, and no output may replace an input (the same file, a hard link to it, a file of an input
directory, or a directory that holds an input)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import DEMO, REPO, one_line, placed

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.base.io import check_inputs_survive
from hetmoe_compile.cli.app import main
from hetmoe_compile.eval.harness_tasks import write_local_tasks

TEXT = REPO / "examples" / "calibration.txt"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def web_project(tmp_path) -> Path:
    """A folder that is not an export but holds a ``manifest.json`` (a web app's)."""
    site = tmp_path / "site"
    (site / "src").mkdir(parents=True)
    (site / "manifest.json").write_text(json.dumps({"name": "My app", "start_url": "/", "display": "standalone"}))
    (site / "index.html").write_text("<!doctype html><title>mine</title>")
    (site / "src" / "app.js").write_text("console.log('mine')")
    return site


def test_export_refuses_a_folder_whose_manifest_is_not_an_export(demo_export, web_project, capsys, no_model_load):
    placement, _ = demo_export
    before = _snapshot(web_project)
    assert main(["export", str(DEMO), "--placement", str(placement), "--out", str(web_project)]) == 2
    one_line(capsys, f"--out {web_project}", "manifest.json was not written by hetmoe-compile")
    assert _snapshot(web_project) == before
    assert sorted(p.name for p in web_project.parent.iterdir()) == ["site"]  # no temporary sibling either


@pytest.mark.parametrize(
    "manifest",
    [
        {"producer": "webpack 5", "schema_version": "1.1", "partitions": [], "schedule": []},  # another producer
        {"producer": "hetmoe-compile 0.1.0", "name": "My app"},  # our producer, not an export's fields
        "not json {",
        ["hetmoe-compile"],
    ],
    ids=["other-producer", "not-an-export", "not-json", "not-an-object"],
)
def test_export_from_python_refuses_the_same_folders(tmp_path, web_project, manifest):
    from hetmoe_compile.export import export_onnx

    model, _, placement = placed()
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (web_project / "manifest.json").write_text(text)
    before = _snapshot(web_project)
    with pytest.raises(HetMoEError, match="out_dir .*: its manifest.json was not written by hetmoe-compile"):
        export_onnx(model, placement, web_project)
    assert _snapshot(web_project) == before


def test_an_earlier_export_is_still_replaced(demo_export, tmp_path):
    placement, out = demo_export
    target = tmp_path / "again"
    shutil.copytree(out, target)
    assert main(["export", str(DEMO), "--placement", str(placement), "--monolithic", "--out", str(target)]) == 0
    assert json.loads((target / "manifest.json").read_text())["producer"].startswith("hetmoe-compile")
    assert "model.onnx" in {p.name for p in target.iterdir()}


def test_export_refuses_an_out_that_holds_its_placement(demo_export, tmp_path, capsys, no_model_load):
    placement, out = demo_export
    target = tmp_path / "earlier-export"
    shutil.copytree(out, target)  # an export this package wrote, so replaceable, but the placement lives in it
    kept = target / "placement.json"
    shutil.copy(placement, kept)
    before = kept.read_bytes()
    assert main(["export", str(DEMO), "--placement", str(kept), "--out", str(target)]) == 2
    one_line(capsys, f"--out {target}: holds --placement {kept}", "choose an --out that holds none of the inputs")
    assert kept.read_bytes() == before


def test_export_from_python_refuses_to_replace_the_model_directory(tmp_path):
    from hetmoe_compile import compile as hc_compile
    from hetmoe_compile.models import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(DEMO, model_dir)
    export = tmp_path / "wrapper"
    export.mkdir()
    (export / "manifest.json").write_text(  # a folder that looks like our export, holding the model
        json.dumps({"producer": "hetmoe-compile 0.1.0", "schema_version": "1.1", "partitions": [], "schedule": []})
    )
    inner = export / "model"
    shutil.move(model_dir, inner)
    before = _snapshot(export)
    compiled = hc_compile(load_model(str(inner)))
    with pytest.raises(HetMoEError, match=r"out_dir .*wrapper: holds the model's directory"):
        compiled.export(export)
    assert _snapshot(export) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", str(DEMO), "--placement", "{placement}", "--noise", "ideal", "--out", "{placement}"],
            "is the --placement file, and an output may not replace an input",
        ),
        (  # a hard link to the placement is the same file
            ["eval", str(DEMO), "--placement", "{placement}", "--noise", "ideal", "--out", "{link}"],
            "is the --placement file",
        ),
        (
            ["eval", str(DEMO), "--digital-fraction", "0.25", "--ppl", "{text}", "--out", "{text}"],
            "is the --ppl file",
        ),
        (
            ["eval", "{model}", "--digital-fraction", "0.25", "--ppl", "{text}", "--out", "{model}/config.json"],
            "would replace a file of MODEL",
        ),
        (  # the routing plot eval writes beside its results
            ["eval", str(DEMO), "--digital-fraction", "0.25", "--ppl", "{dir}/r.routing.png", "--out", "{dir}/r.json"],
            "r.routing.png: is the --ppl file",
        ),
        (["place", str(DEMO), "--calib", "{text}", "--out", "{text}"], "is the --calib file"),
        (["place", str(DEMO), "--cost-config", "{cost}", "--out", "{cost}"], "is the --cost-config file"),
        (["calibrate-ranges", str(DEMO), "--calib", "{text}", "--out", "{text}"], "is the --calib file"),
        (["analyze", str(DEMO), "--calib", "{dir}/scores.json", "--out", "{dir}"], "scores.json: is the --calib file"),
        (
            ["sweep", str(DEMO), "--selectors", "random", "--ppl", "{dir}/text.txt", "--out", "{dir}"],
            "holds --ppl",
        ),
    ],
    ids=[
        "eval-out-is-placement",
        "eval-out-is-hard-link",
        "eval-out-is-ppl",
        "eval-out-in-model-dir",
        "eval-plot-is-ppl",
        "place-out-is-calib",
        "place-out-is-cost-config",
        "calibrate-out-is-calib",
        "analyze-out-holds-calib",
        "sweep-out-holds-ppl",
    ],
)
def test_no_output_replaces_an_input(demo_export, tmp_path, capsys, no_model_load, argv, message):
    placement = tmp_path / "placement.json"
    shutil.copy(demo_export[0], placement)
    os.link(placement, tmp_path / "link.json")
    (tmp_path / "d").mkdir()
    shutil.copy(TEXT, tmp_path / "d" / "text.txt")
    shutil.copy(TEXT, tmp_path / "d" / "scores.json")
    shutil.copy(TEXT, tmp_path / "d" / "r.routing.png")
    shutil.copy(TEXT, tmp_path / "text.txt")
    (tmp_path / "cost.json").write_text("{}")
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(DEMO / "config.json", model / "config.json")
    values = {
        "placement": placement,
        "link": tmp_path / "link.json",
        "text": tmp_path / "text.txt",
        "dir": tmp_path / "d",
        "cost": tmp_path / "cost.json",
        "model": model,
    }
    argv = [a.format(**values) for a in argv]
    before = _snapshot(tmp_path)
    assert main(argv) == 2
    one_line(capsys, message)
    assert _snapshot(tmp_path) == before


def test_outputs_beside_inputs_are_fine(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "placement.json").write_text("{}")
    check_inputs_survive(  # a new file in the model's folder, and an export beside the placement
        {"MODEL": tmp_path / "model", "--placement": tmp_path / "placement.json", "--calib": None},
        files={"--out": [tmp_path / "model" / "results.json"]},
        directories={"--out2": tmp_path / "export"},
    )
    check_inputs_survive({"MODEL": "owner/name"}, files={"--out": [tmp_path / "r.json"]})  # a hub id: no path


def test_local_tasks_refuse_a_folder_they_did_not_write(tmp_path):
    data = REPO.parent / "shared" / "data" / "qa"
    if not (data / "piqa.jsonl").is_file():
        pytest.skip(f"{data} is absent (needs the shared/ checkout beside the repo)")
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "hetmoe_tasks.json").write_text(json.dumps({"tasks": ["mine"]}))  # the marker's name, not our file
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HetMoEError, match="hetmoe_tasks.json was not written by hetmoe-compile"):
        write_local_tasks(data, out)
    assert (out / "notes.txt").read_text() == "keep me"
    out2 = tmp_path / "tasks2"
    names = write_local_tasks(data, out2)
    assert "piqa" in names and write_local_tasks(data, out2) == names  # its own output is replaced
