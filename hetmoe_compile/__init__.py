"""hetmoe-compile: deploy Mixture-of-Experts LLMs on heterogeneous analog-digital accelerators."""
__version__ = "0.1.0"
