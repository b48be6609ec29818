"""Sweeps that scale out: finished jobs kept as they finish and reused by a rerun (refused under other settings),
local worker processes and Ray actors giving the serial sweep's numbers, and a killed worker's job run again."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal

import pytest
from helpers import DEMO, REPO

import hetmoe_compile as hc
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.eval.sweep.config import SweepConfig, sweep_context
from hetmoe_compile.eval.sweep.jobs import SweepJob, Unit
from hetmoe_compile.eval.sweep.plan import run_sweep_jobs, sweep_plan
from hetmoe_compile.eval.sweep.store import SweepStore
from hetmoe_compile.eval.sweep.workers import MAX_ATTEMPTS, LocalPool, Observer, run_units

TEXT = REPO / "examples" / "calibration.txt"
ARGS = ["sweep", str(DEMO), "--fractions", "0,0.25,1", "--selectors", "max-neuron-norm,random"]
ARGS += ["--noise", "pcm", "--noise-scale", "2.5", "--seeds", "2", "--ppl", str(TEXT), "--ppl-tokens", "256"]
UNITS = 11  # all-digital once; all-analog, dense-digital, 2 selectors and the ablation on 2 instances each


def _metrics(doc: dict) -> dict:
    return {r["label"]: r["metrics"] for r in doc["rows"]}


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The sweep in this process: its results.json and output directory."""
    out = tmp_path_factory.mktemp("serial") / "sweep"
    assert main([*ARGS, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), out


CONFIG = SweepConfig(
    str(DEMO),
    (0, 0.25, 1),
    ("max-neuron-norm", "random"),
    hc.analog_config("pcm", noise_scale=2.5),
    seeds=2,
    ppl_text=str(TEXT),
    ppl_tokens=256,
)
"""``ARGS`` as the Python API's sweep configuration."""


def _parallel(out, pool_for, observer):
    """The sweep of ``CONFIG`` on the pool ``pool_for(factory)`` makes, with the module-level worker factory."""
    cfg, spec = CONFIG.analog_config(), CONFIG.spec()
    jobs = sweep_plan(list(CONFIG.fractions), list(CONFIG.selectors), cfg)
    store = SweepStore(out, CONFIG.settings())
    return run_sweep_jobs(
        jobs, cfg, spec, store, pool=pool_for(functools.partial(sweep_context, CONFIG)), observer=observer
    )


def _kill_first_analog(killed: list, kill):
    """An observer callback that kills the worker of the first analog job it sees, once."""

    def hook(index, info, unit):
        if not killed and unit.job.label == "all-analog":
            killed.append((info["name"], unit.key))
            kill(index, info)

    return hook


def _check_nothing_lost_or_twice(outcome, out, serial_doc, killed):
    assert killed, "no worker was killed"
    assert _metrics({"rows": [r.__dict__ for r in outcome.rows]}) == _metrics(serial_doc)
    assert outcome.ran == UNITS and len(list((out / "units").glob("*.json"))) == UNITS
    instances = [(r.label, i["seed"]) for r in outcome.rows for i in r.instances]
    assert len(instances) == len(set(instances)) == UNITS
    name, key = killed[0]
    redone = json.loads((out / "units" / f"{key}.json").read_text())
    assert redone["worker"] != name  # the killed worker's job ran again on another worker


def test_two_local_workers_one_killed_mid_job_give_the_serial_numbers(tmp_path, serial, capsys):
    killed: list = []
    pools: list = []

    def pool_for(factory):
        pools.append(LocalPool(factory, 2, threads=1))
        return pools[0]

    hook = _kill_first_analog(killed, lambda i, info: os.kill(info["pid"], signal.SIGKILL))
    outcome = _parallel(tmp_path / "par", pool_for, Observer(started=hook))
    _check_nothing_lost_or_twice(outcome, tmp_path / "par", serial[0], killed)
    assert all(i["worker"].startswith(("local0@", "local1@")) for r in outcome.rows for i in r.instances)
    err = capsys.readouterr().err
    assert f"worker {killed[0][0]} was killed by signal 9; 'all-analog' (instance" in err and "runs again" in err


def test_ray_actors_one_killed_mid_job_give_the_serial_numbers(tmp_path, serial):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'hetmoe-compile[ray]')")
    from hetmoe_compile.eval.sweep.ray_actors import RayPool

    killed: list = []
    hook = _kill_first_analog(killed, lambda i, info: os.kill(info["pid"], signal.SIGKILL))
    outcome = _parallel(tmp_path / "ray", lambda f: RayPool(f, 2, None, threads=1), Observer(assigned=hook))
    _check_nothing_lost_or_twice(outcome, tmp_path / "ray", serial[0], killed)
    assert all(i["worker"].startswith("ray") for r in outcome.rows for i in r.instances)


