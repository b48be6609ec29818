"""Stage ir: the expert-group op (``hetmoe::expert_group``), ``ExpertGroup``, ``HetExperts``, ``ExpertWeights``,
and the routing plans that run it (per-expert loop or grouped GEMM)."""
