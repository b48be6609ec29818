"""The torch.compile backend "hetmoe": entry point, options, placement in the graph, numerics, recompiles."""

import pytest
import torch
import torch._dynamo as dynamo
from helpers import FAMILIES, left_padded_mask, logits
from torch._dynamo.utils import counters

import hetmoe_compile as hc
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.compose.backend import BackendOptions, hetmoe_backend
from hetmoe_compile.graph.passes import PLACEMENT_META, is_expert_group
from hetmoe_compile.models.recognize import recognize
from hetmoe_compile.models.tiny import tiny_model

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _compiled_forward(model, options, spy=None):
    dynamo.reset()
    counters.clear()

    def backend(gm, example_inputs):
        fn = hetmoe_backend(gm, example_inputs, options)
        if spy is not None:
            spy.append(gm)
        return fn

    return torch.compile(
        type(model).forward.__get__(model),
        backend=backend if spy is not None else "hetmoe",
        options=None if spy is not None else options,
    )


def test_backend_is_registered_by_entry_point():
    assert "hetmoe" in dynamo.list_backends(exclude_tags=())


def _groups(gm):
    return sorted(n.meta[PLACEMENT_META].device for n in gm.graph.nodes if is_expert_group(n))


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_model_ideal_matches_eager(family):
    """An unprepared model: the backend finds each layer's experts in Dynamo's graph and splits them; left padding
    included (padded positions attend to nothing, so only the real ones are compared)."""
    model = tiny_model(family)
    mask = left_padded_mask(IDS, 3)
    ref = logits(model, IDS, attention_mask=mask)
    graphs = []
    fwd = _compiled_forward(model, {"noise": "ideal", "digital_fraction": 0.25}, graphs)
    with torch.no_grad():
        got = fwd(input_ids=IDS, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=0, atol=1e-5)  # measured: 0 to 2.4e-7
    moe_layers = len(recognize(model).moe_layers)
    assert _groups(graphs[0]) == ["analog"] * moe_layers + ["digital"] * moe_layers
    assert not any(type(m).__name__ == "HetExperts" for m in model.modules())  # the model itself is untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_left_padding_gives_the_eager_tokens(family):
    """KV-cached prefill and decode graphs under the backend (ideal hardware) generate what eager generates."""
    model = tiny_model(family)
    prompt = IDS[:, :6]
    mask = left_padded_mask(prompt, 2)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **kwargs)
        model.forward = _compiled_forward(model, {"noise": "ideal", "digital_fraction": 0.25})
        got = model.generate(prompt, **kwargs)
    assert counters["stats"]["unique_graphs"] >= 2  # the backend compiled prefill and decode
    assert got.shape == (2, 11) and torch.equal(got, ref)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_prepared_model_ideal_matches_eager(family):
    """hc.prepare stays optional and exact; DeepSeek-V3's router keeps its in-place scatter_ (once deleted as dead
    code by the split pass: relative error 1.19)."""
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    hc.prepare(model)
    graphs = []
    fwd = _compiled_forward(model, {"noise": "ideal", "digital_fraction": 0.25}, graphs)
    with torch.no_grad():
        got = fwd(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    if family == "deepseek_v3":
        assert any(n.target == "scatter_" for n in graphs[0].graph.nodes)


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_model_pcm_equals_the_eager_simulation(family):
    """The backend on a raw model places like hetmoe_compile.compile and programs the same devices for a seed."""
    compiled = hc.compile(tiny_model(family), hc.PlacementPolicy(0.25), "pcm")
    with torch.no_grad():
        eager = compiled.simulate(seed=3)(input_ids=IDS, use_cache=False).logits
        clean = compiled.restore()(input_ids=IDS, use_cache=False).logits
    fwd = _compiled_forward(tiny_model(family), {"noise": "pcm", "seed": 3, "digital_fraction": 0.25})
    with torch.no_grad():
        got = fwd(input_ids=IDS, use_cache=False).logits
    assert (got - clean).abs().max() > 1e-3  # noisy
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_pcm_matches_the_eager_simulation_of_the_same_placement():
    """The same through a prepared model."""
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


def test_standard_hwa_takes_input_ranges_and_equals_the_eager_simulation(tmp_path):
    """Constant noise management under the backend: the input_ranges option (an InputRanges or its file) gives the
    devices and ranges of the eager simulation; without ranges, one line naming the fix."""
    from hetmoe_compile.analog.input_ranges import attach_input_ranges, calibrate_input_ranges
    from hetmoe_compile.models.calibration import Calibration

    compiled = hc.compile(tiny_model("olmoe"), hc.PlacementPolicy(0.25), "standard-hwa")
    cal = Calibration(torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(5)))
    ranges = calibrate_input_ranges(compiled.model, compiled.info, cal)
    attach_input_ranges(compiled.model, ranges, compiled.info)
    with torch.no_grad():
        eager = compiled.simulate(seed=3)(input_ids=IDS, use_cache=False).logits
    path = ranges.save(tmp_path / "ranges.json")
    for given in (ranges, str(path)):
        fwd = _compiled_forward(tiny_model("olmoe"), {"noise": "standard-hwa", "seed": 3, "input_ranges": given})
        with torch.no_grad():
            got = fwd(input_ids=IDS, use_cache=False).logits
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)
    fwd = _compiled_forward(tiny_model("olmoe"), {"noise": "standard-hwa"})
    with pytest.raises(HetMoEError, match="needs input ranges calibrated on text"):
        fwd(input_ids=IDS, use_cache=False)


