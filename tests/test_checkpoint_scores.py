"""Place without loading: a meta-device model and data-free scores read from the safetensors files one expert at a
time equal the loaded model's; broken checkpoints are one-line errors."""

import json

import numpy as np
import pytest
import torch
from helpers import FAMILIES, REF_MODEL

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.compose.pipeline import analyze_checkpoint, analyze_model
from hetmoe_compile.models import load_meta_model, load_model, recognize
from hetmoe_compile.models.checkpoint import Checkpoint
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.placement import PlacementPolicy, place

SELECTORS = ["max-neuron-norm", "router-norm", "random"]


def _same_scores(meta, full):
    for name in SELECTORS:
        for layer, values in full.scores[name].layers.items():
            np.testing.assert_array_equal(meta.scores[name].layers[layer], values)


@pytest.mark.skipif(not REF_MODEL.is_dir(), reason=f"needs {REF_MODEL} (the shared reference model)")
def test_reference_model_scores_and_placement_equal_the_loaded_model():
    meta_model, meta = analyze_checkpoint(str(REF_MODEL), SELECTORS, seed=3)
    assert all(p.is_meta for p in meta_model.parameters())
    model = load_model(str(REF_MODEL))
    full = analyze_model(model, SELECTORS, seed=3)
    _same_scores(meta, full)
    policy = PlacementPolicy(0.25)
    a = place(meta_model, meta.info, meta.scores["max-neuron-norm"], policy, "ref").to_dict()
    b = place(model, full.info, full.scores["max-neuron-norm"], policy, "ref").to_dict()
    assert a == b


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_scores_from_its_checkpoint(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    _, meta = analyze_checkpoint(str(tmp_path), SELECTORS)
    _same_scores(meta, analyze_model(model, SELECTORS))


def test_bf16_checkpoint_scores_in_its_dtype_and_float32_on_request(tmp_path):
    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    meta_model, meta = analyze_checkpoint(str(tmp_path), SELECTORS)
    assert next(meta_model.parameters()).dtype == torch.bfloat16
    _same_scores(meta, analyze_model(load_model(str(tmp_path)), SELECTORS))
    _, meta32 = analyze_checkpoint(str(tmp_path), SELECTORS, dtype=torch.float32)
    _same_scores(meta32, analyze_model(load_model(str(tmp_path), dtype=torch.float32), SELECTORS))


def test_sharded_checkpoint_and_its_faults(tmp_path, capsys):
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    _, meta = analyze_checkpoint(str(tmp_path), SELECTORS)
    _same_scores(meta, analyze_model(model, SELECTORS))
    shards[1].unlink()
    with pytest.raises(HetMoEError, match=f"1 of {len(shards)} checkpoint shards are missing .*download the complete"):
        Checkpoint(tmp_path)
    out = tmp_path / "placement.json"
    capsys.readouterr()
    assert main(["place", str(tmp_path), "--load", "meta", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint shards are missing" in err[0] and not out.exists()
    assert main(["place", str(tmp_path), "--load", "full", "--out", str(out)]) == 2  # loading says the same
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"1 of {len(shards)} checkpoint shards are missing" in err[0] and not out.exists()


def test_truncated_checkpoint_is_named(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HetMoEError, match="truncated safetensors file .*re-download or re-save"):
        load_meta_model(str(tmp_path))
    path.write_bytes(data[:4])
    with pytest.raises(HetMoEError, match="truncated safetensors file \\(no header\\)"):
        Checkpoint(tmp_path)


def test_checkpoint_that_does_not_match_its_config_is_named(tmp_path):
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 24  # the files hold width-16 experts
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        HetMoEError,
        match="expert 0 of model.layers.0.mlp.experts.gate_up_proj has shape \\(32, 32\\)"
        ", the model's config says \\(48, 32\\)",
    ):
        analyze_checkpoint(str(tmp_path), ["max-neuron-norm"])
    config["intermediate_size"], config["num_experts"] = 16, 12
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        HetMoEError,
        match="the checkpoint has no expert 8 for model.layers.0.mlp.experts.gate_up_proj; "
        "it does not match the model's config",
    ):
        analyze_checkpoint(str(tmp_path), ["max-neuron-norm", "router-norm"])


def test_cli_place_and_analyze_without_loading(tmp_path, capsys):
    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "m")
    src = str(tmp_path / "m")
    assert main(["place", src, "--load", "meta", "--out", str(tmp_path / "meta.json")]) == 0
    assert main(["place", src, "--load", "full", "--out", str(tmp_path / "full.json")]) == 0
    assert json.loads((tmp_path / "meta.json").read_text()) == json.loads((tmp_path / "full.json").read_text())
    assert main(["analyze", src, "--out", str(tmp_path / "a")]) == 0  # auto: data-free selectors, from the files
    doc = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert set(doc["selectors"]) == set(SELECTORS)
    capsys.readouterr()
    assert (
        main(
            [
                "place",
                src,
                "--load",
                "meta",
                "--selector",
                "measured",
                "--calib",
                src + "/config.json",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--load meta scores max-neuron-norm, router-norm, random without calibration text" in err
    assert not (tmp_path / "x.json").exists()


def test_meta_model_recognises_like_the_loaded_one(tmp_path):
    model = tiny_model("gpt_oss")
    model.save_pretrained(tmp_path)
    meta_model, _ = load_meta_model(str(tmp_path))
    a, b = recognize(meta_model), recognize(model)
    assert [l.experts for l in a.moe_layers] == [l.experts for l in b.moe_layers]
    assert [l.num_experts for l in a.moe_layers] == [l.num_experts for l in b.moe_layers]
