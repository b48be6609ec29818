"""Model shapes shared by the benchmark scripts (random weights, built from configs)."""

from __future__ import annotations


def olmoe_1b_7b_config(layers: int = 16, **changes):
    """An OLMoE-1B-7B-shaped config: hidden 2048, 64 experts of width 1024, top-8, vocabulary 50304."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_experts=64,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        **changes,
    )