@pytest.mark.parametrize("prepared", [True, False])
def test_dynamic_sequence_lengths_and_generate_do_not_recompile_every_call(prepared):
    model = tiny_model("olmoe")
    if prepared:
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


def test_compiling_the_module_itself():
    """``torch.compile(model, backend="hetmoe")`` as a new user writes it: the OptimizedModule runs the rewrite."""
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
        dynamo.reset()
        got = torch.compile(model, backend="hetmoe", options={"noise": "ideal"})(input_ids=IDS, use_cache=False)
    torch.testing.assert_close(got.logits, ref, rtol=0, atol=1e-5)


def test_experts_split_by_a_graph_break_are_a_clear_error():
    model = tiny_model("olmoe")
    model.set_experts_implementation("eager")  # a Python loop over hit experts: Dynamo breaks at nonzero()
    with pytest.raises(HetMoEError, match=r"graph break inside the experts.*call hetmoe_compile.prepare\(model\)"):
        _compiled_forward(model, {})(input_ids=IDS, use_cache=False)
    hc.prepare(model)  # the way out the message names
    with torch.no_grad():
        _compiled_forward(model, {"noise": "ideal"})(input_ids=IDS, use_cache=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fraction": 0.5}, r"unknown hetmoe backend option\(s\) \['fraction'\]; valid options: digital_fraction, "),
        ({"seed": -1}, r"seed=-1 must be an integer >= 0"),
        ({"seed": 1.5}, r"seed=1.5 must be an integer >= 0"),
        ({"digital_fraction": "0.25"}, r"digital_fraction='0.25' must be a number"),
        ({"digital_fraction": 1.5}, r"digital fraction must be in \[0, 1\], got 1.5"),
        ({"noise": "loud"}, r"unknown noise preset 'loud'"),
        ({"noise_scale": "2"}, r"noise_scale='2' must be a number or None"),
        ({"overrides": {"0:1": "gpu"}}, r"override 0:1=gpu: device must be one of digital, analog"),
        ({"overrides": {"0-1": "digital"}}, r"override '0-1': expected LAYER:EXPERT"),
        ({"selector": "activation-frequency"}, r"in a graph use one of max-neuron-norm, random"),
        ({"dense": "analog"}, r"dense='analog' .* is simulation-only"),
    ],
)
def test_options_are_checked_like_the_cli(options, message):
    with pytest.raises(HetMoEError, match=message):
        BackendOptions.parse(options)


def test_bad_options_reach_the_caller_as_a_hetmoe_error():
    """Not Dynamo's BackendCompilerFailed: the error a user can catch, its message first."""
    model = tiny_model("olmoe")
    dynamo.reset()
    compiled = torch.compile(model, backend="hetmoe", options={"seed": "x"})
    with pytest.raises(HetMoEError) as err:
        compiled(input_ids=IDS, use_cache=False)
    assert str(err.value).startswith("hetmoe backend option seed='x' must be an integer >= 0")


