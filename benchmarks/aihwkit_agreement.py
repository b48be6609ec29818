"""Relative MVM error of the project's tiled op and of aihwkit's tiles on the same weights and preset, over
20 hardware instances (the figure tests/test_analog.py checks to 5 %). The bfloat16 rows run the project's op as a
bfloat16 model does (weights, inputs and programmed tiles in bfloat16, noise in float32) against aihwkit in float32
on the same bfloat16-rounded weights and inputs."""

from __future__ import annotations

import sys

import numpy as np
import torch


def main() -> int:
    from hetmoe_compile.analog import ProgrammedMatrix, analog_config, analog_matmul, program_matrix
    from hetmoe_compile.analog.aihwkit_reference import aihwkit_linear
    from hetmoe_compile.tables import format_table

    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in ((192, 700), (256, 256), (1024, 2048)):
        w32 = torch.randn(*shape, generator=gen) * 0.05
        x32 = torch.randn(48, shape[1], generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            w, x = w32.to(dtype), x32.to(dtype)
            ref = x.double() @ w.double().T
            for preset in ("dac-adc", "pcm"):
                cfg = analog_config(preset)
                seeds = range(20 if shape[1] < 2048 else 5)
                ours = []
                for s in seeds:
                    prog = program_matrix(w, cfg, s)
                    prog = ProgrammedMatrix(prog.weight.to(dtype), prog.scale)  # stored in the model's dtype
                    y = analog_matmul(x, prog, cfg, torch.Generator().manual_seed(s)).double()
                    ours.append(((y - ref).norm() / ref.norm()).item())
                with torch.no_grad():
                    theirs = [
                        ((aihwkit_linear(w.float(), cfg, s)(x.float()).double() - ref).norm() / ref.norm()).item()
                        for s in seeds
                    ]
                rows.append(
                    [
                        f"{shape[0]}x{shape[1]}",
                        str(dtype).removeprefix("torch."),
                        preset,
                        len(ours),
                        f"{np.mean(ours):.4f} ± {np.std(ours):.4f}",
                        f"{np.mean(theirs):.4f} ± {np.std(theirs):.4f}",
                        f"{np.mean(ours) / np.mean(theirs):.3f}",
                    ]
                )
    print(
        format_table(
            ["weight", "dtype", "preset", "instances", "hetmoe-compile rel. error", "aihwkit rel. error", "ratio"], rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
