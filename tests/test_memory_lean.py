"""Memory-lean hardware instances: programmed tiles take over the ideal weights' storage (one copy on the device),
the ideal weights wait in an IdealStore and come back bit-exactly; simulation in the model's dtype."""

import copy

import pytest
import torch
from helpers import logits, norm_rel_err, placed

from hetmoe_compile.analog import analog_config, restore_digital, simulate
from hetmoe_compile.analog.ideal_store import SPILL_DIR_ENV, STORE_ENV, IdealStore, store_kind
from hetmoe_compile.analog.instance import program_group
from hetmoe_compile.analog.programmed_stack import ProgrammedStack
from hetmoe_compile.analog.programming_noise import stream_seed
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.graph.capture import export_placed
from hetmoe_compile.graph.passes import RewriteAnalogPass
from hetmoe_compile.models import recognize
from hetmoe_compile.models.tiny import tiny_model
from hetmoe_compile.transforms.canonicalize import canonicalize

IDS = torch.tensor([[3, 7, 11, 2, 9, 4, 40, 41]])
PCM = analog_config("pcm", noise_scale=2.0)


def _analog_groups(model, info):
    return [model.get_submodule(l.experts).groups["analog"] for l in info.moe_layers]


@pytest.mark.parametrize("store", ["file", "host"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programmed_tiles_take_over_the_ideal_storage(monkeypatch, store, dtype):
    monkeypatch.setenv(STORE_ENV, store)
    model, info, _ = placed("gpt_oss", dtype=dtype)
    ideal = {
        (i, n): getattr(g, n).detach().clone()
        for i, g in enumerate(_analog_groups(model, info))
        for n in ("gate_up", "down")
    }
    ptrs = {
        (i, n): getattr(g, n).data_ptr() for i, g in enumerate(_analog_groups(model, info)) for n in ("gate_up", "down")
    }
    clean = logits(model, IDS)
    seen = []
    for seed in (0, 1, 0):
        simulate(model, PCM, seed, info=info)
        for i, group in enumerate(_analog_groups(model, info)):
            for n in ("gate_up", "down"):
                assert getattr(group, f"{n}_weight").data_ptr() == ptrs[(i, n)]  # no second copy, any seed
                assert getattr(group, f"{n}_weight").dtype == dtype
                assert getattr(group.source, n).numel() == 0  # a stray use of the ideal weights fails loudly
        out = logits(model, IDS)
        assert out.dtype == dtype and torch.isfinite(out).all()
        seen.append(out)
    assert torch.equal(seen[2], seen[0])  # seed 0 again: from the store
    # Another instance, not a rounding change: instances 0 and 1 are as far apart as independent draws of the noise
    # (measured: 0.26 apart, each 0.17-0.19 from the clean logits, about sqrt(2) x; a shared draw gives 0)
    assert norm_rel_err(seen[1], seen[0]) > norm_rel_err(seen[0], clean)
    restore_digital(model, info)
    for i, group in enumerate(_analog_groups(model, info)):
        for n in ("gate_up", "down"):
            assert getattr(group, n).data_ptr() == ptrs[(i, n)] and torch.equal(getattr(group, n), ideal[(i, n)])
    assert torch.equal(logits(model, IDS), clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_size", [512, 12])  # 12: 32 inputs make 3 padded tiles of 11
def test_in_place_programming_equals_the_reference_programming(dtype, tile_size):
    cfg = analog_config("pcm", tile_size=tile_size)
    model, info, _ = placed("olmoe", dtype=dtype)
    group = _analog_groups(model, info)[0]
    ideal = group.gate_up.detach().clone(), group.down.detach().clone()
    ref = program_group(*ideal, group.expert_ids, cfg, 4, info.moe_layers[0].index)
    simulate(model, cfg, 4, info=info)
    programmed = _analog_groups(model, info)[0]
    for name in ("gate_up", "down"):
        assert torch.equal(getattr(programmed, f"{name}_weight"), ref[f"{name}_weight"].to(dtype))
        assert torch.equal(getattr(programmed, f"{name}_scale"), ref[f"{name}_scale"])
    restore_digital(model, info)
    assert torch.equal(group.gate_up, ideal[0]) and torch.equal(group.down, ideal[1])


def test_bf16_and_fp32_simulations_agree_to_bf16_rounding():
    """The same instance of the same model, simulated in float32 and in bfloat16, differs only by bfloat16
    rounding: the programmed tiles by a few bf16 steps, the logits by no more than the clean models differ."""
    model32, info, placement = placed("olmoe")
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    clean_gap = norm_rel_err(logits(model16, IDS), logits(model32, IDS))
    simulate(model32, PCM, 2, info=info)
    simulate(model16, PCM, 2, info=recognize(model16))
    for g32, g16 in zip(_analog_groups(model32, info), _analog_groups(model16, recognize(model16))):
        for name in ("gate_up", "down"):
            w32, w16 = getattr(g32, f"{name}_weight"), getattr(g16, f"{name}_weight")
            assert w16.dtype == torch.bfloat16
            # normalised tiles are in [-1, 1]; bf16's step there is at most 2^-8, the input rounding adds as much
            assert (w16.float() - w32).abs().max() <= 3 * 2.0**-8
            torch.testing.assert_close(
                getattr(g16, f"{name}_scale"), getattr(g32, f"{name}_scale"), rtol=2.0**-7, atol=0
            )
    sim_gap = norm_rel_err(logits(model16, IDS), logits(model32, IDS))
    assert sim_gap <= 2 * clean_gap + 1e-3, (sim_gap, clean_gap)


def test_rewrite_pass_in_place_programs_over_the_graph_weights():
    model, info, placement = placed("olmoe")
    gm = copy.deepcopy(export_placed(model, placement, info).module())  # the pass may consume these weights
    ideal_ptrs = {n: t.data_ptr() for n, t in gm.named_buffers() if n.endswith("analog.gate_up")}
    ideal_ptrs.update({n: p.data_ptr() for n, p in gm.named_parameters() if n.endswith("analog.gate_up")})
    assert ideal_ptrs
    result = RewriteAnalogPass(PCM, seed=3, in_place=True)(gm)
    programmed = {t.data_ptr() for n, t in result.graph_module.named_buffers() if n.endswith("gate_up_weight")}
    assert set(ideal_ptrs.values()) == programmed  # the tiles live where the ideal weights were
    names = {n for n, _ in result.graph_module.named_parameters()} | {n for n, _ in gm.named_buffers()}
    assert not names & set(ideal_ptrs)  # and the graph module no longer holds the ideal ones
    simulate(model, PCM, 3, info=info)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(IDS, torch.ones_like(IDS)), logits(model, IDS), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["file", "host"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ideal_store_round_trip(kind, dtype):
    store = IdealStore(kind)
    a = torch.randn(5, 3, 4).to(dtype)
    b = torch.randn(2, 7).to(dtype)
    store.put("a", a)
    store.put("b", b)
    assert store.shape("a") == (5, 3, 4)
    assert torch.equal(store.read("a", 1, 4, torch.empty(3, 3, 4, dtype=dtype)), a[1:4])
    assert torch.equal(store.read("b", 0, 2, torch.empty(2, 7, dtype=dtype)), b)
    store.close()


def test_store_choice_and_bad_settings(monkeypatch, tmp_path):
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert store_kind(torch.device("cpu")) == "file" and store_kind(torch.device("cuda")) == "host"
    monkeypatch.setenv(STORE_ENV, "disk")
    with pytest.raises(HetMoEError, match="HETMOE_IDEAL_STORE='disk' is not a store; use one of host, file"):
        store_kind(torch.device("cpu"))
    monkeypatch.setenv(STORE_ENV, "file")
    monkeypatch.setenv(SPILL_DIR_ENV, str(tmp_path / "missing"))
    model, info, _ = placed()
    with pytest.raises(HetMoEError, match="cannot create the ideal-weight spill file .*set \\$HETMOE_SPILL_DIR"):
        simulate(model, PCM, 0, info=info)


def test_stack_modes_check_their_inputs():
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="keep='store' needs an IdealStore"):
        ProgrammedStack(w, 512, "store")
    ideal = w.clone()
    stack = ProgrammedStack(w, 512, "copy")
    with pytest.raises(ValueError, match="1 seeds for 2 matrices"):
        stack.program(PCM, [0])
    seeds = [stream_seed(0, 1), stream_seed(0, 2)]
    stack.program(PCM, seeds)
    assert stack.weight.data_ptr() != w.data_ptr() and torch.equal(w, ideal)  # "copy": the caller's tensor as it was
    reused = ProgrammedStack(ideal, 512, "discard")  # programs over its input's storage: the same tiles
    reused.program(PCM, seeds)
    assert reused.weight.data_ptr() == ideal.data_ptr()
    assert torch.equal(reused.weight, stack.weight) and torch.equal(reused.scale, stack.scale)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss"])
def test_canonicalize_partitions_the_fused_tensors_in_place(family):
    """Canonicalising (and re-splitting) reorders the fused experts in place and keeps views: no layer copy, except
    for layouts whose canonical form is a transpose (GPT-OSS)."""
    model = tiny_model(family)
    info = recognize(model)
    ptrs = [model.get_submodule(l.experts).down_proj.untyped_storage().data_ptr() for l in info.moe_layers]
    clean = logits(model, IDS)
    for split in (lambda e: e % 3 == 0, lambda e: e in (1, 2, 6)):
        devices = {
            l.index: {e: "digital" if split(e) else "analog" for e in range(l.num_experts)} for l in info.moe_layers
        }
        canonicalize(model, devices, info)
        for layer, ptr in zip(info.moe_layers, ptrs):
            het = model.get_submodule(layer.experts)
            assert het.groups["digital"].ids == [e for e in range(layer.num_experts) if split(e)]
            shared = all(g.down.untyped_storage().data_ptr() == ptr for g in het.groups.values())
            assert shared == (family != "gpt_oss")
        # measured: equal for olmoe and mixtral, 3.3e-7 for gpt_oss (transposed copies, logits up to 2)
        torch.testing.assert_close(logits(model, IDS), clean, rtol=0, atol=1e-6)


def test_bounded_allocator_sets_and_restores_the_mmap_threshold(monkeypatch):
    """Within the block glibc maps every allocation of 1 MiB or more on its own (returned when freed); after it the
    threshold is glibc's adaptive ceiling and free heap pages are trimmed; HETMOE_BOUNDED_ALLOCATOR=0 skips it."""
    from hetmoe_compile.base import host_memory

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(host_memory, "_libc", lambda: FakeLibc())
    monkeypatch.delenv(host_memory.BOUND_ENV, raising=False)
    with host_memory.bounded_allocator():
        assert calls == [("mallopt", -3, 1 << 20)]
    assert calls[1:] == [("mallopt", -3, 32 << 20), ("trim", 0)]
    calls.clear()
    monkeypatch.setenv(host_memory.BOUND_ENV, "0")
    with host_memory.bounded_allocator():
        pass
    assert calls == []
