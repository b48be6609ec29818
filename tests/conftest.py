"""Suite-wide test settings and shared fixtures."""

import pytest
import torch

from hetmoe_compile.models.recognize import recognize
from hetmoe_compile.models.tiny import tiny_model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test models are tiny: one intra-op thread is as fast, and avoids OpenMP spin-waiting on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def olmoe():
    """A tiny random OLMoE and what the front end recognised in it (shared by a test module)."""
    model = tiny_model("olmoe")
    return model, recognize(model)
