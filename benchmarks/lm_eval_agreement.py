"""lm-evaluation-harness against the hand-written scorer on the same examples (issue 16, steps 4 and 6).

For each task of ``../shared/data/qa`` the same first ``--limit`` documents are scored twice on the clean reference
model: by lm-eval (0.4.13, its task configs over the local files, ``hetmoe_compile.eval.harness``) and by the
hand-written scorer (``hetmoe_compile.eval.tasks``, its own prompts). Printed per task: each engine's accuracies,
the share of documents where both pick the same choice, the largest difference of a request's log-likelihood where
both send the same (context, continuation), and the wall time of each engine (median of ``--repeat``, engines in
turn), with their ratio (target <= 1.2x).

    python benchmarks/lm_eval_agreement.py [--model DIR] [--limit N] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lm_eval
import numpy as np
import torch
from lm_eval.models.huggingface import HFLM

from hetmoe_compile.eval import get_task, load_task
from hetmoe_compile.eval.harness import HarnessTasks
from hetmoe_compile.eval.loglikelihood import loglikelihoods
from hetmoe_compile.eval.tasks import evaluate_examples
from hetmoe_compile.models import load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
OURS_TO_LM_EVAL = {"lambada": "lambada_openai"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    ap.add_argument("--qa", default=str(SHARED / "data" / "qa"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    names = ["piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande", "openbookqa", "sciq", "copa"]
    names.append("lambada")
    harness = HarnessTasks([OURS_TO_LM_EVAL.get(n, n) for n in names], args.qa)
    rows = []
    for name in names:
        theirs_name = OURS_TO_LM_EVAL.get(name, name)
        examples = load_task(name, args.qa, args.limit)
        kind = get_task(name).kind
        times: dict[str, list[float]] = {"ours": [], "lm-eval": []}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ours = evaluate_examples(model, tokenizer, examples, kind, args.batch_size, desc=name)
            t1 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
                tasks=[theirs_name],
                limit=args.limit,
                task_manager=harness.manager,
                log_samples=True,
                bootstrap_iters=1000,
            )
            t2 = time.perf_counter()
            times["ours"].append(t1 - t0)
            times["lm-eval"].append(t2 - t1)
        assert res is not None
        samples = res["samples"][theirs_name]
        their_metrics = res["results"][theirs_name]
        # per document: the same choice? and the log-likelihoods of requests both engines send
        same_pick, ll_diff, same_requests = [], 0.0, 0
        our_requests = [ex.requests() for ex in examples]
        our_lls = loglikelihoods(model, tokenizer, [r for reqs in our_requests for r in reqs], args.batch_size)
        start = 0
        for reqs, sample in zip(our_requests, samples):
            lls = [r.logprob for r in our_lls[start : start + len(reqs)]]
            start += len(reqs)
            theirs = [r[0] for r in sample["filtered_resps"]]
            if kind == "greedy":
                same_pick.append(bool(sample["filtered_resps"][0][1]) == our_lls[start - 1].is_greedy)
            else:
                same_pick.append(int(np.argmax(lls)) == int(np.argmax(theirs)))
            for (ours_req, our_ll), their_req, their_ll in zip(zip(reqs, lls), sample["arguments"], theirs):
                if tuple(ours_req) == tuple(their_req):
                    same_requests += 1
                    ll_diff = max(ll_diff, abs(our_ll - their_ll) / max(1.0, abs(their_ll)))
        total_requests = sum(len(r) for r in our_requests)
        rows.append(
            (
                name,
                len(examples),
                ours.get("acc"),
                their_metrics.get("acc,none"),
                ours.get("acc_norm"),
                their_metrics.get("acc_norm,none"),
                float(np.mean(same_pick)),
                f"{same_requests}/{total_requests}",
                ll_diff,
                statistics.median(times["ours"]),
                statistics.median(times["lm-eval"]),
            )
        )
    print(
        f"model {args.model}, first {args.limit} documents per task, clean weights, batch {args.batch_size}, "
        f"{args.threads} threads; wall time median of {args.repeat}, engines in turn"
    )
    print(
        "| task | docs | acc ours | acc lm-eval | acc_norm ours | acc_norm lm-eval | same choice | identical "
        "requests | max rel. LL diff | ours (s) | lm-eval (s) | lm-eval / ours |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tot_ours = tot_theirs = 0.0
    for name, n, a1, a2, n1, n2, same, reqs, diff, t_ours, t_theirs in rows:
        tot_ours, tot_theirs = tot_ours + t_ours, tot_theirs + t_theirs
        cells = [_f(a1), _f(a2), _f(n1), _f(n2), f"{same:.3f}", reqs, f"{diff:.1e}", f"{t_ours:.1f}", f"{t_theirs:.1f}"]
        print(f"| {name} | {n} | " + " | ".join(cells) + f" | {t_theirs / t_ours:.2f} |")
    print(f"| all | | | | | | | | | {tot_ours:.1f} | {tot_theirs:.1f} | {tot_theirs / tot_ours:.2f} |")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
