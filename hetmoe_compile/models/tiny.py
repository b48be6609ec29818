"""Tiny random models of every supported family, built from configs (no download): for tests and examples."""

from __future__ import annotations

import torch
from torch import nn

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=3,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=24, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8),
    ),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            intermediate_size=24,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            n_group=2,
            topk_group=1,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            num_key_value_heads=4,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
}


def tiny_config(family: str):
    """A small config of ``family`` (one of :data:`TINY_CONFIGS`)."""
    import transformers

    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for '{family}'; known: {', '.join(sorted(TINY_CONFIGS))}")
    cls_name, extra = TINY_CONFIGS[family]
    return getattr(transformers, cls_name)(**{**_COMMON, **extra})


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised tiny causal LM of ``family``, in eval mode.

    Weights are re-drawn with a per-expert scale spread so that experts differ in norm, as trained ones do, and
    router biases (DeepSeek's correction bias, GPT-OSS's router bias) are non-zero so that they are exercised.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # fused experts [E, ., .]: per-expert scales in [0.5, 2] x 0.1
                scale = 0.1 * (0.5 + 1.5 * torch.rand(p.shape[0], 1, 1, generator=gen))
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
            elif name.endswith("bias") or "norm" in name:
                p.copy_((0.02 * torch.randn(p.shape, generator=gen) + (1.0 if "norm" in name else 0.0)).to(p.dtype))
            else:
                p.copy_((0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_((0.05 * torch.randn(b.shape, generator=gen)).to(b.dtype))
    return model
