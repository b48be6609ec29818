"""A minimal accelerator-toolchain integration: read an export's manifest, program the analog experts onto a
(here: simulated in numpy) accelerator, and let ONNX Runtime run the digital partitions. Needs no torch.

    python examples/toolchain_consumer.py EXPORT_DIR [--ids 1,2,3]

The accelerator receives each analog partition's routed tokens through the manifest's interface
``(hidden_states, top_k_index, top_k_weights) -> partial_output`` and computes its experts from the ideal weights
stored in the partition (``L<layer>.E<expert>.gate_up`` / ``.down``, ``[out, in]``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hetmoe_compile import runtime


class NumpyAccelerator:
    """Stands in for an AIMC accelerator: holds every analog expert's matrices and runs routed tokens."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        self.calls = 0
        for part in manifest["partitions"]:
            if part["device"] != "analog":
                continue
            model = onnx.load(str(directory / part["file"]))  # "programming": read the ideal weights
            self.weights[part["name"]] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def __call__(self, partition: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        w, act = self.weights[partition["name"]], partition["activation"]
        hidden, index, weight = feeds["hidden_states"], feeds["top_k_index"], feeds["top_k_weights"]
        out = np.zeros_like(hidden)
        for layer, experts in partition["experts"].items():
            for e in experts:
                tok, slot = np.nonzero(index == e)
                if tok.size == 0:
                    continue
                p = f"L{layer}.E{e}."
                h = hidden[tok] @ w[p + "gate_up"].T + w.get(p + "gate_up_bias", 0)
                gate, up = np.split(h, 2, axis=-1)
                if act["kind"] == "glu":
                    h = gate / (1 + np.exp(-gate)) * up  # silu(gate) * up
                else:  # gpt_oss_glu
                    gate, up = np.minimum(gate, act["limit"]), np.clip(up, -act["limit"], act["limit"])
                    h = (up + 1) * gate / (1 + np.exp(-gate * act["alpha"]))
                y = h @ w[p + "down"].T + w.get(p + "down_bias", 0)
                np.add.at(out, tok, y * weight[tok, slot][:, None])
        return {"partial_output": out.astype(hidden.dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--ids", default="1,2,3,4,5,6,7,8", help="comma-separated token ids")
    args = ap.parse_args()

    manifest = runtime.read_manifest(args.export_dir)
    if any(p["activation"]["act_name"] != "silu" for p in manifest["partitions"] if "activation" in p):
        raise SystemExit("this example accelerator implements silu experts only")
    accelerator = NumpyAccelerator(args.export_dir, manifest)
    runner = runtime.load(args.export_dir, analog="ideal", executors={"analog": accelerator})
    reference = runtime.load(args.export_dir, analog="ideal")
    ids = np.array([[int(t) for t in args.ids.split(",")]])
    logits = runner(ids)
    print(f"analog partitions on the accelerator: {sorted(accelerator.weights)} ({accelerator.calls} calls)")
    print(
        f"digital partitions on ONNX Runtime: {[p['name'] for p in manifest['partitions'] if p['device'] == 'digital']}"
    )
    error = np.abs(logits - reference(ids)).max() / np.abs(logits).max()
    print(f"logits vs all-ONNX-Runtime: max relative difference {error:.1e}")


if __name__ == "__main__":
    main()
