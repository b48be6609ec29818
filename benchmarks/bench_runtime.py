"""Runtime speed on the reference model: partitioned export vs one monolithic ONNX export vs PyTorch eager.

Prefill: one forward over 512 tokens. Decode: greedy generation of 16 tokens after a 128-token prompt, per token.
The ONNX exports have no KV cache, so each decode step re-runs the prefix; eager is shown with and without its KV
cache. All three use the same number of intra-op threads. Target: partitioned <= 1.15x monolithic.

    python benchmarks/bench_runtime.py [--model DIR] [--threads N] [--repeat N]
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
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    placement = place_model(model, PlacementPolicy(digital_fraction=0.25), source=args.model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)
    n = args.new_tokens
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
        rows = {}
        for name, runner in (
            ("partitioned ONNX", part),
            ("partitioned ONNX, digital experts as com.microsoft::MoE", fused),
            ("monolithic ONNX", mono),
        ):
            pre = timed(lambda r=runner: r(long.numpy()), args.repeat)
            dec = timed(lambda r=runner: r.generate(prompt.numpy(), n, eos_token_id=-1), max(1, args.repeat // 2)) / n
            rows[name] = (pre, dec)
        ref = part(long.numpy())
        mono_err = float(np.abs(mono(long.numpy()) - ref).max() / np.abs(ref).max())
        fused_err = float(np.abs(fused(long.numpy()) - ref).max() / np.abs(ref).max())

    def eager_prefill():
        with torch.no_grad():
            model(input_ids=long, use_cache=False)

    def eager_generate(cache: bool):
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=cache, pad_token_id=0)

    pre = timed(eager_prefill, args.repeat)
    rows["PyTorch eager (no KV cache)"] = (pre, timed(lambda: eager_generate(False), max(1, args.repeat // 2)) / n)
    rows["PyTorch eager (KV cache)"] = (pre, timed(lambda: eager_generate(True), max(1, args.repeat // 2)) / n)
    base = rows["monolithic ONNX"]
    print(
        f"model {args.model}, 25 % experts digital (max-neuron-norm), {args.threads} threads, median of {args.repeat}"
    )
    print(
        f"| runner | prefill {args.prefill} tok (ms) | x monolithic | decode ms/token ({args.prompt}-token prompt, "
        f"{n} new) | x monolithic |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, (p, d) in rows.items():
        print(f"| {name} | {p * 1e3:.1f} | {p / base[0]:.2f} | {d * 1e3:.1f} | {d / base[1]:.2f} |")
    print(
        f"\npartitioned vs monolithic logits: max relative difference {mono_err:.1e}; with MoE nodes: {fused_err:.1e}"
    )


if __name__ == "__main__":
    main()
