"""Mixtral: ``mlp.gate`` router over 8 SwiGLU experts, top-2."""

from .adapter import FamilyAdapter, register

ADAPTER = register(FamilyAdapter(name="mixtral", model_types=("mixtral",)))
