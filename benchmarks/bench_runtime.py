"""Runtime speed on the reference model: partitioned export vs one monolithic ONNX export vs PyTorch eager, each
with and without a KV cache.

Prefill: one forward over 512 tokens. Decode: the time per generated token after prompts of 128, 512 and 1007
tokens, prefill excluded: (greedy generation of 1 + 16 tokens minus generation of 1 token) / 16, each runner's own
``generate`` (eager: ``model.generate``). Without a cache each decode step re-runs the prefix; with one
(``--kv-cache`` exports, eager's ``DynamicCache``) it runs one token. The runners take turns within each repeat, so
the machine's drift hits them alike; medians, and the ratio columns are medians of the per-round ratios of two
runners (paired). The onnxruntime-genai rows run the partitioned and the monolithic KV-cached files
through their ``genai_config.json`` (prefill column: one generated token after the 512-token prompt), so the
partitioned/monolithic ratio is also measured within GenAI's C++ runtime (printed below the table); its stages
take GenAI's default intra-op threads, half the cores (1 here), whatever ``--threads`` says. The other runners use
``--threads`` intra-op threads each; the row "analog partitions 1 thread" is the partitioned KV-cached runner
with ``analog_threads=1`` (its digital partitions at ``--threads``; left out when ``--threads`` is 1).
Targets (issue 15): partitioned with cache <= 1.15x monolithic with cache and <= 1.0x eager with its cache;
per-token time after 1024 tokens <= 1.5x the time after 128 (the reference model has 1024 positions: the longest
prompt is 1007).

    python benchmarks/bench_runtime.py [--model DIR] [--threads N] [--repeat N] [--prompts 128,512,1007]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import decode_per_token, paired_ratios, timed  # noqa: E402

from hetmoe_compile import runtime  # noqa: E402
from hetmoe_compile.compose.pipeline import place_model  # noqa: E402
from hetmoe_compile.export import ExportOptions, export_onnx  # noqa: E402
from hetmoe_compile.models import load_model  # noqa: E402
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
        default="128,512,1007",
        help="prompt lengths before the decoded tokens (1007 + 1 + 16 fills the reference model's 1024 positions)",
    )
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--decode-repeat", type=int, default=0, help="decode rounds (default: half of --repeat)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    placement = place_model(model, PlacementPolicy(digital_fraction=0.25), source=args.model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    long = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    prompts = [torch.randint(0, vocab, (1, int(k)), generator=gen) for k in args.prompts.split(",")]
    n = args.new_tokens
    dec_repeat = args.decode_repeat or max(1, args.repeat // 2)
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
        onnx_runners = {
            "partitioned ONNX, KV cache": part_kv,
            **(
                {
                    "partitioned ONNX, KV cache, analog partitions 1 thread": runtime.load(
                        Path(tmp) / "pk", threads=args.threads, analog_threads=1
                    )
                }
                if args.threads != 1
                else {}
            ),
            "monolithic ONNX, KV cache": mono_kv,
            "partitioned ONNX (recompute)": part,
            "partitioned ONNX (recompute), digital experts as com.microsoft::MoE": fused,
            "monolithic ONNX (recompute)": mono,
        }
        generators: dict[str, Callable[[torch.Tensor, int], object]] = {
            name: (lambda p, k, r=r: r.generate(p.numpy(), k, eos_token_id=-1)) for name, r in onnx_runners.items()
        }
        genai = og.Model(str(Path(tmp) / "pk"))  # the same partition files, through GenAI's decoder-pipeline
        generators["partitioned ONNX, KV cache, onnxruntime-genai"] = lambda p, k: _genai_generate(genai, p, k)
        genai_mono = og.Model(str(Path(tmp) / "mk"))  # the monolithic file, through GenAI
        generators["monolithic ONNX, KV cache, onnxruntime-genai"] = lambda p, k: _genai_generate(genai_mono, p, k)
        for cache, label in ((True, "PyTorch eager, KV cache"), (False, "PyTorch eager (recompute)")):
            generators[label] = lambda p, k, c=cache: _eager_generate(model, p, k, c)
        prefill = {name: timed(lambda r=r: r(long.numpy()), args.repeat) for name, r in onnx_runners.items()}
        eager_pre = timed(lambda: _eager_prefill(model, long), args.repeat)
        prefill.update({"PyTorch eager, KV cache": eager_pre, "PyTorch eager (recompute)": eager_pre})
        prefill["partitioned ONNX, KV cache, onnxruntime-genai"] = timed(
            lambda: _genai_generate(genai, long, 1), args.repeat
        )
        prefill["monolithic ONNX, KV cache, onnxruntime-genai"] = timed(
            lambda: _genai_generate(genai_mono, long, 1), args.repeat
        )
        samples = decode_per_token(generators, prompts, n, dec_repeat)
        decode = {name: [statistics.median(x) for x in per] for name, per in samples.items()}
        rows = {name: (prefill[name], decode[name]) for name in generators}
        ref = part(long.numpy())
        mono_err = float(np.abs(mono(long.numpy()) - ref).max() / np.abs(ref).max())
        fused_err = float(np.abs(fused(long.numpy()) - ref).max() / np.abs(ref).max())
        cached_tokens = part_kv.generate(prompts[0].numpy(), n, eos_token_id=-1)
        same_tokens = bool(np.array_equal(cached_tokens, part.generate(prompts[0].numpy(), n, eos_token_id=-1)))

    mono_name, eager_name = "monolithic ONNX, KV cache", "PyTorch eager, KV cache"
    print(
        f"model {args.model}, 25 % experts digital (max-neuron-norm), {args.threads} threads, median of "
        f"{args.repeat} (prefill) and {dec_repeat} (decode: 1 + {n} minus 1 generated tokens, runners in turn)"
    )
    lengths = [p.shape[1] for p in prompts]
    head = " | ".join(f"decode after {k} (ms/token)" for k in lengths)
    each = "/".join(str(k) for k in lengths)
    print(
        f"| runner | prefill {args.prefill} tok (ms) | {head} | x mono KV ({each}) | x eager KV ({each}) | "
        f"after {lengths[-1]} / {lengths[0]} |"
    )
    print("|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|")
    for name, (p, d) in rows.items():
        cells = " | ".join(f"{x * 1e3:.1f}" for x in d)
        x_mono = " / ".join(f"{r:.2f}" for r in paired_ratios(samples, name, mono_name))
        x_eager = " / ".join(f"{r:.2f}" for r in paired_ratios(samples, name, eager_name))
        print(f"| {name} | {p * 1e3:.1f} | {cells} | {x_mono} | {x_eager} | {d[-1] / d[0]:.2f} |")
    genai_own = paired_ratios(
        samples, "partitioned ONNX, KV cache, onnxruntime-genai", "monolithic ONNX, KV cache, onnxruntime-genai"
    )
    print(
        "\nwithin onnxruntime-genai, partitioned over monolithic decode ("
        + each
        + "): "
        + " / ".join(f"{r:.2f}" for r in genai_own)
    )
    print(
        f"partitioned vs monolithic logits: max relative difference {mono_err:.1e}; with MoE nodes: {fused_err:.1e}; "
        f"greedy tokens with and without the cache equal: {same_tokens}"
    )


def _eager_prefill(model, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def _eager_generate(model, prompt: torch.Tensor, k: int, cache: bool) -> None:
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=cache, pad_token_id=0)


def _genai_generate(model, prompt: torch.Tensor, k: int) -> None:
    """``k`` greedy tokens after ``prompt`` with onnxruntime-genai (EOS ignored: min_length = max_length)."""
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + k
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()


if __name__ == "__main__":
    main()
