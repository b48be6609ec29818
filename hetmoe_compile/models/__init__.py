"""Front end: load a Hugging Face MoE model and recognise its structure. One adapter file per family."""

from . import deepseek_v3, gpt_oss, granitemoe, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registers)
from .adapter import ExpertLayout, FamilyAdapter, register, registered
from .loader import load_meta_model, load_model, load_tokenizer
from .recognize import DENSE_KINDS, ROUTED_EXPERTS, ModelInfo, MoELayer, recognize, supported_architectures

__all__ = [
    "DENSE_KINDS",
    "ROUTED_EXPERTS",
    "ExpertLayout",
    "FamilyAdapter",
    "MoELayer",
    "ModelInfo",
    "load_meta_model",
    "load_model",
    "load_tokenizer",
    "recognize",
    "register",
    "registered",
    "supported_architectures",
]
