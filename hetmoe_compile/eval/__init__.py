"""Model quality: token-level perplexity of a text and zero-shot task accuracy (lm-evaluation-harness style)."""

from .loglikelihood import LogLikelihood, encode_pair, loglikelihoods, score_token_pairs
from .perplexity import PerplexityResult, perplexity, perplexity_of_file, read_text, window_plan
from .task_loaders import TASKS, MCExample, TaskSpec, available_tasks, get_task, load_task
from .tasks import evaluate_examples, evaluate_tasks

__all__ = [
    "TASKS",
    "LogLikelihood",
    "MCExample",
    "PerplexityResult",
    "TaskSpec",
    "available_tasks",
    "encode_pair",
    "evaluate_examples",
    "evaluate_tasks",
    "get_task",
    "load_task",
    "loglikelihoods",
    "perplexity",
    "perplexity_of_file",
    "read_text",
    "score_token_pairs",
    "window_plan",
]
