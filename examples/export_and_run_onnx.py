"""Export a placed model to partitioned ONNX with one simulated hardware instance, then run it with the
torch-free runtime and check it against PyTorch.

    python examples/export_and_run_onnx.py [--model DIR] [--out DIR] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import hetmoe_compile as hc
from hetmoe_compile import runtime

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "olmoe-demo"))
    ap.add_argument("--out", default="out/onnx-example")
    ap.add_argument("--prompt", default="The history of the city")
    args = ap.parse_args()

    model, tokenizer = hc.load_model(args.model), hc.load_tokenizer(args.model)
    compiled = hc.compile(model, hc.PlacementPolicy(digital_fraction=0.25), "pcm", source=args.model)
    manifest = compiled.export(args.out, instance_seed=0, tokenizer=tokenizer)
    doc = json.loads(manifest.read_text())
    print(f"wrote {manifest}: " + ", ".join(f"{p['name']} ({p['device']})" for p in doc["partitions"]))

    ids = tokenizer(args.prompt, return_tensors="np").input_ids
    ideal = runtime.load(args.out, analog="ideal")
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    error = np.abs(ideal(ids) - reference).max() / np.abs(reference).max()
    print(f"ideal partitions vs PyTorch: max relative logit difference {error:.1e}")

    instance = runtime.load(args.out)  # the programmed instance (seed 0) of every analog partition
    out = instance.generate(ids, max_new_tokens=12)
    print(f"instance 0 generates: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
