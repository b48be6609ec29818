"""lm-evaluation-harness as the task engine: local task configs, lm-eval's log-likelihoods against an unbatched
reference computation on the same requests, the registered ``hetmoe`` model and lm-eval's CLI with it."""

import json

import lm_eval
import numpy as np
import pytest
from helpers import DEMO, SHARED, reference_loglikelihood
from lm_eval.tasks import TaskManager

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.eval.harness import HarnessTasks, HetMoELM, harness_metrics
from hetmoe_compile.eval.harness_tasks import LOCAL_TASKS, MARKER, write_local_tasks
from hetmoe_compile.models import load_model, load_tokenizer

QA = SHARED / "data" / "qa"
pytestmark = pytest.mark.skipif(not QA.is_dir(), reason="needs ../shared/data/qa")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval") / "tasks"
    return out, write_local_tasks(QA, out)


@pytest.fixture(scope="module")
def demo():
    return load_model(str(DEMO)), load_tokenizer(str(DEMO))


def test_local_tasks_cover_the_shared_folder_and_mmlu(tasks_dir, tmp_path):
    out, names = tasks_dir
    assert names[: len(LOCAL_TASKS)] == list(LOCAL_TASKS)
    subjects = [n for n in names if n.startswith("mmlu_")]
    assert "mmlu" in names and len(subjects) == 57
    assert json.loads((out / MARKER).read_text())["tasks"] == names
    manager = TaskManager(include_path=str(out))
    assert {"piqa", "mmlu", "mmlu_anatomy", "lambada_openai"} <= set(manager.all_tasks)
    with pytest.raises(HetMoEError, match="holds none of piqa.jsonl"):
        write_local_tasks(tmp_path, tmp_path / "t")
    with pytest.raises(HetMoEError, match="no such folder"):
        write_local_tasks(tmp_path / "absent", tmp_path / "t2")


