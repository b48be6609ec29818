"""Placement policy: fractions, scopes, overrides, dense switch, parameter shares, JSON + schema."""

import json
import math

import numpy as np
import pytest

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.placement import Placement, PlacementPolicy, parse_override, place, validate_placement
from hetmoe_compile.scoring import score
from hetmoe_compile.scoring.base import Scores
from hetmoe_compile.scoring.random_scores import score_random


def _scores(info, seed=0):
    return Scores("test", score_random(None, info, seed=seed))


@pytest.mark.parametrize("fraction", [0.0, 0.125, 0.25, 0.3, 0.5, 1.0])
def test_per_layer_takes_top_ceil_fraction(olmoe, fraction):
    model, info = olmoe
    scores = _scores(info)
    p = place(model, info, scores, PlacementPolicy(digital_fraction=fraction))
    for layer in p.layers:
        s = scores.layers[layer.index]
        k = math.ceil(fraction * len(s) - 1e-9)
        assert sorted(layer.ids("digital")) == sorted(np.argsort(-s, kind="stable")[:k].tolist())
        assert len(layer.ids("analog")) == len(s) - k


def test_global_scope_ranks_across_layers(olmoe):
    model, info = olmoe
    scores = _scores(info)
    # make layer 0 dominate: every one of its experts outranks all of layer 1
    scores.layers[0] = scores.layers[0] + 10
    p = place(model, info, scores, PlacementPolicy(digital_fraction=0.5, scope="global"))
    by_layer = {l.index: l for l in p.layers}
    assert len(by_layer[0].ids("digital")) == 8 and by_layer[1].ids("digital") == []


def test_overrides_win_and_say_so(olmoe):
    model, info = olmoe
    scores = _scores(info)
    base = place(model, info, scores, PlacementPolicy(digital_fraction=0.25))
    analog_one = base.layers[0].ids("analog")[0]
    digital_one = base.layers[1].ids("digital")[0]
    p = place(
        model,
        info,
        scores,
        PlacementPolicy(digital_fraction=0.25, overrides={f"0:{analog_one}": "digital", f"1:{digital_one}": "analog"}),
    )
    assert analog_one in p.layers[0].ids("digital")
    assert digital_one in p.layers[1].ids("analog")
    assert p.layers[0].experts[analog_one].reason == f"override 0:{analog_one}=digital"


def test_bad_override_and_policy_values(olmoe):
    model, info = olmoe
    with pytest.raises(HetMoEError, match="no such MoE layer/expert"):
        place(model, info, _scores(info), PlacementPolicy(overrides={"0:99": "digital"}))
    with pytest.raises(HetMoEError, match=r"in \[0, 1\]"):
        PlacementPolicy(digital_fraction=1.5)
    with pytest.raises(HetMoEError, match="scope"):
        PlacementPolicy(scope="everywhere")
    with pytest.raises(HetMoEError, match="LAYER:EXPERT=DEVICE"):
        parse_override("0-5=digital")
    with pytest.raises(HetMoEError, match="device must be one of"):
        parse_override("0:5=gpu")


def test_parameter_share_adds_up_and_dense_switch(olmoe):
    model, info = olmoe
    total = sum(p.numel() for p in model.parameters())
    expert_total = sum(
        model.get_submodule(l.experts).gate_up_proj.numel() + model.get_submodule(l.experts).down_proj.numel()
        for l in info.moe_layers
    )
    scores = _scores(info)
    all_analog = place(model, info, scores, PlacementPolicy(digital_fraction=0.0))
    share = all_analog.parameter_share
    assert share["digital"]["params"] + share["analog"]["params"] == total
    assert share["analog"]["params"] == expert_total  # dense stays digital
    ablation = place(model, info, scores, PlacementPolicy(digital_fraction=0.0, dense="analog"))
    assert ablation.parameter_share["analog"]["params"] == total
    assert {d.device for d in ablation.dense_modules} == {"analog"}
    kinds = {d.kind for d in all_analog.dense_modules}
    assert {"embedding", "attention", "norm", "router", "lm_head"} <= kinds


def test_json_round_trip_and_schema(olmoe, tmp_path):
    model, info = olmoe
    p = place(model, info, score(model, info, "max-neuron-norm"), PlacementPolicy(), source="tiny")
    path = p.save(tmp_path / "sub" / "placement.json")
    doc = json.loads(path.read_text())
    for key in ("schema_version", "model", "policy", "layers", "dense_modules", "parameter_share"):
        assert key in doc
    assert doc["layers"][0]["experts"][0].keys() >= {"id", "score", "device"}
    again = Placement.load(path)
    assert again.devices() == p.devices()
    assert [f.name for f in tmp_path.joinpath("sub").iterdir()] == ["placement.json"]  # no temp file left
    bad = dict(
        doc, layers=[{"index": 0, "module": "x", "experts": [{"id": 0, "score": 1.0, "device": "gpu", "reason": ""}]}]
    )
    with pytest.raises(HetMoEError, match="invalid placement at layers/0/experts/0/device"):
        validate_placement(bad)
    with pytest.raises(HetMoEError, match="schema version 2.0 is not supported"):
        validate_placement(dict(doc, schema_version="2.0"))


def test_canonicalize_rejects_device_maps_it_would_ignore():
    from hetmoe_compile.transforms.canonicalize import canonicalize

    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="names layer '0'"):
        canonicalize(model, {"0": {3: "analog"}})
    with pytest.raises(ValueError, match="names expert 99 of layer 0"):
        canonicalize(model, {0: {99: "analog"}})


def test_a_placement_follows_the_model_not_the_path_it_was_loaded_from(tmp_path, monkeypatch):
    """The config hash leaves out ``_name_or_path``: a placement made from ``examples/olmoe-demo`` fits the same
    model loaded by its absolute path; a placement carrying the older, path-dependent hash is still accepted; a
    changed config is refused."""
    import os

    from helpers import DEMO, REPO

    from hetmoe_compile.compose.pipeline import place_model
    from hetmoe_compile.models import load_model, recognize
    from hetmoe_compile.placement.placement import check_placement_matches, config_hash

    monkeypatch.chdir(REPO)
    relative = load_model(os.path.relpath(DEMO, REPO))
    absolute = load_model(str(DEMO))
    assert relative.config._name_or_path != absolute.config._name_or_path
    assert config_hash(relative) == config_hash(absolute)
    assert config_hash(relative, legacy=True) != config_hash(absolute, legacy=True)
    placement = place_model(relative, PlacementPolicy(0.25))
    check_placement_matches(placement, absolute, recognize(absolute), "p.json")
    legacy = Placement.from_dict(
        {**placement.to_dict(), "model": {**placement.model, "config_sha256": config_hash(relative, legacy=True)}}
    )
    check_placement_matches(legacy, relative, recognize(relative), "old.json")
    absolute.config.rope_theta = 1.0
    with pytest.raises(HetMoEError, match="placement was made for another model"):
        check_placement_matches(placement, absolute, recognize(absolute), "p.json")
