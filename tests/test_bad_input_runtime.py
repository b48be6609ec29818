"""Bad exports and bad run input (issue 14): each is refused with one line naming the problem and the fix, exit
code 2 from the CLI, nothing written. The export is the demo model's (instance seed 5), copied before tampering."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from hetmoe_compile import runtime
from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.runtime.manifest import MANIFEST_SCHEMA_VERSION, file_sha256


@pytest.fixture(scope="module")
def export(demo_export) -> Path:
    """The shared demo export (read-only)."""
    return demo_export[1]


@pytest.fixture
def copy(export, tmp_path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(export, out)
    return out


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _edit(d: Path, change) -> None:
    doc = _manifest(d)
    change(doc)
    (d / "manifest.json").write_text(json.dumps(doc))


def _entry(doc: dict, name: str) -> dict:
    return next(p for p in doc["partitions"] if p["name"] == name)


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _refused(argv: list, capsys, root: Path) -> str:
    """Run the CLI; assert exit 2, one line on stderr, nothing written under ``root``; return the line."""
    before = _snapshot(root)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    assert _snapshot(root) == before
    return err[0]


# 1. partition identity


def _swap_analog(doc: dict) -> None:
    a, b = _entry(doc, "analog_L0"), _entry(doc, "analog_L1")
    for key in ("file", "sha256", "external_data", "instance"):
        a[key], b[key] = b[key], a[key]


def test_partition_files_carry_their_identity(export):
    import onnxruntime as ort

    meta = ort.InferenceSession(str(export / "analog_L2.instance.onnx")).get_modelmeta().custom_metadata_map
    experts = _entry(_manifest(export), "analog_L2")["experts"]
    assert meta["hetmoe.partition"] == "analog_L2" and meta["hetmoe.device"] == "analog"
    assert meta["hetmoe.layer"] == "2" and json.loads(meta["hetmoe.experts"]) == experts
    assert meta["hetmoe.variant"] == "instance" and meta["hetmoe.instance_seed"] == "5"
    assert meta["hetmoe.schema_version"] == MANIFEST_SCHEMA_VERSION
    onnx.checker.check_model(str(export / "analog_L2.instance.onnx"), full_check=True)  # still a valid model
    ideal = {p.key: p.value for p in onnx.load(str(export / "digital_4.onnx")).metadata_props}
    assert ideal["hetmoe.variant"] == "ideal" and ideal["hetmoe.layer"] == "" and "hetmoe.instance_seed" not in ideal


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_swap_analog, "partition 'analog_L0': analog_L1.instance.onnx holds partition analog_L1, layer 1, experts"),
        (
            lambda doc: _entry(doc, "analog_L3")["experts"]["3"].pop(),
            "partition 'analog_L3': analog_L3.instance.onnx holds experts",
        ),
        (
            lambda doc: _entry(doc, "analog_L1")["instance"].update(seed=6),
            "analog_L1.instance.onnx holds instance_seed 5, but the manifest claims instance_seed 6",
        ),
    ],
    ids=["swapped-entries", "edited-experts", "edited-seed"],
)
def test_manifest_entry_that_disagrees_with_its_file(copy, tmp_path, capsys, tamper, message):
    _edit(copy, tamper)
    err = _refused(["run", copy, "--ids", "1,2,3", "--max-new-tokens", "1"], capsys, tmp_path)
    assert message in err and "re-export" in err, err


def _strip(d: Path, name: str, doc_string: bool) -> None:
    """Rewrite ``name`` without its hetmoe metadata (and doc string) as an older export's file, updating its hash."""
    model = onnx.load(str(d / name))
    del model.metadata_props[:]
    if doc_string:
        model.doc_string = ""
    onnx.save(model, str(d / name))

    def rehash(doc):
        for p in doc["partitions"]:
            for src in (p, p.get("instance", {})):
                if src.get("file") == name:
                    src["sha256"] = file_sha256(d / name)

    _edit(d, rehash)


def test_files_of_older_exports_are_identified_by_their_doc_string(copy, tmp_path, capsys):
    """Files written before schema 1.1 have no metadata; their doc string names partition, device and experts."""
    for layer in (0, 1):
        for suffix in ("", ".instance"):
            _strip(copy, f"analog_L{layer}{suffix}.onnx", doc_string=False)
    runtime.load(copy)
    _edit(copy, _swap_analog)
    err = _refused(["run", copy, "--ids", "1,2"], capsys, tmp_path)
    assert "partition 'analog_L0': analog_L1.instance.onnx holds partition analog_L1, experts" in err, err


def test_file_that_does_not_say_what_it_holds(copy, tmp_path, capsys):
    _strip(copy, "digital_4.onnx", doc_string=True)
    err = _refused(["run", copy, "--ids", "1,2"], capsys, tmp_path)
    assert "partition 'digital_4': digital_4.onnx does not say which partition it holds" in err, err
    assert "re-export" in err


# 2. schedule data flow


def _drop_analog_l1(doc: dict) -> None:
    doc["partitions"] = [p for p in doc["partitions"] if p["name"] != "analog_L1"]
    doc["schedule"] = [s for s in doc["schedule"] if s["partition"] != "analog_L1"]


