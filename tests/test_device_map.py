"""Models sharded with accelerate device maps, offload to disk included: scores, placement, simulation and eval equal
the unsharded model's; steps that need every weight resident, and bad maps, are one-line errors."""

import json

import pytest
import torch
from helpers import DEMO, logits

import hetmoe_compile as hc
from hetmoe_compile.analog import simulate
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.ir.expert_group import HetExperts
from hetmoe_compile.models import load_model, recognize
from hetmoe_compile.models.device_map import check_dtype_on_device, input_device, offloaded_modules, parse_device_map
from hetmoe_compile.models.tiny import tiny_model

pytest.importorskip("accelerate", reason="device maps need accelerate (make install)")

IDS = torch.tensor([[3, 7, 11, 2, 9, 4, 40, 41]])


def _offload_map(model, to_disk: list[str]) -> dict:
    """Every top-level block on the CPU except ``to_disk``."""
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    names += [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    return {n: ("disk" if n in to_disk else "cpu") for n in names}


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss"])
def test_offloaded_model_places_and_simulates_like_the_unsharded_one(tmp_path, family):
    tiny_model(family).save_pretrained(tmp_path / "m")
    full = load_model(str(tmp_path / "m"))
    last = f"model.layers.{full.config.num_hidden_layers - 1}"
    sharded = load_model(
        str(tmp_path / "m"), device_map=_offload_map(full, [last, "lm_head"]), offload_folder=str(tmp_path / "offload")
    )
    assert offloaded_modules(sharded) and input_device(sharded) == torch.device("cpu")
    # The same weights (read back from the offload files) and the same operations: equal logits, at every step
    # (measured: equal for the three families, placed, simulated and restored)
    assert torch.equal(logits(sharded, IDS), logits(full, IDS))
    a, b = hc.analyze(full), hc.analyze(sharded)
    for name, scores in a.scores.items():
        for layer, values in scores.layers.items():
            assert (b.scores[name].layers[layer] == values).all()
    cf = hc.compile(full, hc.PlacementPolicy(0.25), "pcm")
    cs = hc.compile(sharded, hc.PlacementPolicy(0.25), "pcm")
    assert cs.placement.devices() == cf.placement.devices()
    info = recognize(sharded)
    het = sharded.get_submodule(info.moe_layers[-1].experts)
    assert isinstance(het, HetExperts) and all(p.device.type == "cpu" for p in het.parameters())
    assert torch.equal(logits(sharded, IDS), logits(full, IDS))
    cf.simulate(seed=2)
    cs.simulate(seed=2)
    assert torch.equal(logits(sharded, IDS), logits(full, IDS))
    cf.restore()
    cs.restore()
    assert torch.equal(logits(sharded, IDS), logits(full, IDS))
    with pytest.raises(HetMoEError, match="ONNX export needs every weight in memory, but .* modules are offloaded"):
        cs.export(tmp_path / "onnx")
    with pytest.raises(HetMoEError, match="dense modules on tiles .* needs every weight in memory"):
        simulate(sharded, cs.analog, 0, dense="analog", info=recognize(sharded))


def test_cli_eval_with_disk_offload_equals_the_unsharded_run(tmp_path):
    calib = tmp_path / "text.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question. " * 20)
    common = [
        "eval",
        str(DEMO),
        "--digital-fraction",
        "0.25",
        "--noise",
        "pcm",
        "--seeds",
        "2",
        "--ppl",
        str(calib),
        "--ppl-tokens",
        "256",
    ]
    assert main(common + ["--out", str(tmp_path / "a.json")]) == 0
    dm = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    (tmp_path / "map.json").write_text(json.dumps(dm))
    assert (
        main(
            common
            + [
                "--device-map",
                str(tmp_path / "map.json"),
                "--offload-folder",
                str(tmp_path / "off"),
                "--out",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json"))
    assert set(a) == set(b) and "ppl" in a and all(k == "ppl" or k.startswith("routing/") for k in a)
    assert b["ppl"] == a["ppl"] and len(a["ppl"]["values"]) == 2  # measured: equal, instance for instance
    assert b["routing/topk_match"] == a["routing/topk_match"]  # the diagnostics too


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--device-map", "everywhere"],
            "--device-map everywhere: not a strategy (auto, balanced, balanced_low_0, "
            "sequential), a JSON object or a JSON file",
        ),
        (["--device-map", '{"model": "gpu7"}'], "module 'model' has device 'gpu7'; use cuda:N, N, cpu or disk"),
        (["--device-map", "{oops"], "--device-map {oops: not valid JSON"),
        (["--max-memory", "cpu=1GiB"], "--max-memory and --offload-folder go with --device-map"),
        (["--device-map", "auto", "--max-memory", "cpu"], "--max-memory cpu: expected DEVICE=SIZE"),
        (
            ["--device-map", "auto", "--max-memory", "cpu=100KB"],
            "cannot hold the model, and the rest would go to disk; pass --offload-folder DIR",
        ),
    ],
)
def test_bad_device_maps_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "p.json"
    assert main(["place", str(DEMO), "--load", "full", "--no-graph", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_parse_device_map_and_dtype_kernels(tmp_path, monkeypatch):
    assert parse_device_map("auto") == "auto"
    (tmp_path / "m.json").write_text('{"model.layers.0": 0, "lm_head": "cpu"}')
    assert parse_device_map(str(tmp_path / "m.json")) == {"model.layers.0": 0, "lm_head": "cpu"}
    check_dtype_on_device(torch.bfloat16, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(HetMoEError, match="Tesla V100 has no bfloat16 kernels; use --dtype float16 or float32"):
        check_dtype_on_device(torch.bfloat16, "cuda:0")
