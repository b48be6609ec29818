"""torch.export capture of canonical models and the annotate_placement pass, for every family."""

import pytest
import torch
from helpers import FAMILIES, placed

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.compose.report import node_counts, placement_report
from hetmoe_compile.graph.capture import export_model, export_placed
from hetmoe_compile.graph.passes import PLACEMENT_META, AnnotatePlacementPass, PassError, is_expert_group


@pytest.mark.parametrize("family", FAMILIES)
def test_export_tags_every_node_and_matches_eager(family):
    model, info, placement = placed(family, canonical=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ep = export_placed(model, placement, info)
    gm = ep.graph_module
    groups = [n for n in gm.graph.nodes if is_expert_group(n)]
    assert len(groups) == 2 * len(info.moe_layers)  # one digital and one analog group per MoE layer
    assert {n.meta[PLACEMENT_META].device for n in groups} == {"digital", "analog"}
    assert all(PLACEMENT_META in n.meta for n in gm.graph.nodes)
    # analog nodes are exactly the analog groups and their weights; dense modules are digital
    for n in gm.graph.nodes:
        tag = n.meta[PLACEMENT_META]
        if tag.device == "analog":
            assert tag.kind == "routed_experts" and ".groups.analog" in tag.module
        if tag.kind in ("attention", "router", "embedding", "lm_head", "shared_expert", "dense_mlp"):
            assert tag.device == "digital"
    # dynamic batch and sequence: another shape runs and matches eager on the canonical model
    ids2 = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(ep.module()(ids, torch.ones_like(ids)), ref, atol=1e-5)
        assert torch.allclose(ep.module()(ids2, torch.ones_like(ids2)), model(input_ids=ids2).logits, atol=1e-5)


def test_reason_names_the_group_experts():
    model, info, placement = placed("olmoe", canonical=False)
    gm = export_placed(model, placement, info).graph_module
    node = next(n for n in gm.graph.nodes if is_expert_group(n) and n.meta[PLACEMENT_META].device == "analog")
    layer = placement.layers[0]
    assert node.meta[PLACEMENT_META].reason == f"analog expert group of layer 0: experts {layer.ids('analog')}"
    # the placement is ours; ExecuTorch's delegation_tag (one self-contained partition per tag) is not claimed
    assert not any("delegation_tag" in n.meta for n in gm.graph.nodes)


def test_dense_on_analog_ablation_tags_dense_nodes_analog():
    model, info, placement = placed("qwen2_moe", dense="analog", canonical=False)
    gm = export_placed(model, placement, info).graph_module
    counts = node_counts(gm)
    assert counts["analog"].get("attention", 0) > 0 and counts["analog"].get("shared_expert", 0) > 0
    assert counts["digital"].get("attention", 0) == 0


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_extreme_fractions_give_one_group_per_layer(fraction):
    model, info, placement = placed("mixtral", fraction, canonical=False)
    gm = export_placed(model, placement, info).graph_module
    devices = {n.meta[PLACEMENT_META].device for n in gm.graph.nodes if is_expert_group(n)}
    assert devices == {"digital" if fraction == 1.0 else "analog"}


def test_pass_requires_canonical_graph():
    model, info, placement = placed("olmoe", canonical=False)
    # an uncanonicalised model's graph has no expert-group node: the pass says which pass failed and why
    ids = torch.randint(0, 128, (1, 4))
    gm = torch.export.export(_Toy(), (ids.float(),)).graph_module
    with pytest.raises(PassError, match="annotate_placement: graph has no hetmoe.expert_group node"):
        AnnotatePlacementPass(placement, info)(gm)


class _Toy(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_report_lists_devices_and_nodes():
    model, info, placement = placed("olmoe", canonical=False)
    gm = export_placed(model, placement, info).graph_module
    text = placement_report(placement, gm, verbose=True)
    assert "digital" in text and "analog" in text and "graph nodes by kind" in text
    assert "analog expert group of layer 1" in text
    assert f"{placement.parameter_share['analog']['params']:,}" in text


def test_export_error_is_a_clear_hetmoe_error():
    class Broken(torch.nn.Module):
        config = type("C", (), {"vocab_size": 8, "max_position_embeddings": 16})()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids=None, attention_mask=None, use_cache=False):
            if input_ids.sum() > 3:  # data-dependent control flow cannot be exported
                return None
            return None

    with pytest.raises(HetMoEError, match="torch.export failed for Broken"):
        export_model(Broken())


def test_the_expert_group_call_is_one_named_structure():
    """``ExpertGroupCall`` names the op's 13 arguments: it is the op's schema, the module's call, what the passes
    read from a node and the ONNX placeholder's inputs and attributes."""
    import onnx

    from hetmoe_compile.export.onnx_capture import DOMAIN, PLACEHOLDER, register_placeholder_schema
    from hetmoe_compile.ir.expert_group import GROUP_TENSORS, SETTINGS, ExpertGroupCall

    model, info, placement = placed("olmoe", canonical=False)
    gm = export_placed(model, placement, info).graph_module
    node = next(n for n in gm.graph.nodes if is_expert_group(n))
    call = ExpertGroupCall.of(node)
    assert call.num_experts == info.moe_layers[0].num_experts and call.activation == "glu"
    assert [getattr(call, k) for k in GROUP_TENSORS] == list(call.weights()) == list(node.args[3:8])
    register_placeholder_schema()
    schema = onnx.defs.get_schema(PLACEHOLDER, 1, DOMAIN)
    names = tuple(i.name for i in schema.inputs) + tuple(sorted(schema.attributes, key=SETTINGS.index))
    assert names == ExpertGroupCall._fields
