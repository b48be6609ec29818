"""OLMoE: ``mlp.gate`` softmax router, fused SwiGLU experts, no shared expert."""

from .adapter import FamilyAdapter, register

ADAPTER = register(FamilyAdapter(name="olmoe", model_types=("olmoe",)))
