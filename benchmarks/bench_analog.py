"""Speed of the AIMC simulation, side by side in one run (reference model; demo model without ../shared):

1. forward of the simulated model (25 % digital, pcm) against the clean canonical model (target <= 1.3x), and
   with every effect on (pcm plus short-term weight noise, IR drop and iterative bound management; issue 17's
   target <= 1.5x), at the benchmark's batch and at one decode step of 8 sequences (8 tokens: a generation's
   forward, where each expert sees a token or two);
2. programming all analog experts (vectorised, hetmoe-compile) against building and programming one aihwkit
   ``TorchInferenceRPUConfig`` layer per expert weight slice with the same statistics (target >= 20x);
3. the whole simulated model against aihwkit's ``convert_to_analog`` on an equivalent model holding one
   ``nn.Linear`` per expert weight (forward over the same tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import paired_ratio, rounds, timed
from torch import nn

REPO = Path(__file__).resolve().parents[1]
REF = REPO.parent / "shared" / "models" / "olmoe-ref"


class LinearExperts(nn.Module):
    """An experts module with one nn.Linear per expert weight (gate, up, down), for aihwkit's convert_to_analog."""

    def __init__(self, group) -> None:
        super().__init__()
        self.ids = group.ids
        self.gate_up = nn.ModuleList()
        self.down = nn.ModuleList()
        for local in range(len(self.ids)):
            gu, dn = group.gate_up[local], group.down[local]
            a = nn.Linear(gu.shape[1], gu.shape[0], bias=False)
            b = nn.Linear(dn.shape[1], dn.shape[0], bias=False)
            a.weight.data.copy_(gu)
            b.weight.data.copy_(dn)
            self.gate_up.append(a)
            self.down.append(b)
        self.num_experts = group.num_experts

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for local, e in enumerate(self.ids):
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            gate, up = self.gate_up[local](hidden[tok]).chunk(2, dim=-1)
            y = self.down[local](nn.functional.silu(gate) * up)
            out.index_add_(0, tok, y * top_k_weights[tok, slot, None])
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(REF if REF.is_dir() else REPO / "examples" / "olmoe-demo"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--aihwkit-slices", type=int, default=8, help="expert weight slices to build with aihwkit")
    args = ap.parse_args()

    from aihwkit.nn.conversion import convert_to_analog

    from hetmoe_compile.analog import analog_config, simulate
    from hetmoe_compile.analog.aihwkit_reference import aihwkit_linear, aihwkit_rpu_config
    from hetmoe_compile.analog.instance import program_group
    from hetmoe_compile.base.tables import format_table
    from hetmoe_compile.compose.api import compile
    from hetmoe_compile.models import load_model
    from hetmoe_compile.placement import PlacementPolicy

    torch.manual_seed(0)
    cfg = analog_config("pcm")
    every = analog_config("pcm", w_noise=0.0175, ir_drop=1.0, bound_management="iterative")

    def placed():
        m = load_model(args.model)
        return m, compile(m, PlacementPolicy(0.25), cfg).info

    model, info = placed()  # stays clean; a simulated copy per configuration, timed in turn in each round
    sim_models = {"pcm": placed()[0], "every": placed()[0]}
    simulate(sim_models["pcm"], cfg, seed=0)
    simulate(sim_models["every"], every, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    step = torch.randint(0, model.config.vocab_size, (8, 1), generator=torch.Generator().manual_seed(1))
    print(
        f"model {args.model}: {len(info.moe_layers)} MoE layers x {info.moe_layers[0].num_experts} experts, "
        f"25% digital; forward on {args.batch}x{args.seq} tokens and on 8x1; {torch.get_num_threads()} threads; "
        f"{args.repeat} rounds (decode steps: {10 * args.repeat}), ratios are medians of per-round ratios"
    )

    def run(m, x):
        def forward():
            with torch.no_grad():
                m(input_ids=x, use_cache=False)

        return forward

    models = {"clean": model, **sim_models}
    batch_times = rounds({name: run(m, ids) for name, m in models.items()}, args.repeat)
    step_times = rounds({name: run(m, step) for name, m in models.items()}, 10 * args.repeat)
    clean, sim, sim_every = (statistics.median(batch_times[k]) for k in models)
    x_pcm, x_every = (paired_ratio(batch_times[k], batch_times["clean"]) for k in ("pcm", "every"))
    clean_macs, analog_macs = _macs(model, info, run(model, ids))
    bound = (clean_macs + 3 * analog_macs) / clean_macs
    del sim_models, models

    # 2. programming: all analog experts (ours) vs aihwkit layers per expert weight slice
    groups = [model.get_submodule(l.experts).groups["analog"] for l in info.moe_layers]  # the ideal groups
    slices = sum(2 * len(g.ids) for g in groups)
    t = time.perf_counter()
    for layer, g in zip(info.moe_layers, groups):
        program_group(g.gate_up, g.down, g.expert_ids, cfg, 1, layer.index)
    ours_prog = time.perf_counter() - t
    src = groups[0]
    n = min(args.aihwkit_slices, 2 * len(src.ids))
    t = time.perf_counter()
    for k in range(n):
        w = src.gate_up[k // 2] if k % 2 == 0 else src.down[k // 2]
        aihwkit_linear(w, cfg, seed=k)
    aihwkit_per_slice = (time.perf_counter() - t) / n
    aihwkit_prog = aihwkit_per_slice * slices

    # 2b. one OLMoE-1B-7B-sized expert slice (2048 x 1024), where aihwkit's per-tile set-up is amortised
    big = torch.randn(4, 2048, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    from hetmoe_compile.analog.tiles import program_matrices

    program_matrices(big[:1], cfg, [0])
    t = time.perf_counter()
    program_matrices(big, cfg, [0, 1, 2, 3])
    ours_big = (time.perf_counter() - t) / 4
    t = time.perf_counter()
    for k in range(2):
        aihwkit_linear(big[k], cfg, seed=k)
    aihwkit_big = (time.perf_counter() - t) / 2

    # 3. whole simulated model vs aihwkit convert_to_analog on an equivalent nn.Linear-per-expert model
    for layer, g in zip(info.moe_layers, groups):
        het = model.get_submodule(layer.experts)
        het.groups["analog"] = convert_to_analog(LinearExperts(g), aihwkit_rpu_config(cfg)).eval()
        het.groups["analog"].drift_analog_weights(cfg.t_inference)
    aihwkit_fwd = timed(run(model, ids), max(1, args.repeat // 2))

    rows = [
        ["forward: clean canonical model", f"{clean * 1e3:.0f} ms", "1.00x"],
        [
            "forward: simulated (hetmoe-compile, pcm)",
            f"{sim * 1e3:.0f} ms",
            f"{x_pcm:.2f}x",
        ],
        [
            "forward: simulated, pcm + w_noise 0.0175 + ir_drop 1 + iterative bound management",
            f"{sim_every * 1e3:.0f} ms",
            f"{x_every:.2f}x",
        ],
        [
            "decode step (8 x 1 tokens): clean canonical model",
            f"{statistics.median(step_times['clean']) * 1e3:.1f} ms",
            "1.00x",
        ],
        *(
            [
                f"decode step: simulated, {label}",
                f"{statistics.median(step_times[k]) * 1e3:.1f} ms",
                f"{paired_ratio(step_times[k], step_times['clean']):.2f}x",
            ]
            for k, label in (("pcm", "pcm"), ("every", "every effect on"))
        ),
        [
            "forward: aihwkit convert_to_analog (per-expert nn.Linear)",
            f"{aihwkit_fwd * 1e3:.0f} ms",
            f"{aihwkit_fwd / clean:.2f}x",
        ],
        [f"program {slices} analog expert slices: hetmoe-compile", f"{ours_prog:.3f} s", "1.00x"],
        [
            f"program {slices} slices: aihwkit per slice (timed on {n})",
            f"{aihwkit_prog:.3f} s",
            f"{aihwkit_prog / ours_prog:.1f}x",
        ],
        ["program one 2048x1024 slice: hetmoe-compile (of 4 vectorised)", f"{ours_big * 1e3:.0f} ms", "1.00x"],
        ["program one 2048x1024 slice: aihwkit", f"{aihwkit_big * 1e3:.0f} ms", f"{aihwkit_big / ours_big:.1f}x"],
    ]
    rows.insert(
        3,
        [
            "  lower bound from multiply-accumulates (clean + 3x the analog experts' products)",
            f"{clean_macs / 1e9:.3f} + 3 x {analog_macs / 1e9:.3f} GMAC",
            f"{bound:.2f}x",
        ],
    )
    print(format_table(["measurement", "time", "ratio"], rows))
    print(
        f"simulated / clean forward: {x_pcm:.2f}x "
        f"({x_every:.2f}x with every effect on; aihwkit's "
        "PyTorch tile has no w_noise or IR drop, its C++ tile does not load under this torch); "
        f"aihwkit / hetmoe-compile simulated forward: "
        f"{aihwkit_fwd / sim:.2f}x; programming speed-up: {aihwkit_prog / ours_prog:.1f}x"
    )
    return 0


def _macs(model: nn.Module, info, forward) -> tuple[float, float]:
    """Multiply-accumulates of one clean forward, and those of its analog experts' tile products. With IR drop and
    pcm-read weight noise every analog product is taken 4 times (W on x and on x (1 - p^2), |W| on |x| and on
    x^2: aihwkit's arithmetic), so 3 more times the analog experts' MACs is the least extra work at the same
    efficiency, bound-management re-runs not counted. Dense layers from torch's FLOP counter; the expert-group
    ops (custom ops, opaque to it) from the rows routed to each group."""
    from torch.utils.flop_counter import FlopCounterMode

    rows: dict[str, int] = {}

    def hook(name):
        def count(module, args, out):
            hit = torch.isin(args[1], module.expert_ids)
            rows[name] = rows.get(name, 0) + int(hit.sum())

        return count

    handles, sizes = [], {}
    for layer in info.moe_layers:
        for device, g in model.get_submodule(layer.experts).groups.items():
            name = f"{layer.index}.{device}"
            sizes[name] = g.gate_up.shape[1] * g.gate_up.shape[2] + g.down.shape[1] * g.down.shape[2]
            handles.append(g.register_forward_hook(hook(name)))
    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    for h in handles:
        h.remove()
    experts = {k: rows[k] * sizes[k] for k in rows}
    analog = sum(v for k, v in experts.items() if k.endswith("analog"))
    return counter.get_total_flops() / 2 + sum(experts.values()), float(analog)


if __name__ == "__main__":
    sys.exit(main())
