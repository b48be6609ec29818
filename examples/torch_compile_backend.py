"""The ``hetmoe`` torch.compile backend: place experts and simulate AIMC inside the compiled graph, then generate.

    python examples/torch_compile_backend.py [--model DIR] [--prompt TEXT] [--noise PRESET] [--max-new-tokens N]

The model is compiled as loaded: Dynamo hands the backend the graph, in which the backend finds each layer's
experts, places them (options below) and rewrites the analog ones into simulated AIMC ops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import hetmoe_compile as hc

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "olmoe-demo"))
    ap.add_argument("--prompt", default="The history of the city")
    ap.add_argument("--noise", default="pcm", help="analog preset: pcm, dac-adc, gaussian or ideal")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()

    model, tokenizer = hc.load_model(args.model), hc.load_tokenizer(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)

    options = {"digital_fraction": 0.25, "selector": "max-neuron-norm", "noise": args.noise, "seed": 0}
    model.forward = torch.compile(model.forward, backend="hetmoe", options=options)
    with torch.no_grad():
        compiled = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)

    print(f"options: {options}")
    print(f"eager PyTorch : {tokenizer.decode(eager[0], skip_special_tokens=True)!r}")
    print(f"hetmoe backend: {tokenizer.decode(compiled[0], skip_special_tokens=True)!r}")
    same = int((eager[0] == compiled[0]).sum()) if eager.shape == compiled.shape else 0
    print(f"{same}/{eager.shape[1]} tokens equal to eager")


if __name__ == "__main__":
    main()
