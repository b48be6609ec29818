"""Scale benchmark: an OLMoE-1B-7B-shaped model (hidden 2048, 64 experts of width 1024, top-8, vocabulary 50304;
random weights) with L layers, in float32 and bfloat16: placement, programming, forward speed and memory.

Each dtype runs in a fresh subprocess. Memory is the resident set's high-water mark (``VmHWM``), reset before each
phase through ``/proc/self/clear_refs`` so each phase's peak is its own, minus the RSS of the process before the
model was built (Python, torch), divided by the bytes of the model's weights.

Rows: placement (``hc.compile`` at 25 %, and ``place --load meta`` on the saved checkpoint in a fresh process: its
peak RSS over the checkpoint's size); programming every analog expert (seconds, weights per second, and the
floor: the time the device takes only to draw the same number of normal variates, measured in the same run);
forward tokens per second clean and simulated (median of ``--repeat`` runs), and the simulated forward through
each expert-group path (per-expert loop and grouped GEMM, ``grouped_routing.py``) side by side; peak memory over
the weights during and after ``simulate(0)``,
during ``simulate(1)`` (re-programming) and during a simulated forward; and the activations of one forward
(peak of a clean forward above the resident model), the allowance the 1.15x target adds; and, on the CPU, the
model loaded again with a device map that offloads its last decoder layer to disk (accelerate): its clean logits
against the unsharded model's and its forward time over the unsharded one.

    python benchmarks/bench_scale.py [--layers 2] [--tokens 256] [--dtypes float32,bfloat16] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "scale.json"


_PLACE_AND_REPORT_PEAK = """
import sys
from pathlib import Path
from hetmoe_compile.cli.app import main
rc = main(["place", sys.argv[1], "--load", "meta", "--no-graph", "--out", sys.argv[2]])
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
sys.exit(rc)
"""


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Phase:
    """Seconds and peak resident memory (bytes above ``base``) of a block; CUDA peak memory when on a GPU."""

    def __init__(self, base: int, device) -> None:
        self.base, self.device = base, device

    def __enter__(self):
        import torch

        from hetmoe_compile.base import host_memory

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        host_memory.trim()  # start each phase from the live memory, not the allocator's cached pages
        _reset_peak()
        self.start = torch.cuda.memory_allocated() if self.device.type == "cuda" else _rss("VmRSS") - self.base
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.after = torch.cuda.memory_allocated()
        else:
            self.peak = _rss("VmHWM") - self.base
            self.after = _rss("VmRSS") - self.base
        self.seconds = time.perf_counter() - self.t


def child(layers: int, dtype_name: str, tokens: int, device_name: str, repeat: int) -> dict:
    import torch
    from shapes import olmoe_1b_7b_config
    from transformers import OlmoeForCausalLM

    import hetmoe_compile as hc
    from hetmoe_compile.analog.pcm_fused import CHUNK_ELEMENTS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(
        "cuda"
        if device_name == "auto" and torch.cuda.is_available()
        else ("cpu" if device_name == "auto" else device_name)
    )
    dtype = getattr(torch, dtype_name)
    base = _rss("VmRSS") if device.type == "cpu" else 0
    torch.manual_seed(0)
    cfg = olmoe_1b_7b_config(layers)
    torch.set_default_dtype(dtype)
    with torch.no_grad(), torch.device(device):
        model = OlmoeForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    ckpt = tempfile.mkdtemp(prefix="hetmoe-scale-")
    model.save_pretrained(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))

    def forward(m=model):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).logits

    def median_time(m=model) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            forward(m)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with Phase(base, device) as place:
        compiled = hc.compile(model, hc.PlacementPolicy(digital_fraction=0.25), "pcm")
    analog = sum(g.gate_up.numel() + g.down.numel() for g in _groups(model, "analog"))
    forward()  # warm-up
    with Phase(base, device) as clean:
        ref = forward()
    clean_s = median_time()
    with Phase(base, device) as prog0:
        compiled.simulate(seed=0)
    with Phase(base, device) as noisy:
        forward()
    sim_s = median_time()
    grouped_default = use_grouped_now(ids, model)
    path_s = {}  # the simulated forward through each expert-group path, side by side
    for mode in ("0", "1"):
        with _grouped_mm(mode):
            path_s[mode] = median_time()
    with Phase(base, device) as prog1:
        compiled.simulate(seed=1)
    with Phase(base, device) as noisy1:
        out1 = forward()
    with Phase(base, device) as floor:  # the same number of normal variates, drawn as programming draws them
        gen = torch.Generator(device=device).manual_seed(0)
        per = max(1, CHUNK_ELEMENTS)
        left = 5 * analog
        while left > 0:
            torch.randn(min(per, left), generator=gen, device=device)
            left -= per
    compiled.restore()
    restored = forward()
    # `place` on the saved checkpoint without loading it (a fresh process: its peak RSS is its own)
    t = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", _PLACE_AND_REPORT_PEAK, ckpt, str(Path(ckpt) / "placement.json")],
        check=True,
        capture_output=True,
        text=True,
    )
    meta_place_s = time.perf_counter() - t
    meta_place_rss = int(run.stdout.strip().splitlines()[-1])  # its own VmHWM (a forked parent's pages excluded)
    # the same model sharded by a device map that offloads its last decoder layer to disk
    sharded_row = {}
    if device.type == "cpu":
        from hetmoe_compile.models import load_model

        last = f"model.layers.{layers - 1}"
        names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
        dm = {n: "cpu" for n in names + [f"model.layers.{i}" for i in range(layers - 1)]} | {last: "disk"}
        sharded = load_model(ckpt, dtype=dtype, device_map=dm, offload_folder=str(Path(ckpt) / "offload"))
        hc.compile(sharded, hc.PlacementPolicy(digital_fraction=0.25), "pcm")
        forward(sharded)
        sharded_logits = forward(sharded)
        sharded_row = {
            "sharded_max_abs_diff": float((sharded_logits.float() - ref.float()).abs().max()),
            "sharded_over_unsharded_time": median_time(sharded) / clean_s,
        }
        del sharded
    shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "dtype": dtype_name,
        "layers": layers,
        "tokens": tokens,
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights,
        "analog_weights": analog,
        "base_rss": base,
        "place_s": place.seconds,
        "place_peak_over_weights": place.peak / weights,
        "program_s": prog0.seconds,
        "reprogram_s": prog1.seconds,
        "weights_per_s": analog / prog0.seconds,
        "floor_s": floor.seconds,
        "repeat": repeat,
        "clean_tokens_per_s": tokens / clean_s,
        "sim_tokens_per_s": tokens / sim_s,
        "sim_over_clean_time": sim_s / clean_s,
        "sim_grouped_path": grouped_default,
        "sim_loop_s": path_s["0"],
        "sim_grouped_s": path_s["1"],
        "grouped_over_loop_time": path_s["1"] / path_s["0"],
        "activations_over_weights": max(0, clean.peak - clean.start) / weights,
        "checkpoint_bytes": ckpt_bytes,
        "meta_place_s": meta_place_s,
        "meta_place_peak_rss": meta_place_rss,
        "meta_place_rss_over_checkpoint": meta_place_rss / ckpt_bytes,
        **sharded_row,
        "peak_simulate_over_weights": prog0.peak / weights,
        "after_simulate_over_weights": prog0.after / weights,
        "peak_resimulate_over_weights": prog1.peak / weights,
        "after_resimulate_over_weights": prog1.after / weights,
        "peak_sim_forward_over_weights": max(noisy.peak, noisy1.peak) / weights,
        "restored_equal": bool(torch.equal(restored, ref)),
        "finite": bool(torch.isfinite(out1).all()),
    }


@contextlib.contextmanager
def _grouped_mm(mode: str):
    from hetmoe_compile.ir.grouped_routing import GROUPED_MM_ENV

    before = os.environ.get(GROUPED_MM_ENV)
    os.environ[GROUPED_MM_ENV] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ[GROUPED_MM_ENV]
        else:
            os.environ[GROUPED_MM_ENV] = before


def use_grouped_now(ids, model) -> bool:
    """Whether the default (``auto``) path of this run's analog groups is the grouped one."""
    import torch

    from hetmoe_compile.ir.grouped_routing import use_grouped

    g = next(_groups(model, "analog"))
    w = g.gate_up_weight
    return use_grouped(torch.empty(1, device=ids.device), w.dtype, w.shape[-1], w.shape[-2] * w.shape[-1])


