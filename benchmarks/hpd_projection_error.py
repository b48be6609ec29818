"""Why HPD loses on the reference model: relative output error of single projections on real activations, with
the whole W on simulated tiles against HPD's split (U·Σ on tiles, Vᵀ digital) and two re-balanced variants.

Inputs are the projections' activations on 512 tokens of WikiText-2; error = ||y - y_ideal|| / ||y_ideal||, mean
over 2 hardware instances, PCM at two noise scales. A row of U·Σ carries most of its magnitude in the columns of
the largest singular values, and per-row scaling maps the rest onto small conductances, where programming noise is
relatively large.

    python benchmarks/hpd_projection_error.py [--model DIR] [--text FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from hetmoe_compile.analog import AnalogLinear, analog_config
from hetmoe_compile.base.tables import format_table
from hetmoe_compile.models import load_model, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
KEY = 7  # the noise-stream key: the same devices for every variant


def _linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.float().contiguous()
    return layer


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "olmoe-ref"))
    ap.add_argument("--text", default=str(SHARED / "data" / "wikitext2-raw-test.txt"))
    args = ap.parse_args()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    ids = tok(Path(args.text).read_text()[:8000], return_tensors="pt").input_ids[:, :512]
    names = ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.3.self_attn.o_proj"]
    inputs = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0][0].detach()))
        for n in names
    ]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    rows = []
    for scale in (2.5, 8.0):
        cfg = analog_config("pcm", noise_scale=scale)
        for name in names:
            w = model.get_submodule(name).weight.double()
            x = inputs[name].double()
            ref = x @ w.T
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            half = s.numel() // 2
            variants = {  # (digital matrix or None, analog matrix)
                "W on tiles": (None, w),
                "HPD: U·Σ tiles, Vᵀ digital": (vh, u * s),
                "HPD rank/2": (vh[:half], u[:, :half] * s[:half]),
                "U tiles, Σ·Vᵀ digital": (s[:, None] * vh, u),
                "U·Σ^½ tiles, Σ^½·Vᵀ digital": (s.sqrt()[:, None] * vh, u * s.sqrt()),
            }
            cells = []
            for digital, analog in variants.values():
                h = x.float() if digital is None else (x @ digital.T).float()
                errs = [
                    float((AnalogLinear(_linear(analog), cfg, seed, KEY)(h).double() - ref).norm() / ref.norm())
                    for seed in range(2)
                ]
                cells.append(f"{sum(errs) / len(errs):.3f}")
            rows.append([f"x{scale:g}", name, f"{float(s[0] / s[-1]):.0f}", *cells])
    print(format_table(["pcm", "projection", "cond(W)", *variants], rows))


if __name__ == "__main__":
    main()
