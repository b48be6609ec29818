"""Qwen2-MoE: ``mlp.gate`` router, a shared expert with a sigmoid ``shared_expert_gate``; dense MLP layers possible."""

from .adapter import FamilyAdapter, register

ADAPTER = register(
    FamilyAdapter(name="qwen2_moe", model_types=("qwen2_moe",), shared_attrs=("shared_expert", "shared_expert_gate"))
)