def _groups(model, device: str):
    from hetmoe_compile.ir.expert_group import HetExperts

    for m in model.modules():
        if isinstance(m, HetExperts) and device in m.groups:
            yield m.groups[device]


def table(rows: list[dict]) -> str:
    gib = 1 << 30
    lines = [
        "| dtype | layers | weights | place s | program s | Mweights/s | floor s | clean tok/s | sim tok/s | "
        "sim/clean | peak/W simulate | after | peak/W re-simulate | after | peak/W sim fwd | activations/W | "
        "restored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['layers']} | {r['weights_bytes'] / gib:.2f} GiB | {r['place_s']:.1f} | "
            f"{r['program_s']:.1f} | {r['weights_per_s'] / 1e6:.1f} | {r['floor_s']:.1f} | "
            f"{r['clean_tokens_per_s']:.0f} | {r['sim_tokens_per_s']:.0f} | {r['sim_over_clean_time']:.2f}x | "
            f"{r['peak_simulate_over_weights']:.3f} | {r['after_simulate_over_weights']:.3f} | "
            f"{r['peak_resimulate_over_weights']:.3f} | {r['after_resimulate_over_weights']:.3f} | "
            f"{r['peak_sim_forward_over_weights']:.3f} | {r['activations_over_weights']:.3f} | "
            f"{'bit-exact' if r['restored_equal'] else 'DIFFERS'} |"
        )
    lines += [
        "",
        "| dtype | simulated forward: per-expert loop s | grouped GEMM s | grouped / loop | default path |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "sim_loop_s" in r:
            lines.append(
                f"| {r['dtype']} | {r['sim_loop_s']:.3f} | {r['sim_grouped_s']:.3f} | "
                f"{r['grouped_over_loop_time']:.2f}x | {'grouped' if r['sim_grouped_path'] else 'loop'} |"
            )
    lines += [
        "",
        "| dtype | compile peak/W | checkpoint | `place --load meta` s | its peak RSS / checkpoint | "
        "sharded (last layer on disk): max abs logit diff | sharded / unsharded forward time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sharded = (
            f"{r['sharded_max_abs_diff']:.2e} | {r['sharded_over_unsharded_time']:.2f}x"
            if "sharded_max_abs_diff" in r
            else "- | -"
        )
        lines.append(
            f"| {r['dtype']} | {r['place_peak_over_weights']:.3f} | {r['checkpoint_bytes'] / gib:.2f} GiB | "
            f"{r['meta_place_s']:.1f} | {r['meta_place_rss_over_checkpoint']:.3f} | {sharded} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--repeat", type=int, default=3, help="forward timings are the median of this many runs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.layers, args.child, args.tokens, args.device, args.repeat)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                dtype,
                "--layers",
                str(args.layers),
                "--tokens",
                str(args.tokens),
                "--device",
                args.device,
                "--repeat",
                str(args.repeat),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"bench_scale: the {dtype} run failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
