"""The peers as passes (ROMER, HPD, low-bit digital experts): composition, undo, and their rows in `sweep` and
`eval` (with the energy column and the Pareto plot)."""

import copy
import json
import math

import pytest
import torch
from helpers import DEMO, REPO, logits, norm_rel_err, placed, token_ids

from hetmoe_compile.analog.config import analog_config
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.eval.sweep.plan import pareto_front, sweep_jobs
from hetmoe_compile.models import load_model
from hetmoe_compile.models.calibration import Calibration
from hetmoe_compile.peers.registry import PEERS, PeerContext, PeerOptions, apply_peers, check_peers
from hetmoe_compile.transforms.hpd.projection_split import HPDLinear

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


def _quantized(w, bits, group_size):
    """Group-wise symmetric rounding by hand: each run of ``group_size`` inputs on the grid of its abs-max / qmax."""
    qmax = 2 ** (bits - 1) - 1
    groups = w.reshape(*w.shape[:-1], -1, group_size)
    step = groups.abs().amax(-1, keepdim=True) / qmax
    return ((groups / step).round() * step).reshape(w.shape)


def _calibrated_routing(module, args, output):
    """OLMoE's routing (softmax, top-k, no renormalisation) on the logits mapped by the layer's scale and shift."""
    hidden = args[0].reshape(-1, module.weight.shape[1])
    mapped = torch.nn.functional.linear(hidden, module.weight) * module.hand_scale + module.hand_shift
    top, index = mapped.softmax(-1).topk(module.top_k, dim=-1)
    return mapped, top, index


def _expected(name, model, info, record, options):
    """What the peer should have done, redone by hand on ``model`` (a copy of the placed model before the peer): the
    digital experts rounded (int8, int4), the replaced analog experts overwritten with their sources (romer-replace),
    the router logits mapped (romer-recalibrate); romer does both, and HPD at full rank is exact: nothing changes."""
    with torch.no_grad():
        for layer in info.moe_layers:
            het = model.get_submodule(layer.experts)
            if name in ("int8", "int4"):
                for w in (het.groups["digital"].gate_up, het.groups["digital"].down):
                    w.copy_(_quantized(w, record["bits"], options.group_size))
            for r in record.get("replacements", []):
                if r["layer"] == layer.index:
                    src, dst = het.groups[r["source_device"]], het.groups["analog"]
                    for attr in ("gate_up", "down"):
                        getattr(dst, attr)[dst.ids.index(r["expert"])] = getattr(src, attr)[src.ids.index(r["source"])]
            if "router_calibration" in record:
                maps = {m["layer"]: m for m in record["router_calibration"]["layers"]}
                router = model.get_submodule(layer.router)
                router.hand_scale, router.hand_shift = (torch.tensor(maps[layer.index][k]) for k in ("scale", "shift"))
                router.register_forward_hook(_calibrated_routing)
    return model


@pytest.mark.parametrize("name", list(PEERS))
def test_each_peer_changes_the_model_as_expected_and_undo_restores_it_exactly(name):
    model, info, _ = placed()
    ids = token_ids(2, 12, model.config.vocab_size, seed=0)
    calib = Calibration(token_ids(4, 32, model.config.vocab_size, seed=1))
    before = logits(model, ids)
    untouched = copy.deepcopy(model)
    cfg = analog_config("pcm", noise_scale=8)
    options = PeerOptions(group_size=16, romer_threshold=1.0)
    applied = apply_peers([name], PeerContext(model, info, cfg, calib, options))
    during = logits(model, ids)
    record = applied.record[name]
    expected = logits(_expected(name, untouched, info, record, options), ids)
    if name == "hpd":  # at full rank U·Σ·Vᵀ is W to float rounding (measured: logits 3.4e-7 apart)
        assert norm_rel_err(during, expected) < 1e-5
        split = [m for m in model.modules() if isinstance(m, HPDLinear)]
        assert split and len(split) == len(record["projections"])
        for m in split:  # the two halves multiply back to the original weight (measured: 1.4e-7 apart)
            assert m.rank == m.full_rank
            assert norm_rel_err(m.u_sigma.weight @ m.v_t.weight, m.original.weight) < 1e-5
    else:
        assert torch.equal(during, expected)  # measured: the same arithmetic, bit for bit
        # A change of the peer's size. Measured: romer 0.24, romer-replace 0.24, romer-recalibrate 0.030, int4 0.040,
        # int8 0.0023 (int4's steps are 127/7 = 18x int8's: 0.040 / 0.0023 = 17.5)
        minimum = {"romer": 0.1, "romer-replace": 0.1, "romer-recalibrate": 1e-2, "int4": 1e-2, "int8": 5e-4}
        assert norm_rel_err(during, before) > minimum[name]
    applied.undo()
    assert torch.equal(logits(model, ids), before)


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
    # By hand: half of each projection's rank kept, and an error of its SVD tail, sqrt(sum_{i>r} s_i^2) / ||W||_F
    # (Eckart-Young), computed in float64. Measured: 4e-15 apart.
    demo = load_model(str(DEMO))
    assert [p["module"] for p in projections] == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)] + ["lm_head"]
    for p in projections:
        w = demo.get_submodule(p["module"]).weight.detach().double()
        s = torch.linalg.svdvals(w)
        rank = math.ceil(s.numel() / 2)
        tail = float(s[rank:].norm() / s.norm())
        assert p["rank"] == rank and p["rel_error"] == pytest.approx(tail, abs=1e-13) and tail > 0.1
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
