"""Helpers shared by the test modules: the seven tiny families, placed models, relative errors and shared paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hetmoe_compile.compose.pipeline import place_model
from hetmoe_compile.models import load_model, recognize
from hetmoe_compile.models.recognize import ModelInfo
from hetmoe_compile.models.tiny import TINY_CONFIGS, tiny_model
from hetmoe_compile.placement import Placement, PlacementPolicy
from hetmoe_compile.transforms.canonicalize import canonicalize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REF_MODEL = SHARED / "models" / "olmoe-ref"
DEMO = REPO / "examples" / "olmoe-demo"
FAMILIES = sorted(TINY_CONFIGS)


def token_ids(batch: int = 2, seq: int = 9, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Seeded random token ids ``[batch, seq]``."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded_mask(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """An attention mask with the first ``pad`` positions of the last row masked (left padding)."""
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return mask


def placed(
    family: str = "olmoe",
    fraction: float = 0.25,
    *,
    dtype: torch.dtype = torch.float32,
    dense: str = "digital",
    canonical: bool = True,
    model: torch.nn.Module | None = None,
) -> tuple[torch.nn.Module, ModelInfo, Placement]:
    """A tiny model of ``family`` (or ``model``) placed by max-neuron-norm at ``fraction``, canonicalised unless
    ``canonical=False``; returns the model, what the front end recognised in it, and the placement."""
    model = model if model is not None else tiny_model(family, dtype=dtype)
    info = recognize(model)
    placement = place_model(model, PlacementPolicy(fraction, dense=dense), info=info)
    if canonical:
        canonicalize(model, placement.devices(), info)
        info = recognize(model)
    return model, info, placement


def logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's logits on ``ids`` without gradients or a KV cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def _np(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def max_rel_err(got, ref) -> float:
    """Largest absolute difference over the largest reference magnitude (tensors or arrays)."""
    got, ref = _np(got), _np(ref)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def norm_rel_err(got, ref) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius): aihwkit's relative MVM error."""
    got, ref = _np(got), _np(ref)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def reference_model() -> torch.nn.Module:
    """The shared 17.9 M-parameter OLMoE, or a skip naming the missing folder."""
    if not (REF_MODEL / "config.json").is_file():
        pytest.skip(f"reference model folder {REF_MODEL} is absent (needs the shared/ checkout beside the repo)")
    return load_model(str(REF_MODEL))


def reference_loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """``(log p(continuation | context), whether greedy decoding gives it)`` by one unbatched forward, the request
    split into tokens as lm-eval's HFLM documents it: trailing whitespace of the context moves to the
    continuation, the pair is tokenised whole and split after the context's own tokens."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped) :] + continuation, stripped
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor(ctx + cont)
    with torch.no_grad():
        logprobs = model(input_ids=ids[None, :-1], use_cache=False).logits[0].double().log_softmax(-1)
    picked = logprobs[len(ctx) - 1 :]
    target = torch.tensor(cont)
    return picked.gather(-1, target[:, None]).sum().item(), bool((picked.argmax(-1) == target).all())


def one_line(capsys, *needles: str) -> str:
    """The captured stderr, asserted to be one line, no traceback, holding every needle (the bad-input promise)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
