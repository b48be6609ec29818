"""The peers as passes (ROMER, HPD, low-bit digital experts): composition, undo, and their rows in `sweep` and
`eval` (with the energy column and the Pareto plot)."""

import json
from pathlib import Path

import pytest
import torch

from hetmoe_compile.analog.config import analog_config
from hetmoe_compile.calibration import Calibration
from hetmoe_compile.canonicalize import canonicalize
from hetmoe_compile.cli import main
from hetmoe_compile.errors import HetMoEError
from hetmoe_compile.eval.sweep import pareto_front, sweep_jobs
from hetmoe_compile.models.recognize import recognize
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.peers import PEERS, PeerContext, PeerOptions, apply_peers, check_peers
from hetmoe_compile.placement.placement import place
from hetmoe_compile.placement.policy import PlacementPolicy
from hetmoe_compile.scoring import score

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "olmoe-demo"
TEXT = REPO / "examples" / "calibration.txt"


def test_sweep_jobs_add_each_peer_alone_and_with_the_first_selector():
    jobs = sweep_jobs([0.0, 0.25, 1.0], ["max-neuron-norm", "random"], True, ["hpd", "int4"])
    assert [j.label for j in jobs] == [
        "all-digital",
        "all-analog",
        "dense-digital",
        "max-neuron-norm 0.25",
        "random 0.25",
        "max-neuron-norm 0.25 (dense analog)",
        "hpd",
        "hpd + max-neuron-norm 0.25",
        "int4",
        "int4 + max-neuron-norm 0.25",
    ]
    by = {j.label: j for j in jobs}
    assert by["hpd"].fraction == 0.0 and by["int4"].fraction == 1.0  # low-bit alone: every expert digital, INT4
    assert by["int4 + max-neuron-norm 0.25"].peer == "int4" and by["hpd"].dense == "digital"


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 300.0), (2.0, 280.0), (2.5, 290.0), (3.0, 250.0), (3.0, 260.0), (0.5, 400.0)]
    assert pareto_front(pts, lower_is_better=True) == [5, 0, 1, 3]
    acc = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7)]
    assert pareto_front(acc, lower_is_better=False) == [0, 2]


def test_check_peers_errors():
    with pytest.raises(HetMoEError, match="unknown peer.*magic; choose from romer"):
        check_peers(["magic"], True)
    with pytest.raises(HetMoEError, match="int8 and int4 both quantise"):
        check_peers(["int8", "int4"], True)
    with pytest.raises(HetMoEError, match="romer, romer-replace overlap"):
        check_peers(["romer", "romer-replace"], True)
    with pytest.raises(HetMoEError, match="fit on calibration text: pass --calib"):
        check_peers(["romer-recalibrate"], False)
    assert check_peers(["romer", "hpd", "int4"], True) == ["int4", "hpd", "romer"]  # weights first, routing last
    assert check_peers(["int8", "int4"], False, combined=False) == ["int8", "int4"]


def _placed_tiny(fraction: float = 0.25):
    model = tiny_model("olmoe")
    info = recognize(model)
    placement = place(model, info, score(model, info, "max-neuron-norm"), PlacementPolicy(fraction))
    canonicalize(model, placement.devices(), info)
    return model, info


