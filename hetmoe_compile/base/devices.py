"""Where an expert or module runs: the two device kinds of a heterogeneous accelerator."""

DEVICES = ("digital", "analog")
