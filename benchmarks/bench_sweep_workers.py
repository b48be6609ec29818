"""Wall time of one sweep run serially, on local worker processes (``--workers N``) and on a local Ray instance
(``--ray --workers N``), side by side: each mode in a fresh process and a fresh output directory, the modes taking
turns in every round so that drift on a noisy machine hits them alike. Every run's rows must equal the serial
run's, number for number. Prints a table (median, min and max wall time, and the median of the per-round ratios
to serial) and writes it with the raw times as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def sweep_argv(model: str, ppl: str, tokens: int, seeds: int) -> list[str]:
    return [
        sys.executable, "-m", "hetmoe_compile", "sweep", model, "--fractions", "0,0.125,0.25,1",
        "--selectors", "max-neuron-norm,random", "--noise", "pcm", "--noise-scale", "2.5", "--seeds", str(seeds),
        "--ppl", ppl, "--ppl-tokens", str(tokens),
    ]  # fmt: skip


def run(argv: list[str], out: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    return wall, json.loads((out / "results.json").read_text())


def main() -> int:
    from hetmoe_compile.base.tables import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    p.add_argument("--ppl", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="rounds (each runs every mode once)")
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray row")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "sweep_workers.json"))
    args = p.parse_args()

    base = sweep_argv(args.model, args.ppl, args.ppl_tokens, args.seeds)
    modes = {"serial (this process)": [], f"--workers {args.workers}": ["--workers", str(args.workers)]}
    if not args.no_ray:
        try:
            import ray  # noqa: F401

            modes[f"--ray --workers {args.workers} (local Ray)"] = ["--ray", "--workers", str(args.workers)]
        except ImportError:
            print("Ray is not installed: no Ray row", file=sys.stderr)
    times: dict[str, list[float]] = {m: [] for m in modes}
    startup: dict[str, list[float]] = {m: [] for m in modes}
    busy: dict[str, list[float]] = {m: [] for m in modes}  # the jobs' own seconds, summed over workers
    reference = None
    units = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        for r in range(args.repeat):
            for mode, extra in modes.items():
                out = tmp / f"{r}-{len(times[mode])}-{mode.split()[0].strip('-')}"
                wall, doc = run([*base, *extra], out)
                times[mode].append(wall)
                startup[mode] += [w["ready_s"] for w in doc["workers"].get("started", [])]
                busy[mode].append(sum(i["seconds"] for row in doc["rows"] for i in row["instances"]))
                rows = {row["label"]: row["metrics"] for row in doc["rows"]}
                if reference is None:
                    reference, units = rows, sum(len(row["instances"]) for row in doc["rows"])
                elif rows != reference:
                    raise SystemExit(f"{mode}: the rows differ from the first run's")
                print(f"round {r + 1}/{args.repeat}: {mode}: {wall:.1f} s", file=sys.stderr)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"args": vars(args), "jobs": units, "wall_s": times, "worker_ready_s": startup, "job_s": busy}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    serial = times["serial (this process)"]
    table = []
    for mode, t in times.items():
        ratios = [s / x for s, x in zip(serial, t)]
        ready = f"{statistics.median(startup[mode]):.1f}" if startup[mode] else "-"
        cells = [mode, f"{statistics.median(t):.1f}", f"{min(t):.1f}", f"{max(t):.1f}"]
        table.append([*cells, f"{statistics.median(ratios):.2f}x", ready, f"{statistics.median(busy[mode]):.1f}"])
    print(
        f"\n{Path(args.model).name}: {units} jobs ((placement, instance) pairs), {args.ppl_tokens} tokens of "
        f"{Path(args.ppl).name}, {args.repeat} rounds; every run's rows equal the first's"
    )
    head = ["mode", "median wall s", "min", "max", "speed-up vs serial (median of rounds)", "worker start-up s"]
    print(format_table([*head, "job s, summed over workers"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
