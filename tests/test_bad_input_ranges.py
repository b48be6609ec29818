"""Bad input, cause 5 of issue 33: input ranges are bound to the model they were calibrated on, wherever they are
attached (Python, the backend's option, export, the CLI), so another model's ranges never run without a word."""

from dataclasses import replace

import pytest
import torch
from helpers import placed, token_ids

import hetmoe_compile as hc
from hetmoe_compile.analog.input_ranges import attach_input_ranges, attached_input_ranges, calibrate_input_ranges
from hetmoe_compile.models.calibration import Calibration
from hetmoe_compile.models.identity import config_hash
from hetmoe_compile.models.tiny import tiny_model


def _ranges(model, info):
    cal = Calibration(token_ids(3, 32, model.config.vocab_size, seed=5), "random ids")
    return calibrate_input_ranges(model, info, cal, 16)


@pytest.fixture(scope="module")
def two_models():
    """Two tiny OLMoEs of the same shapes whose configs differ in one field no shape shows (initializer_range)."""
    mine, info, _ = placed("olmoe")
    other = tiny_model("olmoe")
    other.config.initializer_range = other.config.initializer_range * 2
    other_model, other_info, _ = placed("olmoe", model=other)
    return (mine, info), (other_model, other_info)


def test_calibrated_ranges_carry_the_model_hash(two_models):
    (mine, info), _ = two_models
    ranges = _ranges(mine, info)
    assert ranges.model["config_sha256"] == config_hash(mine)
    assert ranges.model["architecture"] == info.architecture
    assert ranges.model["source"] == str(mine.name_or_path)
    assert (
        calibrate_input_ranges(mine, info, Calibration(token_ids(3, 32, 128, seed=5)), 16, source="x").model["source"]
        == "x"
    )


def test_attach_refuses_another_models_ranges(two_models):
    (mine, info), (other, other_info) = two_models
    theirs = _ranges(other, other_info)
    with pytest.raises(hc.HetMoEError, match="input ranges were calibrated on another model"):
        attach_input_ranges(mine, theirs, info)
    with pytest.raises(hc.HetMoEError, match="calibrated on another model"):
        attach_input_ranges(mine, theirs)  # without info too: the hash needs none
    assert attached_input_ranges(mine) is None


@pytest.mark.parametrize(
    "edit",
    [lambda m: {}, lambda m: {**m, "config_sha256": None}, lambda m: {**m, "config_sha256": "0" * 64}],
    ids=["no-identity", "no-hash", "other-hash"],
)
def test_any_edit_of_the_stamp_is_refused(two_models, edit):
    """The check is general: not only another model's file, any stamp that does not name this model."""
    (mine, info), _ = two_models
    ranges = _ranges(mine, info)
    edited = replace(ranges, model=edit(dict(ranges.model)))
    with pytest.raises(hc.HetMoEError, match="no model hash|another model"):
        attach_input_ranges(mine, edited, info)
    attach_input_ranges(mine, ranges, info)  # its own ranges attach
    assert attached_input_ranges(mine) is ranges
    attach_input_ranges(mine, None)


def test_the_backend_refuses_another_models_ranges(two_models, tmp_path):
    (_, _), (other, other_info) = two_models
    theirs = _ranges(other, other_info)
    path = theirs.save(tmp_path / "theirs.json")
    model = tiny_model("olmoe")
    ids = token_ids(1, 8)
    for given in (theirs, str(path)):
        torch._dynamo.reset()
        fwd = torch.compile(
            type(model).forward.__get__(model),
            backend="hetmoe",
            options={"noise": "standard-hwa", "seed": 1, "input_ranges": given},
        )
        with pytest.raises(hc.HetMoEError, match="backend option input_ranges were calibrated on another model"):
            with torch.no_grad():
                fwd(input_ids=ids, use_cache=False)
    torch._dynamo.reset()


def test_export_refuses_another_models_ranges_attached_earlier(two_models, tmp_path):
    """Ranges attached by hand (bypassing the check) are checked again where export uses them."""
    from hetmoe_compile.analog.input_ranges import ATTRIBUTE
    from hetmoe_compile.export import ExportOptions, export_onnx

    (mine, info), (other, other_info) = two_models
    model, info, placement = placed("olmoe")
    object.__setattr__(model, ATTRIBUTE, _ranges(other, other_info))
    cfg = hc.analog_config("standard-hwa")
    with pytest.raises(hc.HetMoEError, match="calibrated on another model"):
        export_onnx(model, placement, tmp_path / "x", ExportOptions(cfg, progress=False))
    assert not (tmp_path / "x").exists()
