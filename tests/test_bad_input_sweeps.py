"""Bad input, cause 4 of issue 33: a resumable sweep never mixes results. Each unit file is bound to its key, the
settings it ran under and its own content (sha256), and one output directory has one writer at a time."""

import json
import shutil

import pytest
from helpers import DEMO, REPO, one_line

from hetmoe_compile.cli.app import main
from hetmoe_compile.eval.sweep.store import SweepStore

TEXT = REPO / "examples" / "calibration.txt"
ARGS = ["sweep", str(DEMO), "--fractions", "0,1", "--selectors", "random", "--no-ablation", "--routing-tokens", "0"]
ARGS += ["--noise", "pcm", "--noise-scale", "2.5", "--seeds", "2", "--ppl", str(TEXT), "--ppl-tokens", "128"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished sweep directory (5 units)."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _unit(out, label="all-analog"):
    return next((out / "units").glob(f"{label}*-s1.json"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc["metrics"].update(ppl=1.0),  # the example: a perplexity edited by hand
        lambda doc: doc.update(seed=0),  # any other field: the check is of the whole content
        lambda doc: doc.update(worker="someone@elsewhere:1"),
    ],
    ids=["ppl", "seed", "worker"],
)
def test_a_unit_edited_by_hand_is_refused(finished, tmp_path, capsys, edit):
    out = _copy(finished, tmp_path)
    path = _unit(out)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    before = _snapshot(out)
    assert main([*ARGS, "--out", str(out)]) == 2
    one_line(capsys, f"{path}: edited after the sweep wrote it (its sha256 does not match)")
    assert _snapshot(out) == before


def test_a_unit_under_another_name_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shutil.copy(_unit(out, "all-analog"), _unit(out, "dense-digital"))
    assert main([*ARGS, "--out", str(out)]) == 2
    one_line(capsys, "holds another unit's result (renamed or copied)")


def test_units_are_bound_to_their_settings_even_if_the_record_is_edited(finished, tmp_path, capsys):
    """sweep.json edited to say noise x8: the units ran at x2.5 and say so, so a x8 resume refuses them."""
    out = _copy(finished, tmp_path)
    record = json.loads((out / "sweep.json").read_text())
    record["settings"]["noise_scale"] = 8.0
    (out / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    argv = [a if a != "2.5" else "8" for a in ARGS]
    assert main([*argv, "--out", str(out)]) == 2
    one_line(capsys, "measured under other settings than")


def test_one_writer_per_directory(finished, tmp_path, capsys):
    """A second sweep into a directory another sweep holds is refused (the issue's two sweeps with different noise
    at once); once the first is done, the directory resumes as usual. A lock on a new directory that ends without a
    unit leaves nothing behind."""
    out = _copy(finished, tmp_path)
    holder = SweepStore(out, {})
    holder.lock()
    try:
        assert main([*ARGS, "--noise-scale", "8", "--out", str(out)]) == 2
        one_line(capsys, f"--out {out}: another sweep is writing there")
    finally:
        holder.release()
    assert main([*ARGS, "--out", str(out)]) == 0
    assert "sweep: 5 of 5 jobs were finished by an earlier run" in capsys.readouterr().out
    fresh = SweepStore(tmp_path / "new", {})
    fresh.lock()
    fresh.release()
    assert not (tmp_path / "new").exists()
