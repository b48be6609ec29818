"""Relative MVM error of the project's tiled op and of aihwkit's tiles on the same weights and preset, over
20 hardware instances (the figure tests/test_analog.py checks to 5 %)."""
from __future__ import annotations

import sys

import numpy as np
import torch


def main() -> int:
    from hetmoe_compile.analog import analog_config, analog_matmul, program_matrix
    from hetmoe_compile.analog.aihwkit_reference import aihwkit_linear
    from hetmoe_compile.report import format_table

    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in ((192, 700), (256, 256), (1024, 2048)):
        w = torch.randn(*shape, generator=gen) * 0.05
        x = torch.randn(48, shape[1], generator=gen)
        ref = x @ w.T
        for preset in ("dac-adc", "pcm"):
            cfg = analog_config(preset)
            seeds = range(20 if shape[1] < 2048 else 5)
            ours = [((analog_matmul(x, program_matrix(w, cfg, s), cfg, torch.Generator().manual_seed(s)) - ref).norm()
                     / ref.norm()).item() for s in seeds]
            with torch.no_grad():
                theirs = [((aihwkit_linear(w, cfg, s)(x) - ref).norm() / ref.norm()).item() for s in seeds]
            rows.append([f"{shape[0]}x{shape[1]}", preset, len(ours), f"{np.mean(ours):.4f} ± {np.std(ours):.4f}",
                         f"{np.mean(theirs):.4f} ± {np.std(theirs):.4f}", f"{np.mean(ours) / np.mean(theirs):.3f}"])
    print(format_table(["weight", "preset", "instances", "hetmoe-compile rel. error", "aihwkit rel. error",
                        "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
