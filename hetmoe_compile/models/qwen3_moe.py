"""Qwen3-MoE: ``mlp.gate`` router, no shared expert; ``mlp_only_layers`` are dense MLPs."""

from .adapter import FamilyAdapter, register

ADAPTER = register(FamilyAdapter(name="qwen3_moe", model_types=("qwen3_moe",)))
