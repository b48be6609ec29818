"""Zero-shot task data (Hugging Face jsonl layouts) turned into lm-evaluation-harness style requests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import HetMoEError

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class MCExample:
    """One example: a ``(context, continuation)`` request per choice and the gold choice.

    Continuations start with the target delimiter ``" "``; contexts are all equal except for partial evaluation
    (winogrande). Greedy tasks (lambada) have a single choice, the target.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))

    def choice_length(self, i: int) -> int:
        """Characters of choice ``i`` without the delimiter (lm-eval's ``acc_norm`` divisor), at least 1."""
        return max(1, len(self.continuations[i].removeprefix(TARGET_DELIMITER)))


@dataclass(frozen=True)
class TaskSpec:
    """A task: its file ``<name>.jsonl``, how a record becomes an :class:`MCExample`, and how it is scored."""

    name: str
    convert: Callable[[dict], MCExample]
    kind: str = "multiple_choice"  # or "greedy": the target must be the greedy continuation

    @property
    def filename(self) -> str:
        return f"{self.name}.jsonl"

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc",) if self.kind == "greedy" else ("acc", "acc_norm")


def _choices(context: str, choices: list[str], label: int) -> MCExample:
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} out of range for {len(choices)} choices")
    return MCExample((context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices), label)


def _piqa(doc: dict) -> MCExample:
    return _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc(doc: dict) -> MCExample:
    choices = doc["choices"]
    return _choices(f"Question: {doc['question']}\nAnswer:", choices["text"], choices["label"].index(doc["answerKey"]))


def _boolq(doc: dict) -> MCExample:
    return _choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(bool(doc["answer"])))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> MCExample:
    context = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return _choices(context, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict) -> MCExample:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    label = {"1": 0, "2": 1}[str(doc["answer"])]
    rest = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    return MCExample(tuple(sentence[:blank] + o for o in options), (rest, rest), label)


def _openbookqa(doc: dict) -> MCExample:
    choices = doc["choices"]
    return _choices(doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip()))


def _sciq(doc: dict) -> MCExample:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


def _copa(doc: dict) -> MCExample:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    lower_first = [c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return _choices(f"{doc['premise'].strip()[:-1]} {connector}", lower_first, int(doc["label"]))


def _lambada(doc: dict) -> MCExample:
    return MCExample((doc["context"],), (TARGET_DELIMITER + doc["target"],), 0)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", _piqa),
        TaskSpec("arc_easy", _arc),
        TaskSpec("arc_challenge", _arc),
        TaskSpec("boolq", _boolq),
        TaskSpec("hellaswag", _hellaswag),
        TaskSpec("winogrande", _winogrande),
        TaskSpec("openbookqa", _openbookqa),
        TaskSpec("sciq", _sciq),
        TaskSpec("copa", _copa),
        TaskSpec("lambada", _lambada, kind="greedy"),
    )
}


def _check_dir(tasks_dir: str | Path) -> Path:
    path = Path(tasks_dir)
    if not path.is_dir():
        raise HetMoEError(f"{path}: tasks folder not found; pass --tasks-dir with the folder of task .jsonl files")
    return path


def available_tasks(tasks_dir: str | Path) -> list[str]:
    """Known tasks whose ``<name>.jsonl`` is in ``tasks_dir``, in the order of :data:`TASKS`."""
    path = _check_dir(tasks_dir)
    return [name for name, spec in TASKS.items() if (path / spec.filename).is_file()]


def get_task(name: str, tasks_dir: str | Path | None = None) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; an unknown name lists the available tasks (in ``tasks_dir`` if given)."""
    if name not in TASKS:
        known = available_tasks(tasks_dir) if tasks_dir is not None and Path(tasks_dir).is_dir() else list(TASKS)
        raise HetMoEError(f"unknown task '{name}'; available: {', '.join(known) or 'none'}")
    return TASKS[name]


def load_task(name: str, tasks_dir: str | Path, limit: int | None = None) -> list[MCExample]:
    """The first ``limit`` examples (all if ``None``) of task ``name`` from ``tasks_dir/<name>.jsonl``."""
    spec = get_task(name, tasks_dir)
    path = _check_dir(tasks_dir) / spec.filename
    if limit is not None and limit < 1:
        raise HetMoEError(f"limit {limit} is out of range; give a positive number of examples per task")
    if not path.is_file():
        present = ", ".join(available_tasks(path.parent)) or "none"
        raise HetMoEError(f"{path}: task file not found; tasks available in {path.parent}: {present}")
    examples: list[MCExample] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                examples.append(spec.convert(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise HetMoEError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); give one JSON object per line"
                ) from exc
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
                raise HetMoEError(
                    f"{path}:{number}: record does not fit the {name} layout ({type(exc).__name__}: {exc}); "
                    "use the Hugging Face field layout"
                ) from exc
    if not examples:
        raise HetMoEError(f"{path}: task file has no examples; give a jsonl file with one record per line")
    return examples
