"""Bad input, cause 2 of issue 33: a placement's fields that describe the model or follow from its devices are
checked against the model, never believed: the issue's example (``policy.dense = "analog"`` with every dense module
listed digital) and edits of fields it did not name."""

import json

import pytest
from helpers import DEMO

import hetmoe_compile as hc
from hetmoe_compile.cli.app import main


@pytest.fixture(scope="module")
def placement_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "placement.json"
    assert main(["place", str(DEMO), "--no-graph", "--out", str(path)]) == 0
    return json.loads(path.read_text())


def _dense_analog(doc):
    doc["policy"]["dense"] = "analog"  # the dense modules still say digital


def _one_module_analog(doc):
    doc["dense_modules"][0]["device"] = "analog"


def _share(doc):
    doc["parameter_share"]["digital"]["params"] += 1


def _module_path(doc):
    doc["layers"][0]["module"] = doc["layers"][1]["module"]


def _top_k(doc):
    doc["model"]["top_k"] += 1


def _architecture(doc):
    doc["model"]["architecture"] = "MixtralForCausalLM"


@pytest.mark.parametrize(
    "edit, message",
    [
        (_dense_analog, "dense_modules disagree with the model and policy.dense='analog'"),
        (_one_module_analog, "dense_modules disagree with the model and policy.dense='digital'"),
        (_share, "parameter_share disagrees with the experts' devices"),
        (_module_path, "layer 0's module is"),
        (_top_k, "model.top_k says"),
        (_architecture, "model.architecture says 'MixtralForCausalLM'"),
    ],
    ids=["policy-dense", "dense-module", "parameter-share", "module-path", "top-k", "architecture"],
)
def test_an_edited_placement_field_is_refused(placement_doc, tmp_path, capsys, edit, message):
    doc = json.loads(json.dumps(placement_doc))
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "r.json"
    argv = [
        "eval",
        str(DEMO),
        "--placement",
        str(path),
        "--noise",
        "ideal",
        "--ppl",
        str(DEMO.parent / "calibration.txt"),
    ]
    assert main([*argv, "--ppl-tokens", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "re-run 'hetmoe-compile place'" in err, err
    assert not out.exists()
    with pytest.raises(hc.HetMoEError, match="re-run 'hetmoe-compile place'"):  # the Python API: the same check
        hc.compile(hc.load_model(str(DEMO)), placement=hc.Placement.load(path))


def test_an_unedited_placement_is_accepted(placement_doc):
    compiled = hc.compile(hc.load_model(str(DEMO)), placement=hc.Placement.from_dict(placement_doc))
    assert compiled.placement.to_dict() == placement_doc
