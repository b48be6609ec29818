"""Low-bit (INT8/INT4, group-wise, weight-only) digital experts."""

from .digital_experts import QUANT_ATTR, ExpertQuantError, quantize_digital_experts
from .groupwise import BITS, GroupwiseQuant, check_quant_args, error_bound, quantize_groupwise

__all__ = [
    "BITS",
    "QUANT_ATTR",
    "ExpertQuantError",
    "GroupwiseQuant",
    "check_quant_args",
    "error_bound",
    "quantize_digital_experts",
    "quantize_groupwise",
]
