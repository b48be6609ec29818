"""Stage transforms: module rewrites of a recognised model: fused experts to expert groups (``canonicalize``),
INT8/INT4 digital experts (``lowbit``), HPD projection splits (``hpd``)."""
