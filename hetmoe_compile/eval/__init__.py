"""Model quality under simulated hardware: token-level perplexity of a text (strided windows), and tasks through
lm-evaluation-harness (:mod:`.harness`, imported on use: it loads lm-eval)."""

from .perplexity import PerplexityResult, perplexity, perplexity_of_file, read_text, window_plan

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_file", "read_text", "window_plan"]