def _swap_steps(doc: dict) -> None:
    doc["schedule"][1], doc["schedule"][2] = doc["schedule"][2], doc["schedule"][1]


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_drop_analog_l1, "schedule step 3 ('digital_2'): input 'expert_group_3' reads tensor 'expert_group_3'"),
        (_swap_steps, "schedule step 1 ('digital_1'): input 'expert_group_1' reads tensor 'expert_group_1'"),
        (
            lambda doc: doc["schedule"].pop(),
            "no schedule step produces the model output 'logits'",
        ),
        (
            lambda doc: doc["schedule"][1]["inputs"].pop("top_k_index"),
            "schedule step 1 ('analog_L0') binds inputs ['hidden_states', 'top_k_weights'], the partition has",
        ),
    ],
    ids=["removed-partition", "swapped-steps", "no-logits", "unbound-input"],
)
def test_broken_schedule_is_named_at_load(copy, tmp_path, capsys, tamper, message):
    _edit(copy, tamper)
    err = _refused(["run", copy, "--ids", "1,2"], capsys, tmp_path)
    assert message in err and "re-export" in err, err


# 3. every listed file is verified, tokenizer files too


def test_tampered_sibling_variant_is_caught(copy, tmp_path, capsys):
    """--analog auto runs the instances; the ideal files beside them are checked too."""
    path = copy / "analog_L2.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    err = _refused(["run", copy, "--ids", "1,2"], capsys, tmp_path)
    assert "partition 'analog_L2': analog_L2.onnx does not match its sha256" in err, err
    (copy / "analog_L2.onnx").unlink()  # a sibling may be absent (deleted to save space), not different
    assert runtime.load(copy).variant == "instance"


def test_tokenizer_files_are_hash_checked(copy, tmp_path, capsys):
    names = {f["file"] for f in _manifest(copy)["tokenizer_files"]}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    (copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    err = _refused(["run", copy, "--prompt", "The king"], capsys, tmp_path)
    assert "tokenizer: tokenizer/tokenizer_config.json does not match its sha256" in err, err
    assert main(["run", str(copy), "--ids", "1,2", "--max-new-tokens", "1"]) == 0  # ids need no tokenizer
    _edit(copy, lambda doc: doc.pop("tokenizer_files"))  # a manifest before schema 1.1: nothing to check
    assert main(["run", str(copy), "--prompt", "The king", "--max-new-tokens", "1"]) == 0


# 4. vocabulary size


def test_edited_vocab_size_is_refused(copy, tmp_path, capsys):
    _edit(copy, lambda doc: doc["model"].update(vocab_size=5000))
    err = _refused(["run", copy, "--ids", "4500"], capsys, tmp_path)
    assert "model.vocab_size is 5000, but the partitions compute logits over 4096 tokens" in err, err


def test_token_ids_are_checked_against_the_logits_without_vocab_size(copy, tmp_path, capsys):
    _edit(copy, lambda doc: doc["model"].pop("vocab_size"))
    err = _refused(["run", copy, "--ids", "1,4096"], capsys, tmp_path)
    assert "token ids must lie in [0, 4096)" in err, err
    with pytest.raises(HetMoEError, match=r"token ids must lie in \[0, 4096\), got -1\.\.3"):
        runtime.load(copy)(np.array([[-1, 3]]))


# 5. corrupt tokenizer.json


def test_corrupt_tokenizer_json(copy, tmp_path, capsys):
    (copy / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    err = _refused(["run", copy, "--prompt", "hi"], capsys, tmp_path)
    assert "tokenizer: tokenizer/tokenizer.json does not match its sha256" in err and "re-export" in err, err
    _edit(copy, lambda doc: doc.pop("tokenizer_files"))  # an older export: the file itself is read and refused
    err = _refused(["run", copy, "--prompt", "hi"], capsys, tmp_path)
    assert "tokenizer.json: not a readable tokenizer file" in err and "re-export" in err, err


# 6. context length


def test_prompt_and_new_tokens_beyond_the_context(copy, tmp_path, capsys):
    assert _manifest(copy)["model"]["context_length"] == 1024  # the demo config's max_position_embeddings
    err = _refused(["run", copy, "--ids", "1,2,3", "--max-new-tokens", "100000"], capsys, tmp_path)
    assert "a prompt of 3 tokens plus max_new_tokens 100000 exceeds the model's context of 1024 tokens" in err, err
    err = _refused(["run", copy, "--ids", ",".join(["7"] * 1025), "--max-new-tokens", "1"], capsys, tmp_path)
    assert "input_ids: 1025 tokens exceed the model's context of 1024 tokens" in err, err
    err = _refused(["run", copy, "--prompt", "The king " * 600, "--max-new-tokens", "1"], capsys, tmp_path)
    assert "exceed the model's context of 1024 tokens" in err, err
    _edit(copy, lambda doc: doc["model"].pop("context_length"))  # a manifest before schema 1.1: no check
    assert runtime.load(copy).context_length is None


# 7. wording


def test_run_on_a_missing_directory(tmp_path, capsys):
    err = _refused(["run", tmp_path / "nope", "--ids", "1"], capsys, tmp_path)
    assert f"{tmp_path / 'nope'} does not exist" in err and "no manifest.json" not in err, err
    (tmp_path / "file.txt").write_text("x")
    err = _refused(["run", tmp_path / "file.txt", "--ids", "1"], capsys, tmp_path)
    assert "file.txt is not a directory" in err, err
