"""The torch.compile backend "hetmoe": entry point, options, placement in the graph, numerics, recompiles."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import hetmoe_compile as hc
from hetmoe_compile.backend import BackendOptions, hetmoe_backend
from hetmoe_compile.errors import HetMoEError
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.passes import PLACEMENT_META, is_expert_group

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _compiled_forward(model, options, spy=None):
    dynamo.reset()
    counters.clear()

    def backend(gm, example_inputs):
        fn = hetmoe_backend(gm, example_inputs, options)
        if spy is not None:
            spy.append(gm)
        return fn

    return torch.compile(type(model).forward.__get__(model), backend=backend if spy is not None else "hetmoe",
                         options=None if spy is not None else options)


def test_backend_is_registered_by_entry_point():
    assert "hetmoe" in dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_ideal_noise_matches_eager(family):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    hc.prepare(model)
    graphs = []
    fwd = _compiled_forward(model, {"noise": "ideal", "digital_fraction": 0.25}, graphs)
    with torch.no_grad():
        got = fwd(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    groups = [n for n in graphs[0].graph.nodes if is_expert_group(n)]
    assert sorted(n.meta[PLACEMENT_META].device for n in groups) == ["analog", "analog", "digital", "digital"]


def test_pcm_matches_the_eager_simulation_of_the_same_placement():
    """The backend places like hetmoe_compile.compile and programs the same devices for the same seed."""
    model = tiny_model("olmoe")
    compiled = hc.compile(model, hc.PlacementPolicy(0.25), "pcm")
    with torch.no_grad():
        eager = compiled.simulate(seed=3)(input_ids=IDS, use_cache=False).logits
        clean = compiled.restore()(input_ids=IDS, use_cache=False).logits
    hc.prepare(model)
    fwd = _compiled_forward(model, {"noise": "pcm", "seed": 3, "digital_fraction": 0.25})
    with torch.no_grad():
        got = fwd(input_ids=IDS, use_cache=False).logits
    assert (got - clean).abs().max() > 1e-2  # noisy
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_dynamic_sequence_lengths_and_generate_do_not_recompile_every_call():
    model = tiny_model("olmoe")
    hc.prepare(model)
    fwd = _compiled_forward(model, {"noise": "dac-adc"})
    with torch.no_grad():
        for seq in (5, 7, 11, 13, 17):
            fwd(input_ids=IDS[:1, :1].repeat(1, seq), use_cache=False)
    assert counters["stats"]["unique_graphs"] <= 2  # one static graph, then one with a dynamic sequence length
    model.forward = fwd
    graphs = []
    with torch.no_grad():
        for prompt in (4, 6, 8, 5):
            out = model.generate(IDS[:1, :prompt], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert out.shape == (1, prompt + 6)
            graphs.append(counters["stats"]["unique_graphs"])
    # prefill and decode graphs become dynamic after the first changes of length; then nothing recompiles
    assert graphs[-1] == graphs[-2] == graphs[-3], graphs
    assert graphs[-1] <= 8


def test_unknown_options_and_unprepared_models_are_clear_errors():
    with pytest.raises(HetMoEError, match=r"unknown hetmoe backend option\(s\) \['fraction'\]; valid options: "
                                          r"digital_fraction, selector"):
        BackendOptions.parse({"fraction": 0.5})
    model = tiny_model("olmoe")
    hc.prepare(model)
    with pytest.raises(Exception, match="needs the whole model or calibration text"):  # Dynamo wraps it
        _compiled_forward(model, {"selector": "activation-frequency"})(input_ids=IDS, use_cache=False)
    raw = tiny_model("olmoe")
    with pytest.raises(Exception, match=r"call hetmoe_compile.prepare\(model\) before torch.compile"):
        _compiled_forward(raw, {})(input_ids=IDS, use_cache=False)
    with pytest.raises(HetMoEError, match="dense='analog' .* is simulation-only"):
        BackendOptions.parse({"dense": "analog"}).policy()
