"""Runtime speed on the reference model: partitioned export vs one monolithic ONNX export vs PyTorch eager, each
with and without a KV cache.

Prefill: one forward over 512 tokens. Decode: greedy generation of 16 tokens after prompts of 128, 512 and 1008
tokens, per token. Without a cache each decode step re-runs the prefix; with one (``--kv-cache`` exports, eager's
``DynamicCache``) it runs one token. All use the same number of intra-op threads. Targets (issue 15): partitioned
with cache <= 1.15x monolithic with cache and <= 1.0x eager with its cache; per-token time after 1024 tokens
<= 1.5x the time after 128 (the reference model has 1024 positions: the longest prompt is 1008).

    python benchmarks/bench_runtime.py [--model DIR] [--threads N] [--repeat N] [--prompts 128,512,1008]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import timed  # noqa: E402

from hetmoe_compile import runtime  # noqa: E402
from hetmoe_compile.export import ExportOptions, export_onnx  # noqa: E402
from hetmoe_compile.models import load_model  # noqa: E402
from hetmoe_compile.pipeline import place_model  # noqa: E402
from hetmoe_compile.placement import PlacementPolicy  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument(
        "--prompts",
        default="128,512,1008",
        help="prompt lengths before the decoded tokens (1008 + 16 fills the reference model's 1024 positions)",
    )
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    placement = place_model(model, PlacementPolicy(digital_fraction=0.25), source=args.model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    prompts = [torch.randint(0, vocab, (1, int(k)), generator=gen) for k in args.prompts.split(",")]
    n = args.new_tokens
    dec_repeat = max(1, args.repeat // 2)
    with tempfile.TemporaryDirectory() as tmp:
        part = runtime.load(
            export_onnx(model, placement, Path(tmp) / "p", ExportOptions(progress=False)).parent, threads=args.threads
        )
        mono = runtime.load(
            export_onnx(model, placement, Path(tmp) / "m", ExportOptions(monolithic=True, progress=False)).parent,
            threads=args.threads,
        )
        fused = runtime.load(
            export_onnx(model, placement, Path(tmp) / "f", ExportOptions(ort_moe=True, progress=False)).parent,
            threads=args.threads,
        )

        def cached(name: str, **kw) -> runtime.Runner:
            out = export_onnx(model, placement, Path(tmp) / name, ExportOptions(kv_cache=True, progress=False, **kw))
            return runtime.load(out.parent, threads=args.threads)

        part_kv, mono_kv = cached("pk"), cached("mk", monolithic=True)
        rows = {}
        for name, runner in (
            ("partitioned ONNX, KV cache", part_kv),
            ("monolithic ONNX, KV cache", mono_kv),
            ("partitioned ONNX (recompute)", part),
            ("partitioned ONNX (recompute), digital experts as com.microsoft::MoE", fused),
            ("monolithic ONNX (recompute)", mono),
        ):
            pre = timed(lambda r=runner: r(long.numpy()), args.repeat)
            dec = [
                timed(lambda r=runner, p=p: r.generate(p.numpy(), n, eos_token_id=-1), dec_repeat) / n for p in prompts
            ]
            rows[name] = (pre, dec)
        ref = part(long.numpy())
        mono_err = float(np.abs(mono(long.numpy()) - ref).max() / np.abs(ref).max())
        fused_err = float(np.abs(fused(long.numpy()) - ref).max() / np.abs(ref).max())
        cached_tokens = part_kv.generate(prompts[0].numpy(), n, eos_token_id=-1)
        same_tokens = bool(np.array_equal(cached_tokens, part.generate(prompts[0].numpy(), n, eos_token_id=-1)))

    def eager_prefill():
        with torch.no_grad():
            model(input_ids=long, use_cache=False)

    def eager_generate(prompt, cache: bool):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=cache, pad_token_id=0)

    pre = timed(eager_prefill, args.repeat)
    for label, cache in (("PyTorch eager, KV cache", True), ("PyTorch eager (recompute)", False)):
        rows[label] = (pre, [timed(lambda p=p, c=cache: eager_generate(p, c), dec_repeat) / n for p in prompts])
    base = rows["monolithic ONNX, KV cache"]
    eager = rows["PyTorch eager, KV cache"]
    print(
        f"model {args.model}, 25 % experts digital (max-neuron-norm), {args.threads} threads, median of "
        f"{args.repeat} (prefill) and {dec_repeat} (decode, {n} new tokens)"
    )
    lengths = [p.shape[1] for p in prompts]
    head = " | ".join(f"decode after {k} (ms/token)" for k in lengths)
    print(
        f"| runner | prefill {args.prefill} tok (ms) | {head} | x mono KV | x eager KV | "
        f"after {lengths[-1]} / {lengths[0]} |"
    )
    print("|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|")
    for name, (p, d) in rows.items():
        cells = " | ".join(f"{x * 1e3:.1f}" for x in d)
        print(
            f"| {name} | {p * 1e3:.1f} | {cells} | {d[-1] / base[1][-1]:.2f} | {d[-1] / eager[1][-1]:.2f} | "
            f"{d[-1] / d[0]:.2f} |"
        )
    print(
        f"\npartitioned vs monolithic logits: max relative difference {mono_err:.1e}; with MoE nodes: {fused_err:.1e}; "
        f"greedy tokens with and without the cache equal: {same_tokens}"
    )


if __name__ == "__main__":
    main()
