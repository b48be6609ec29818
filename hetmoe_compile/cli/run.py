"""``hetmoe-compile run``: generate text with an export on ONNX Runtime (no torch needed)."""

from __future__ import annotations

import sys
import time

from ..base.errors import HetMoEError
from .arguments import _count, _number, _positive_int, _seed
from .options import _list


def add_parser(sub) -> None:
    """Declare the command's arguments on ``sub`` (the subparsers)."""
    r = sub.add_parser("run", help="generate text with an export, on ONNX Runtime (no torch needed)")
    r.add_argument("export_dir", metavar="DIR", help="a directory written by 'export'")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="prompt text (needs the tokenizer saved in the export); repeat for a batch (left-padded)",
    )
    what.add_argument("--ids", action="append", metavar="LIST", help="comma-separated prompt token ids; repeatable")
    r.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N", help="default 20")
    r.add_argument("--sample", action="store_true", help="sample the next token (default: greedy)")
    r.add_argument(
        "--temperature", type=_number(0, True, "0.8"), default=None, metavar="T", help="with --sample (default 1)"
    )
    r.add_argument("--top-k", type=_count, default=None, metavar="K", help="with --sample: the K most likely (0: off)")
    r.add_argument(
        "--top-p",
        type=_number(0, True, "0.9"),
        default=None,
        metavar="P",
        help="with --sample: the most likely tokens up to probability P, in (0, 1] (default 1: off)",
    )
    r.add_argument("--seed", type=_seed, default=None, metavar="S", help="with --sample: seed of the draws (0)")
    r.add_argument(
        "--analog",
        choices=["auto", "ideal", "instance"],
        default="auto",
        help="analog partitions: the programmed instance if exported (auto), or ideal weights",
    )
    r.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="intra-op threads per session (default: cores)"
    )
    r.add_argument(
        "--analog-threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="intra-op threads of the analog partitions (default: --threads); 1 decodes small experts faster",
    )


def run(args) -> int:
    import numpy as np

    from ..runtime import load

    sampling = _sampling(args)
    runner = load(args.export_dir, analog=args.analog, threads=args.threads or 0, analog_threads=args.analog_threads)
    tokenizer = runner.tokenizer() if args.prompt is not None else None
    rows = _prompts(args, tokenizer)
    width = max(len(r) for r in rows)
    pad = runner.manifest["model"].get("eos_token_id") or 0
    ids = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)  # left padding
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    start = time.perf_counter()
    out = runner.generate(ids, args.max_new_tokens, attention_mask=mask, sampling=sampling)
    took = time.perf_counter() - start
    for n, (row, tokens) in enumerate(zip(rows, out)):
        tokens = tokens[width - len(row) :].tolist()
        if len(rows) > 1:
            print(f"\n[{n}]" if n else "[0]")
        print(tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens)))
    new = out.shape[1] - width
    how = "greedy" if sampling is None else f"sampled, seed {sampling.seed}"
    print(
        f"\n({len(rows)} x {new} new tokens in {took:.2f} s, {how}; analog partitions: {runner.variant}; "
        f"{'KV cache' if runner.cache_inputs else 'no KV cache: every step re-runs the prefix'})",
        file=sys.stderr,
    )
    return 0


def _prompts(args, tokenizer) -> list[list[int]]:
    """The token ids of each ``--prompt`` (by the export's tokenizer) or ``--ids`` list."""
    rows: list[list[int]] = []
    if args.prompt is not None:
        for text in args.prompt:
            rows.append(tokenizer.encode(text).ids)
            if not rows[-1]:
                raise HetMoEError(f"--prompt {text!r}: the text encodes to no tokens; give some text")
        return rows
    for text in args.ids:
        try:
            rows.append([int(t) for t in _list(text, "ids")])
        except ValueError as exc:
            raise HetMoEError(f"--ids {text}: expected comma-separated integers") from exc
    return rows


def _sampling(args):
    """``--sample`` and its options as a :class:`~hetmoe_compile.runtime.Sampling` (``None``: greedy)."""
    from ..runtime import Sampling

    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    if not args.sample:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise HetMoEError(f"{flags} only apply with --sample; add --sample or drop them")
        return None
    return Sampling(**given)