@pytest.mark.parametrize(
    "override, message",
    [
        ("0:99", r"override 0:99: no such MoE layer/expert; MoE layers are \[0, 1\] with 8 experts"),
        ("9:0", r"override 9:0: no such MoE layer/expert; MoE layers are \[0, 1\] with 8 experts"),
    ],
)
def test_overrides_naming_missing_experts_fail_through_dynamo(override, message):
    """Checked against the whole model by the composer's placement step (the message of hetmoe-compile place)."""
    model = tiny_model("olmoe")
    with pytest.raises(HetMoEError, match=message):  # our error reaches the caller as itself, through Dynamo
        _compiled_forward(model, {"overrides": {override: "digital"}})(input_ids=IDS, use_cache=False)


def test_split_pass_checks_overrides_against_its_graph():
    """Without the whole model (a frame inside one), the graph's own layers and experts are the check."""
    from hetmoe_compile.graph.passes import PassError, SplitExpertGroupsPass
    from hetmoe_compile.placement.policy import PlacementPolicy

    model = tiny_model("olmoe")
    hc.prepare(model)
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    dynamo.reset()
    torch.compile(type(model).forward.__get__(model), backend=grab)(input_ids=IDS, use_cache=False)
    gm, example_inputs = captured[0]
    for override, message in (
        ("0:99", r"override '0:99' names expert 99, but layer 0 has experts 0..7"),
        ("9:0", r"override '9:0' names layer 9, but the MoE layers in this graph are \[0, 1\]"),
    ):
        with pytest.raises(PassError, match=message):
            SplitExpertGroupsPass(PlacementPolicy(overrides={override: "digital"}), example_inputs)(gm)


def test_dead_code_removal_keeps_in_place_calls_and_drops_unused_weights():
    """The passes' clean-up erases only unused get_attr nodes; an unused in-place ``scatter_`` (DeepSeek-V3's group
    mask) stays, where FX's plain eliminate_dead_code deletes it."""
    import torch.fx as fx

    from hetmoe_compile.graph.passes.pass_base import drop_unused_attrs

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("unused", torch.ones(3))

        def forward(self, x, idx):
            mask = torch.zeros_like(x)
            mask.scatter_(1, idx, 1.0)  # result unused: the mutation is the point
            return x * mask

    def traced():
        gm = fx.symbolic_trace(Masked())
        gm.register_buffer("unused", torch.ones(3))
        with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
            gm.graph.get_attr("unused")  # a weight a rewrite left unused
        gm.recompile()
        return gm

    x, idx = torch.randn(2, 4), torch.tensor([[1], [3]])
    gm = traced()
    drop_unused_attrs(gm)
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"].count("scatter_") == 1
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    torch.testing.assert_close(gm(x, idx), Masked()(x, idx), rtol=0, atol=0)
    plain = traced()
    plain.graph.eliminate_dead_code()  # what the passes called before
    plain.recompile()
    assert "scatter_" not in [n.target for n in plain.graph.nodes]  # the bug this guards against


def test_passes_are_chained_by_the_pass_manager_and_our_errors_stay_ours():
    """``run_passes`` feeds each PassResult to the next pass (torch.fx.passes.infra's PassManager) and lints the
    graph; a pass's HetMoEError reaches the caller as itself, not as the manager's wrapped Exception."""
    from torch import fx
    from torch.fx.passes.infra.pass_base import PassResult

    from hetmoe_compile.compose.backend import run_passes

    gm = fx.symbolic_trace(torch.nn.Linear(2, 2))
    seen = []

    def replace_module(graph_module):
        new = fx.symbolic_trace(torch.nn.Linear(2, 3))
        seen.append(graph_module)
        return PassResult(new, True)

    def record(graph_module):
        seen.append(graph_module)
        return PassResult(graph_module, False)

    out = run_passes([replace_module, record], gm)
    assert seen[0] is gm and seen[1] is out and out(torch.ones(1, 2)).shape == (1, 3)

    def fail(graph_module):
        raise HetMoEError("SplitExpertGroupsPass: no placement for layer 3")

    with pytest.raises(HetMoEError, match="^SplitExpertGroupsPass: no placement for layer 3$"):
        run_passes([record, fail], gm)
