"""DeepSeek-V3: sigmoid router with ``e_score_correction_bias`` and group-limited top-k, ``shared_experts``,
and dense MLPs in the first ``first_k_dense_replace`` layers."""

from .adapter import FamilyAdapter, register

ADAPTER = register(FamilyAdapter(name="deepseek_v3", model_types=("deepseek_v3",), shared_attrs=("shared_experts",)))
