"""Decode at scale: the partitioned KV-cached export against the monolithic one, through the torch-free runtime, on
an OLMoE-1B-7B-shaped model (hidden 2048, 64 experts of width 1024, top-8, vocabulary 50304; ``--layers`` layers,
random weights), 25 % of the experts digital (max-neuron-norm).

Issue 15's targets are measured on the 18 M-parameter reference model by ``bench_runtime.py``, where a decoded
token costs a few milliseconds and each partition's session run is a visible share of it. This script measures the
same ratio where users work. Decode: ms per token after each prompt, (generate 1 + ``--new-tokens`` minus generate
1) / ``--new-tokens``, the two runners in turn in each round; ratios are medians of the per-round ratios. Prefill:
one forward over the first prompt, medians of the same rounds. The model is built, placed, exported and freed
before the runtimes load, so both sets of sessions fit in memory together.

    python benchmarks/bench_runtime_scale.py [--layers 2] [--threads 2] [--repeat 5] [--prompts 128,512]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import olmoe_1b_7b_config  # noqa: E402
from timing import decode_per_token, paired_ratio, paired_ratios, rounds  # noqa: E402

from hetmoe_compile import runtime  # noqa: E402
from hetmoe_compile.compose.pipeline import place_model  # noqa: E402
from hetmoe_compile.export import ExportOptions, export_onnx  # noqa: E402
from hetmoe_compile.placement import PlacementPolicy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (after one warm-up round)")
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = olmoe_1b_7b_config(args.layers)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, (1, int(k))) for k in args.prompts.split(",")]
    with tempfile.TemporaryDirectory(prefix="hetmoe-runtime-scale-") as tmp:
        with torch.no_grad():
            model = OlmoeForCausalLM(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        placement = place_model(model, PlacementPolicy(digital_fraction=0.25))
        t = time.perf_counter()
        for name, mono in (("p", False), ("m", True)):
            export_onnx(
                model, placement, Path(tmp) / name, ExportOptions(kv_cache=True, monolithic=mono, progress=False)
            )
        export_s = time.perf_counter() - t
        del model
        gc.collect()
        part = runtime.load(Path(tmp) / "p", threads=args.threads)
        mono = runtime.load(Path(tmp) / "m", threads=args.threads)
        runners = {"partitioned ONNX, KV cache": part, "monolithic ONNX, KV cache": mono}
        first = prompts[0]
        logit_diff = float(np.abs(part(first) - mono(first)).max())
        prefill = rounds({name: (lambda r=r: r(first)) for name, r in runners.items()}, args.repeat)
        generators = {name: (lambda p, k, r=r: r.generate(p, k, eos_token_id=-1)) for name, r in runners.items()}
        samples = decode_per_token(generators, prompts, args.new_tokens, args.repeat)
        schedule = len(part.manifest["schedule"])

    base = "monolithic ONNX, KV cache"
    lengths = [p.shape[1] for p in prompts]
    each = "/".join(str(k) for k in lengths)
    print(
        f"OLMoE-1B-7B-shaped, {args.layers} layers, {params / 1e9:.2f} B parameters, float32, {args.threads} "
        f"threads; {schedule} partitions against 1; exports took {export_s:.0f} s; medians of {args.repeat} rounds "
        f"(decode: 1 + {args.new_tokens} minus 1 generated tokens)"
    )
    head = " | ".join(f"decode after {k} (ms/token)" for k in lengths)
    print(f"| runner | prefill {lengths[0]} tok (ms) | {head} | x mono, decode ({each}) | x mono, prefill |")
    print("|---|---:|" + "---:|" * len(lengths) + "---:|---:|")
    for name in runners:
        cells = " | ".join(f"{statistics.median(x) * 1e3:.1f}" for x in samples[name])
        ratios = " / ".join(f"{r:.3f}" for r in paired_ratios(samples, name, base))
        pre = statistics.median(prefill[name]) * 1e3
        print(f"| {name} | {pre:.0f} | {cells} | {ratios} | {paired_ratio(prefill[name], prefill[base]):.3f} |")
    print(f"\npartitioned vs monolithic logits over the first prompt: max absolute difference {logit_diff:.1e}")


if __name__ == "__main__":
    main()
