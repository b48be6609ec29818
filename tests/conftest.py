"""Suite-wide test settings and shared fixtures (plain helpers live in helpers.py)."""

import os

import pytest
import torch
from filelock import FileLock
from helpers import DEMO, reference_model

from hetmoe_compile.models.recognize import recognize
from hetmoe_compile.models.tiny import tiny_model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and avoids OpenMP spin-waiting on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_model_load(monkeypatch):
    """Options are checked before the model loads: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("hetmoe_compile.models.load_model", refuse)
    monkeypatch.setattr("hetmoe_compile.models.loader.load_model", refuse)


@pytest.fixture(scope="module")
def olmoe():
    """A tiny random OLMoE and what the front end recognised in it (shared by a test module)."""
    model = tiny_model("olmoe")
    return model, recognize(model)


@pytest.fixture(scope="module")
def ref_model():
    """The shared reference OLMoE (skipped when ../shared is absent)."""
    return reference_model()


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """``(placement.json, export dir)``: the demo model placed at 25 % and exported by the CLI with hardware instance
    5, once for the whole run (one copy shared by pytest-xdist's workers). Read-only: copy it to change it."""
    from hetmoe_compile.cli.app import main

    base = tmp_path_factory.getbasetemp()
    # under pytest-xdist the parent of a worker's temp dir is this run's, shared by its workers; without it, the
    # run's own temp dir (its parent holds earlier runs)
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo-export"
    placement, out = root / "placement.json", root / "export"
    with FileLock(str(root) + ".lock"):
        if not (out / "manifest.json").is_file():
            root.mkdir(exist_ok=True)
            assert main(["place", str(DEMO), "--out", str(placement), "--no-graph"]) == 0
            assert (
                main(["export", str(DEMO), "--placement", str(placement), "--instance-seed", "5", "--out", str(out)])
                == 0
            )
    return placement, out


SLOW_FIRST = ("test_readme.py", "test_export.py", "test_lowbit.py", "test_examples.py", "test_backend.py")
"""The longest test files (each stays on one pytest-xdist worker) start first, so none is left running alone at
the end of a parallel run."""


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
