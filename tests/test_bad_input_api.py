"""Bad input, cause 6 of issue 33: the Python API answers with one HetMoEError naming the argument, never a raw
error from deeper down (torch, dataclasses, jsonschema's view of 3.0 as an integer)."""

import json

import pytest
import torch
from helpers import DEMO

import hetmoe_compile as hc
from hetmoe_compile.models.tiny import tiny_model


@pytest.fixture(scope="module")
def placement_doc(tmp_path_factory):
    from hetmoe_compile.cli.app import main

    path = tmp_path_factory.mktemp("p") / "placement.json"
    assert main(["place", str(DEMO), "--no-graph", "--out", str(path)]) == 0
    return json.loads(path.read_text())


def _edited(doc, edit):
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return doc


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: hc.load_model(str(DEMO), device="gpu"), "device='gpu': unknown device; use cpu, cuda, cuda:N or auto"),
        (lambda: hc.analog_config("pcm", noize_scale=3), "analog_config: unknown field(s) noize_scale; the fields are"),
        (lambda: hc.compile(tiny_model("olmoe"), peers="hpd"), "peers must be a list of names, got the string 'hpd'"),
        (lambda: hc.analyze(tiny_model("olmoe"), "random"), "selectors must be a list of names, got the string"),
    ],
    ids=["device", "analog-field", "peers-string", "selectors-string"],
)
def test_api_arguments_name_the_problem(call, message):
    with pytest.raises(hc.HetMoEError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_load_model_on_cuda_without_it_is_one_line():
    with pytest.raises(hc.HetMoEError, match="device='cuda': CUDA is not available here; use device='cpu'"):
        hc.load_model(str(DEMO), device="cuda")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["layers"][0]["experts"][0].update(id=3.0), "layers/0/experts/0/id: 3.0 is not an integer"),
        (lambda d: d["layers"][0].update(index=0.0), "layers/0/index: 0.0 is not an integer"),
        (lambda d: d["layers"][0]["experts"][0].update(extra=1), "'extra' was unexpected"),
        (lambda d: d["policy"].update(dense_device="analog"), "'dense_device' was unexpected"),
        (lambda d: d["dense_modules"][0].update(note="mine"), "'note' was unexpected"),
        (lambda d: d["layers"][0]["experts"][0].pop("reason"), "'reason' is a required property"),
    ],
    ids=["float-id", "float-index", "extra-expert-key", "extra-policy-key", "extra-dense-key", "missing-reason"],
)
def test_a_placement_with_a_wrong_field_is_one_line(placement_doc, edit, message):
    with pytest.raises(hc.HetMoEError, match="invalid placement at") as err:
        hc.Placement.from_dict(_edited(placement_doc, edit), "p.json")
    assert message in str(err.value)