def test_lm_eval_scores_the_requests_our_scorer_scores(tasks_dir, demo):
    """Every request lm-eval makes (its prompts) gets the log-likelihood and greedy flag of one unbatched forward on
    the same (context, continuation) pair, and lm-eval's accuracy is the share of documents whose best choice is the
    target; MMLU's subject filter keeps only that subject."""
    model, tokenizer = demo
    out, _ = tasks_dir
    res = lm_eval.simple_evaluate(
        model=lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=["piqa", "lambada_openai", "mmlu_anatomy"],
        limit=6,
        log_samples=True,
        task_manager=TaskManager(include_path=str(out)),
    )
    for task, samples in res["samples"].items():
        pairs = [tuple(a) for s in samples for a in s["arguments"]]
        theirs = [r for s in samples for r in s["filtered_resps"]]
        ours = [reference_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
        np.testing.assert_allclose([r[0] for r in theirs], [r[0] for r in ours], rtol=1e-5)  # measured: <= 3e-7
        assert [bool(r[1]) for r in theirs] == [r[1] for r in ours]
        if task != "lambada_openai":
            best = [int(np.argmax([r[0] for r in s["filtered_resps"]])) == s["target"] for s in samples]
            assert res["results"][task]["acc,none"] == pytest.approx(np.mean(best))
    assert {s["doc"]["subject"] for s in res["samples"]["mmlu_anatomy"]} == {"anatomy"}


def test_the_registered_model_is_the_placed_model_under_its_instance(tasks_dir, demo, tmp_path):
    """``HetMoELM`` (lm-eval's ``hetmoe``) gives what :func:`harness_metrics` gives on the model compiled with the
    same placement and simulated with the same seed, and not what the clean model gives."""
    from lm_eval.api.registry import get_model

    from hetmoe_compile.analog.config import analog_config
    from hetmoe_compile.cli.app import main
    from hetmoe_compile.compose import api
    from hetmoe_compile.placement import Placement

    assert get_model("hetmoe") is HetMoELM
    out, _ = tasks_dir
    placement = tmp_path / "p.json"
    assert main(["place", str(DEMO), "--out", str(placement), "--no-graph"]) == 0
    lm = HetMoELM(str(DEMO), placement=str(placement), noise="pcm", seed="2", noise_scale="2.5", batch_size=4)
    manager = TaskManager(include_path=str(out))
    run = lm_eval.simple_evaluate(model=lm, tasks=["piqa"], limit=8, task_manager=manager, log_samples=True)
    assert run["config"]["hetmoe"]["seed"] == 2 and run["config"]["hetmoe"]["noise"]["noise_scale"] == 2.5
    model, tokenizer = demo
    pairs = [tuple(a) for s in run["samples"]["piqa"] for a in s["arguments"]]
    clean = [reference_loglikelihood(model, tokenizer, c, x)[0] for c, x in pairs]
    noisy = [r[0] for s in run["samples"]["piqa"] for r in s["filtered_resps"]]
    assert np.abs(np.subtract(clean, noisy)).max() > 1e-2  # the instance is not the clean model
    compiled = api.compile(model, analog=analog_config("pcm", noise_scale=2.5), placement=Placement.load(placement))
    compiled.simulate(2)
    metrics, record = harness_metrics(model, tokenizer, HarnessTasks(["piqa"], QA), limit=8, batch_size=4)
    compiled.restore()
    assert metrics["piqa/acc"] == run["results"]["piqa"]["acc,none"]
    assert metrics["piqa/acc_norm"] == run["results"]["piqa"]["acc_norm,none"]
    assert metrics["piqa/acc_stderr"] == pytest.approx(run["results"]["piqa"]["acc_stderr,none"])
    assert record["configs"]["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"  # lm-eval's own prompt
    assert record["lm_eval_version"] == lm_eval.__version__
    with pytest.raises(HetMoEError, match="noise_scale='x' is not a number"):
        HetMoELM(str(DEMO), placement=str(placement), noise_scale="x")
    with pytest.raises(HetMoEError, match="noise_scale=nan must be a finite number"):
        HetMoELM(str(DEMO), placement=str(placement), noise_scale="nan")
    with pytest.raises(HetMoEError, match="--tasks mathqa: no local file in .* for it"):
        HarnessTasks(["mathqa"], QA)
    with pytest.raises(HetMoEError, match="--tasks nope: not an lm-eval task or group"):
        HarnessTasks(["nope"])


def test_lm_eval_command_line_runs_the_hetmoe_model(tasks_dir, tmp_path):
    """``hetmoe-lm-eval`` is lm-eval's CLI with ``--model hetmoe`` known and ``--tasks-dir``: it writes lm-eval's
    results file with the placement and instance; a placement for another model is one line, exit 2."""
    import subprocess
    import sys

    from hetmoe_compile.cli.app import main

    placement = tmp_path / "p.json"
    assert main(["place", str(DEMO), "--out", str(placement), "--no-graph"]) == 0
    cmd = [sys.executable, "-m", "hetmoe_compile.eval.harness", "run", "--model", "hetmoe", "--tasks", "piqa"]
    args = f"pretrained={DEMO},placement={placement},noise=pcm,seed=3"
    common = ["--tasks-dir", str(QA), "--limit", "4", "--batch_size", "4"]
    res = subprocess.run(
        [*cmd, "--model_args", args, *common, "--output_path", str(tmp_path / "out")],
        text=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (found,) = list((tmp_path / "out").rglob("results_*.json"))
    doc = json.loads(found.read_text())
    assert doc["config"]["hetmoe"]["seed"] == 3 and doc["config"]["hetmoe"]["placement"] == str(placement)
    assert 0 <= doc["results"]["piqa"]["acc,none"] <= 1 and doc["n-samples"]["piqa"]["effective"] == 4
    other = json.loads(placement.read_text())
    other["model"]["config_sha256"] = "0" * 64
    placement.write_text(json.dumps(other))
    res = subprocess.run([*cmd, "--model_args", args, *common], text=True, capture_output=True, cwd=tmp_path)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "placement was made for another model" in last and "Traceback" not in res.stderr


def test_the_installed_package_advertises_the_model_in_lm_evals_plugin_group():
    """The ``lm_eval.models`` entry point that lm-eval's plugin discovery reads names :class:`HetMoELM`, and
    lm-eval's own registry turns that entry point into the class (what its discovery does with it)."""
    from importlib.metadata import entry_points

    from lm_eval.api.model import LM
    from lm_eval.api.registry import Registry

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "hetmoe"]
    assert ep.value == "hetmoe_compile.eval.harness:HetMoELM"
    registry = Registry("model", base_cls=LM)
    registry.register("hetmoe", target=ep)
    assert registry.get("hetmoe") is HetMoELM


def test_sweep_reports_lm_eval_metrics_and_keeps_standard_errors_out_of_the_table(tmp_path):
    from hetmoe_compile.cli.app import main

    out = tmp_path / "sweep"
    argv = ["sweep", str(DEMO), "--fractions", "0.25", "--selectors", "max-neuron-norm", "--noise", "pcm"]
    argv += ["--seeds", "2", "--tasks", "copa", "--tasks-dir", str(QA), "--limit", "6", "--no-ablation"]
    assert main([*argv, "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    row = next(r for r in doc["rows"] if r["selector"] == "max-neuron-norm")
    assert {"copa/acc", "copa/acc_stderr"} <= set(row["metrics"]) and len(row["metrics"]["copa/acc"]["values"]) == 2
    assert doc["lm_eval"]["configs"]["copa"]["task"] == "copa" and doc["num_fewshot"] is None
    table = (out / "results.md").read_text()
    assert "copa/acc" in table and "stderr" not in table
    assert (out / "copa_acc.png").read_bytes()[:4] == b"\x89PNG" and not list(out.glob("*stderr*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(placement="p.json", noize_scale=1000), "hetmoe model_args: unknown noize_scale"),
        (dict(noise="pcm"), "noise need a placement: add placement=FILE or digital_fraction=F"),
        (dict(seed=3, noise_scale=8), "seed, noise_scale need a placement"),
        (dict(placement="p.json", digital_fraction=0.25), "give placement or digital_fraction, not both"),
        (dict(digital_fraction=0.25, device="tpu"), "device='tpu': unknown device"),
    ],
)
def test_the_adapter_refuses_what_it_would_ignore(no_model_load, kwargs, message):
    """Every argument of ``hetmoe`` acts or is refused: a typo, noise without a placement, two placements, a device
    that is not there; all before the model loads."""
    with pytest.raises(HetMoEError, match=message):
        HetMoELM(str(DEMO), **kwargs)


def test_the_adapter_places_by_fraction_with_any_analog_field_and_low_bit_experts(tasks_dir):
    """``digital_fraction`` places by the selector; analog fields (``w_noise``) and ``digital_bits`` reach the
    compiled model, and lm-eval's record says so."""
    out, _ = tasks_dir
    lm = HetMoELM(
        str(DEMO),
        digital_fraction="0.25",
        noise="pcm",
        seed="1",
        w_noise="0.01",
        digital_bits="8",
        group_size="32",
        device="cpu",
    )
    assert lm.hetmoe is not None and lm.hetmoe.analog.w_noise == 0.01 and lm.hetmoe.quantization["bits"] == 8
    assert lm.hetmoe.placement.policy.digital_fraction == 0.25 and str(lm.model.device) == "cpu"
    run = lm_eval.simple_evaluate(model=lm, tasks=["piqa"], limit=2, task_manager=TaskManager(include_path=str(out)))
    assert run["config"]["hetmoe"]["noise"]["w_noise"] == 0.01 and run["config"]["hetmoe"]["digital_bits"] == 8
