"""GraniteMoE: ``block_sparse_moe.router`` top-k router, fused SwiGLU experts."""

from .adapter import FamilyAdapter, register

ADAPTER = register(
    FamilyAdapter(
        name="granitemoe", model_types=("granitemoe",), block_attrs=("block_sparse_moe",), router_attr="router"
    )
)