@pytest.mark.parametrize("name", list(PEERS))
def test_each_peer_changes_the_model_and_undo_restores_it_exactly(name):
    model, info = _placed_tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    calib = Calibration(torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        before = model(ids).logits
    cfg = analog_config("pcm", noise_scale=8)
    applied = apply_peers([name], PeerContext(model, info, cfg, calib, PeerOptions(group_size=16, romer_threshold=1.0)))
    with torch.no_grad():
        during = model(ids).logits
    assert name in applied.record
    assert not torch.equal(during, before)
    applied.undo()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_sweep_with_peers_rows_energy_and_pareto_plot(tmp_path):
    out = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            str(DEMO),
            "--fractions",
            "0,0.25,1",
            "--selectors",
            "max-neuron-norm",
            "--no-ablation",
            "--peers",
            "hpd,int8,romer-replace",
            "--group-size",
            "32",
            "--calib",
            str(TEXT),
            "--calib-tokens",
            "512",
            "--noise",
            "pcm",
            "--noise-scale",
            "2.5",
            "--seeds",
            "2",
            "--ppl",
            str(TEXT),
            "--ppl-tokens",
            "256",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == [
        "all-digital",
        "all-analog",
        "dense-digital",
        "max-neuron-norm 0.25",
        "hpd",
        "hpd + max-neuron-norm 0.25",
        "int8",
        "int8 + max-neuron-norm 0.25",
        "romer-replace",
        "romer-replace + max-neuron-norm 0.25",
    ]
    energy = {k: r["cost"]["energy_per_token_j"] for k, r in rows.items()}
    # Moving U·Σ of the projections to AIMC and shrinking digital weights to 8 bits both save energy.
    assert energy["hpd"] < energy["dense-digital"] < energy["max-neuron-norm 0.25"] < energy["all-digital"]
    assert energy["int8"] < energy["all-digital"]
    assert rows["int8"]["peer_summary"]["bits"] == 8
    assert rows["hpd"]["peer_summary"]["projections"]
    assert "experts_replaced" in rows["romer-replace"]["peer_summary"]
    # Each row is evaluated on its own: the plain placements equal a sweep without peers (same instances).
    plain = tmp_path / "plain"
    assert (
        main(
            [
                "sweep",
                str(DEMO),
                "--fractions",
                "0,0.25,1",
                "--selectors",
                "max-neuron-norm",
                "--no-ablation",
                "--noise",
                "pcm",
                "--noise-scale",
                "2.5",
                "--seeds",
                "2",
                "--ppl",
                str(TEXT),
                "--ppl-tokens",
                "256",
                "--out",
                str(plain),
            ]
        )
        == 0
    )
    base = {r["label"]: r["metrics"]["ppl"]["values"] for r in json.loads((plain / "results.json").read_text())["rows"]}
    assert all(rows[k]["metrics"]["ppl"]["values"] == v for k, v in base.items())
    assert "energy/token (µJ)" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_with_peers_records_them_and_refuses_double_quantisation(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(DEMO),
                "--digital-fraction",
                "0.25",
                "--peers",
                "hpd",
                "--hpd-rank",
                "0.5",
                "--noise",
                "pcm",
                "--seeds",
                "1",
                "--ppl",
                str(TEXT),
                "--ppl-tokens",
                "128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    projections = doc["peers"]["hpd"]["projections"]
    assert projections and all(p["rel_error"] > 0 for p in projections)  # half rank: a real truncation
    rc = main(
        [
            "eval",
            str(DEMO),
            "--digital-fraction",
            "0.25",
            "--digital-bits",
            "4",
            "--peers",
            "int4",
            "--ppl",
            str(TEXT),
            "--out",
            str(tmp_path / "x.json"),
        ]
    )
    assert rc == 2 and "--digital-bits and the int8/int4 peers" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            str(DEMO),
            "--digital-fraction",
            "0.25",
            "--peers",
            "romer",
            "--ppl",
            str(TEXT),
            "--out",
            str(tmp_path / "y.json"),
        ]
    )
    assert rc == 2 and "fit on calibration text: pass --calib" in capsys.readouterr().err
    rc = main(
        [
            "sweep",
            str(DEMO),
            "--fractions",
            "0,0.25",
            "--selectors",
            "max-neuron-norm",
            "--peers",
            "int4",
            "--ppl",
            str(TEXT),
            "--out",
            str(tmp_path / "z"),
        ]
    )  # refused before the first row is evaluated
    assert rc == 2 and "group size 128 does not divide the 64 inputs" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("x.json", "y.json", "z"))
