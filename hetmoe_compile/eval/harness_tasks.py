"""lm-evaluation-harness tasks that read local jsonl files (no model hub): lm-eval's own task configs, with only
the data source changed.

Each generated YAML ``include``s lm-eval's config of the task (so prompts, choices, targets and metrics are
lm-eval's) and replaces its dataset with a jsonl file from a folder in Hugging Face field layout (the layout of
``../shared/data/qa/``): ``<folder>/<file>.jsonl`` is the evaluated split. Where the local file's fields differ
from the hub dataset lm-eval reads (BoolQ's ``answer`` instead of ``label``, LAMBADA's ``context``/``target``
instead of ``text``), the override is named in :data:`LOCAL_TASKS`. MMLU reads ``<folder>/mmlu/{dev,validation,
test}.jsonl`` (fields question, subject, choices, answer), one task per subject filtered by ``subject``, dev for
few-shot, as lm-eval's ``mmlu`` does. Pass the generated folder to lm-eval as ``include_path``: its tasks then
take the place of the hub-backed ones of the same name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import HetMoEError
from ..base.io import atomic_replace_dir
from ..base.version import PRODUCER


@dataclass(frozen=True)
class LocalTask:
    """lm-eval task ``name`` from ``<folder>/<file>.jsonl``; ``base``: its config under ``lm_eval/tasks``."""

    base: str
    file: str
    overrides: dict = field(default_factory=dict)


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "piqa"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "arc_easy"),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "arc_challenge"),
    "boolq": LocalTask("super_glue/boolq/default.yaml", "boolq", {"doc_to_target": "{{ 1 if answer else 0 }}"}),
    "copa": LocalTask("super_glue/copa/default.yaml", "copa"),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", "hellaswag"),
    "winogrande": LocalTask("winogrande/default.yaml", "winogrande"),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", "openbookqa"),
    "sciq": LocalTask("sciq/sciq.yaml", "sciq"),
    "lambada_openai": LocalTask(
        "lambada/lambada_openai.yaml", "lambada", {"doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}"}
    ),
}
MMLU_SPLITS = ("test", "validation", "dev")
MARKER = "hetmoe_tasks.json"
"""Written last into a generated task folder: its data folder and task names (a later run may replace it)."""


def lm_eval_tasks_dir() -> Path:
    """lm-eval's own task folder (the configs the local tasks include)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _dataset(split: str, files: dict[str, str]) -> dict:
    """The keys that point a task at local jsonl ``files`` (split -> path), evaluating ``split``."""
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


def _mmlu_subjects() -> dict[str, str]:
    """MMLU subject -> the lm-eval ``mmlu_<subject>`` config's group tag (from lm-eval's own files)."""
    import yaml

    subjects = {}
    for path in sorted((lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml")):
        doc = yaml.safe_load(path.read_text())
        subjects[doc["dataset_name"]] = path.name
    return subjects


def write_local_tasks(data_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write lm-eval task configs for the tasks whose files ``data_dir`` holds into ``out_dir`` (replaced
    atomically); returns the task and group names available (``mmlu`` and its subjects when ``mmlu/`` is there)."""
    data = Path(data_dir).resolve()
    if not data.is_dir():
        raise HetMoEError(f"--tasks-dir {data_dir}: no such folder; give a folder of <task>.jsonl files")
    base = lm_eval_tasks_dir()
    names: list[str] = []
    with atomic_replace_dir(Path(out_dir), MARKER, ("producer", "tasks")) as tmp:
        for name, task in LOCAL_TASKS.items():
            path = data / f"{task.file}.jsonl"
            if not path.is_file():
                continue
            doc = {
                "include": str(base / task.base),
                "task": name,
                **_dataset("validation", {"validation": str(path)}),
                **task.overrides,
            }
            (tmp / f"{name}.yaml").write_text(json.dumps(doc, indent=1) + "\n")  # JSON is YAML
            names.append(name)
        mmlu = data / "mmlu"
        if all((mmlu / f"{s}.jsonl").is_file() for s in MMLU_SPLITS):
            names += _write_mmlu(mmlu, base, tmp)
        if not names:
            raise HetMoEError(
                f"--tasks-dir {data_dir}: holds none of {', '.join(t.file + '.jsonl' for t in LOCAL_TASKS.values())}"
                " or mmlu/{dev,validation,test}.jsonl; give a folder in the layout of ../shared/data/qa"
            )
        (tmp / MARKER).write_text(
            json.dumps({"producer": PRODUCER, "data_dir": str(data), "tasks": names}, indent=1) + "\n"
        )
    return names


def _write_mmlu(mmlu: Path, base: Path, out: Path) -> list[str]:
    """One task per subject (lm-eval's config, filtered to the subject) and the ``mmlu`` group over them."""
    files = {split: str(mmlu / f"{split}.jsonl") for split in MMLU_SPLITS}
    subjects = _mmlu_subjects()
    lines = ['"""Per-subject filters of the local MMLU files (generated by hetmoe-compile)."""', ""]
    for subject in subjects:
        lines += [f"def {subject}(dataset):", f"    return dataset.filter(lambda d: d['subject'] == {subject!r})", ""]
    (out / "hetmoe_mmlu_subjects.py").write_text("\n".join(lines))
    tasks = []
    for subject, config in subjects.items():
        name = f"mmlu_{subject}"
        doc = {
            "include": str(base / "mmlu" / "default" / config),
            "task": name,
            **_dataset("test", files),
            "fewshot_split": "dev",
        }
        text = json.dumps(doc, indent=1)[:-2]  # the filter is a YAML tag, not JSON: append it by hand
        (out / f"{name}.yaml").write_text(f'{text},\n "process_docs": !function hetmoe_mmlu_subjects.{subject}\n}}\n')
        tasks.append(name)
    (out / "mmlu.yaml").write_text(
        json.dumps(
            {"group": "mmlu", "task": tasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
        )
        + "\n"
    )
    return ["mmlu", *tasks]