def test_a_rerun_resumes_and_refuses_other_settings(tmp_path, serial, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(serial[1], out)
    for path in (out / "units").glob("random*"):  # as if killed before the random rows finished
        path.unlink()
    assert main([*ARGS, "--out", str(out)]) == 0
    assert "sweep: 9 of 11 jobs were finished by an earlier run" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert _metrics(doc) == _metrics(serial[0])
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert main([*ARGS, "--noise-scale", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"hetmoe-compile sweep: error: --out {out} holds a sweep made with other settings (--noise-scale: 2.5 "
        "there, 8.0 here); rerun with its settings to resume it, or choose a new --out"
    )
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    # more instances: the first two of each row are the finished ones, only the third runs
    assert main([*ARGS, "--seeds", "3", "--out", str(out)]) == 0
    assert "sweep: 11 of 16 jobs were finished by an earlier run" in capsys.readouterr().out
    three = _metrics(json.loads((out / "results.json").read_text()))
    for label, metrics in _metrics(serial[0]).items():
        assert three[label]["ppl"]["values"][:2] == metrics["ppl"]["values"]
    assert len(three["all-analog"]["ppl"]["values"]) == 3 and len(three["all-digital"]["ppl"]["values"]) == 1


def test_a_sweep_directory_that_cannot_be_checked_is_refused(tmp_path, serial, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(serial[1], out)
    record = (out / "sweep.json").read_bytes()
    (out / "sweep.json").unlink()
    assert main([*ARGS, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hetmoe-compile sweep: error: --out {out}: units/ holds results but sweep.json is missing, so they cannot "
        f"be checked; choose a new --out, or delete {out / 'units'} to start over"
    )
    (out / "sweep.json").write_bytes(record)
    bad = next((out / "units").glob("all-analog*"))
    bad.write_text('{"label": "all-analog"}\n')
    assert main([*ARGS, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hetmoe-compile sweep: error: {bad}: not a sweep unit result; delete it to measure that unit again"
    )


class _FakePool:
    """Workers without processes: ``die_on`` units kill whoever runs them; ``fail_on`` ones raise a HetMoEError."""

    def __init__(self, size, die_on=(), fail_on=()):
        self.size, self.die_on, self.fail_on = size, set(die_on), set(fail_on)
        self.queue: list = []
        self.started, self.runs = [], []

    def open(self):
        pass

    def start(self, i):
        self.started.append(i)
        self.queue.append(("ready", i, {"name": f"fake{i}", "pid": 0, "identity": {"model": {"config_sha256": "m"}}}))

    def submit(self, i, unit):
        self.runs.append((i, unit.key))
        if unit.key in self.die_on:
            self.queue.append(("died", i, "was killed by signal 9"))
        elif unit.key in self.fail_on:
            self.queue.append(("failed", i, unit.key, "metric ppl is not finite under pcm"))
        else:
            result = {"label": unit.job.label, "seed": unit.seed, "metrics": {}, "skipped": False}
            self.queue.append(("done", i, unit.key, result))

    def events(self, timeout):
        out, self.queue = self.queue, []
        return out

    def close(self):
        pass


JOBS = [SweepJob("a", "-", 0.0, "digital"), SweepJob("b", "-", 0.0, "digital")]
UNITS_AB = [Unit(j, s) for j in JOBS for s in range(3)]


def test_the_scheduler_keeps_a_worker_on_its_job():
    pool = _FakePool(2)
    results, ran = run_units(UNITS_AB, None, {}, pool=pool)
    assert sorted(results) == sorted(u.key for u in UNITS_AB) and ran.count == 6
    by_worker: dict = {}
    for i, key in pool.runs:
        by_worker.setdefault(i, []).append(key.split("-")[0])
    assert sorted(by_worker.values()) == [["a", "a", "a"], ["b", "b", "b"]]  # each worker compiled one placement


def test_a_job_that_keeps_killing_its_worker_fails_the_sweep_in_one_line():
    poison = UNITS_AB[1].key
    pool = _FakePool(2, die_on=[poison])
    with pytest.raises(HetMoEError) as err:
        run_units(UNITS_AB, None, {}, pool=pool)
    assert str(err.value).startswith(f"sweep: 'a' (instance 1) lost its worker {MAX_ATTEMPTS} times (last: worker ")
    assert sum(key == poison for _, key in pool.runs) == MAX_ATTEMPTS
    assert len(pool.started) == 2 + MAX_ATTEMPTS - 1  # each dead worker was replaced, until the last death


def test_a_job_error_in_a_worker_is_the_sweep_error():
    with pytest.raises(HetMoEError, match="^metric ppl is not finite under pcm$"):
        run_units(UNITS_AB, None, {}, pool=_FakePool(2, fail_on=[UNITS_AB[4].key]))


def test_a_ray_address_where_nothing_answers_is_refused_at_once(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'hetmoe-compile[ray]')")
    assert main([*ARGS, "--ray", "127.0.0.1:1", "--out", str(tmp_path / "s")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "hetmoe-compile sweep: error: --ray 127.0.0.1:1: nothing answers there (Connection refused); start the "
            "cluster with 'ray start --head' and give its address, or leave ADDRESS out for a local Ray instance"
        )
    )
    assert not (tmp_path / "s").exists()


def test_workers_and_device_map_are_refused_together(tmp_path, capsys):
    assert main([*ARGS, "--workers", "2", "--device-map", "auto", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip() == (
        "hetmoe-compile sweep: error: --device-map shards one model over the devices, and workers or ray load one "
        "model per worker: use --device-map alone, or one device per worker"
    )
    assert not (tmp_path / "s").exists()


def test_the_python_sweep_is_the_cli_sweep(tmp_path, serial):
    """``hc.sweep(SweepConfig(...), out)`` binds the same settings as the CLI's flags: it resumes the CLI's
    directory with every unit finished, and its results are the CLI's."""
    out = tmp_path / "sweep"
    shutil.copytree(serial[1], out)
    result = hc.sweep(CONFIG, out)
    assert (result.ran, result.resumed) == (0, UNITS)
    doc = json.loads((out / "results.json").read_text())
    assert result.to_dict() == doc and _metrics(doc) == _metrics(serial[0])
    assert {k: v for k, v in doc.items() if k != "workers"} == {k: v for k, v in serial[0].items() if k != "workers"}
    assert [p.name for p in result.files][:2] == ["results.json", "results.md"]


def test_a_sweep_config_is_one_picklable_checked_value():
    import pickle

    assert pickle.loads(pickle.dumps(CONFIG)) == CONFIG
    assert CONFIG.fractions == (0.0, 0.25, 1.0) and CONFIG.settings() == pickle.loads(pickle.dumps(CONFIG)).settings()
    for kwargs, message in [
        (dict(selectors="max-neuron-norm"), "selectors must be a list, got the string"),
        (dict(fractions=(0.5, 2)), "fractions: 2 is not a fraction in"),
        (dict(scope="everywhere"), "scope='everywhere' must be one of"),
        (dict(routing_tokens=-1), "routing_tokens=-1 must be an integer >= 0"),
        (dict(load=hc.LoadOptions(device="tpu")), "unknown device"),
    ]:
        with pytest.raises(HetMoEError, match=message):
            SweepConfig(str(DEMO), **kwargs)
    with pytest.raises(HetMoEError, match="workers=0 must be an integer >= 1"):
        hc.sweep(CONFIG, workers=0)
