"""GPT-OSS: ``mlp.router`` (with bias, returns a tuple); experts stored transposed, gate/up interleaved, with
biases and a clamped swiglu (``swiglu_alpha``, ``swiglu_limit``)."""

from .adapter import ExpertLayout, FamilyAdapter, register

ADAPTER = register(
    FamilyAdapter(
        name="gpt_oss",
        model_types=("gpt_oss",),
        router_attr="router",
        layout=ExpertLayout(transposed=True, interleaved=True, has_bias=True, activation="gpt_oss_glu"),
    )
)
