"""Every script in examples/ runs, on the bundled demo model, and prints what it promises."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEMO = EXAMPLES / "olmoe-demo"


def _run(*args, cwd=REPO, prelude=""):
    argv = list(map(str, args))
    code = f"{prelude}import runpy, sys; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_quickstart():
    out = _run(EXAMPLES / "quickstart.py", "--model", DEMO, "--tokens", "256", "--seeds", "1")
    assert "top 4 by max-neuron-norm" in out and "digital experts" in out
    names = ("all-digital", "25 % digital (max-neuron-norm)", "all experts analog")
    rows = {n: line for line in out.splitlines() for n in names if line.startswith(n + " ")}
    assert set(rows) == {"all-digital", "25 % digital (max-neuron-norm)", "all experts analog"}
    ppl = {k: float(v.split()[-2]) for k, v in rows.items()}
    assert ppl["all-digital"] < ppl["all experts analog"]


def test_torch_compile_backend():
    out = _run(EXAMPLES / "torch_compile_backend.py", "--noise", "ideal", "--max-new-tokens", "6")
    assert 'hetmoe backend: "The history of the city' in out
    assert out.strip().endswith("11/11 tokens equal to eager")  # ideal hardware: the same tokens as eager


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "onnx"
    text = _run(EXAMPLES / "export_and_run_onnx.py", "--out", out)
    return out, text


def test_export_and_run_onnx(exported):
    out, text = exported
    assert (out / "manifest.json").is_file() and (out / "analog_L0.instance.onnx").is_file()
    error = float(text.split("max relative logit difference ")[1].split()[0])
    assert error < 1e-4
    assert 'instance 0 generates: "The history of the city' in text


def test_toolchain_consumer_needs_no_torch(exported):
    out, _ = exported
    text = _run(EXAMPLES / "toolchain_consumer.py", out, prelude="import sys; sys.modules['torch'] = None; ")
    assert (
        "analog partitions on the accelerator: ['analog_L0', 'analog_L1', 'analog_L2', 'analog_L3'] (4 calls)" in text
    )
    assert float(text.split("max relative difference ")[1]) < 1e-4
