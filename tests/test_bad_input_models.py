"""Bad model input is one line on stderr naming the tensor or file and the fix, exit code 2, nothing written: a
checkpoint missing a tensor or holding one of the wrong shape, a truncated safetensors file, a corrupt tokenizer
file, a hub id without network. Legitimately absent tensors (tied weights) load; unused ones are one warning line;
the ONNX exporter's known notices are silenced and nothing else."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import time
import warnings

import pytest
from helpers import DEMO
from safetensors.torch import load_file, save_file

from hetmoe_compile.base.errors import HetMoEError
from hetmoe_compile.cli.app import main
from hetmoe_compile.models import load_meta_model, load_model, load_tokenizer, loader
from hetmoe_compile.models.tiny import tiny_config, tiny_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_3 = "model.layers.0.mlp.experts.3.up_proj.weight"


@pytest.fixture
def checkpoint(tmp_path):
    """A saved tiny OLMoE directory."""
    directory = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(directory)
    return directory


@pytest.fixture
def hf_log():
    """What transformers logs at WARNING or above (its handler writes to the stderr of import time, which capsys
    does not see): its loading report must not be among it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    yield records
    logging.getLogger("transformers").removeHandler(handler)


def _edit(directory, change) -> None:
    """Rewrite ``model.safetensors`` with ``change(tensors)`` applied."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _place(capsys, directory, out, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["place", str(directory), "--out", str(out), "--no-graph", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("load", ["auto", "full"])  # auto scores from the files (meta model); full loads the model
def test_missing_tensor_is_refused_not_initialised(checkpoint, tmp_path, capsys, hf_log, load):
    _edit(checkpoint, lambda t: t.pop(Q_PROJ))
    out = tmp_path / "p.json"
    code, err = _place(capsys, checkpoint, out, "--load", load)
    assert code == 2 and len(err) == 1 and not out.exists() and not hf_log
    assert Q_PROJ in err[0] and "missing from the checkpoint" in err[0] and "re-download" in err[0]


def test_missing_expert_tensor_is_named_by_its_checkpoint_key(checkpoint, tmp_path, capsys, hf_log):
    _edit(checkpoint, lambda t: t.pop(UP_3))  # transformers fails to merge the experts without saying which
    for load in ("auto", "full"):
        code, err = _place(capsys, checkpoint, tmp_path / "p.json", "--load", load)
        assert code == 2 and len(err) == 1 and UP_3 in err[0] and "missing" in err[0] and not hf_log
    with pytest.raises(HetMoEError, match="missing from the checkpoint"):
        load_meta_model(str(checkpoint))[1].expert("model.layers.0.mlp.experts.gate_up_proj", 0)


def test_many_missing_tensors_are_counted(checkpoint):
    _edit(checkpoint, lambda t: [t.pop(k) for k in [k for k in t if "self_attn" in k]])
    with pytest.raises(HetMoEError, match=r"12 of the model's tensors are missing .*, \.\.\. \(12 in all\)"):
        load_model(str(checkpoint))


def test_eval_refuses_a_missing_tensor(checkpoint, tmp_path, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, checkpoint / name)
    _edit(checkpoint, lambda t: t.pop(Q_PROJ))
    text = tmp_path / "ppl.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "e.json"
    capsys.readouterr()
    code = main(["eval", str(checkpoint), "--digital-fraction", "0.5", "--noise", "ideal", "--ppl", str(text)]
                + ["--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and Q_PROJ in err[0] and not out.exists()


def test_tied_weights_are_not_missing(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    config = tiny_config("olmoe")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        model = load_model(str(tmp_path))
        load_meta_model(str(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not caplog.records


def test_wrong_shape_names_the_file_tensor_and_shapes(checkpoint, tmp_path, capsys, hf_log):
    _edit(checkpoint, lambda t: t.update({Q_PROJ: t[Q_PROJ][:16].clone()}))
    for load in ("auto", "full"):
        code, err = _place(capsys, checkpoint, tmp_path / "p.json", "--load", load)
        assert code == 2 and len(err) == 1 and not (tmp_path / "p.json").exists() and not hf_log
        assert f"model.safetensors: tensor {Q_PROJ} has shape (16, 32), the model's config says (32, 32)" in err[0]


def test_one_expert_of_the_wrong_shape_is_named(checkpoint, tmp_path, capsys):
    _edit(checkpoint, lambda t: t.update({UP_3: t[UP_3][:8].clone()}))
    for load in ("auto", "full"):
        code, err = _place(capsys, checkpoint, tmp_path / "p.json", "--load", load)
        assert code == 2 and len(err) == 1
        assert f"tensor {UP_3} has shape (8, 32), the other experts' have (16, 32)" in err[0]


def test_truncated_file_is_named_when_loading(checkpoint, tmp_path, capsys):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = _place(capsys, checkpoint, tmp_path / "p.json", "--load", "full")
    assert code == 2 and len(err) == 1 and not (tmp_path / "p.json").exists()
    assert f"{path}: truncated safetensors file (tensor" in err[0] and "re-download" in err[0]


def test_corrupt_header_is_named(checkpoint):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:9] = b"["  # the header's JSON no longer parses
    path.write_bytes(bytes(data))
    with pytest.raises(HetMoEError, match="model.safetensors: corrupt safetensors header"):
        load_model(str(checkpoint))


def test_unused_tensors_are_one_warning_line(checkpoint, tmp_path, capsys, caplog, hf_log):
    _edit(checkpoint, lambda t: t.update({"model.layers.0.extra.weight": t["model.norm.weight"].clone()}))
    for load in ("auto", "full"):
        out = tmp_path / f"{load}.json"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hetmoe_compile"):
            code, err = _place(capsys, checkpoint, out, "--load", load)
        assert code == 0 and out.is_file() and not err and not hf_log  # no load report of transformers
        assert [r.getMessage() for r in caplog.records if r.name.startswith("hetmoe_compile")] == [
            f"{checkpoint}: ignoring 1 checkpoint tensor the model does not use (model.layers.0.extra.weight)"
        ]


# ------------------------------------------------------------------------------------- tokenizer files


def test_corrupt_tokenizer_json_is_named(checkpoint, tmp_path, capsys):
    shutil.copy(DEMO / "tokenizer_config.json", checkpoint)
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text. " * 50)
    out = tmp_path / "p.json"
    code, err = _place(capsys, checkpoint, out, "--calib", str(calib))
    assert code == 2 and len(err) == 1 and not out.exists()
    assert f"{checkpoint / 'tokenizer.json'}: not valid JSON" in err[0] and "re-download" in err[0]


def test_tokenizer_json_the_library_cannot_read_is_named(checkpoint):
    shutil.copy(DEMO / "tokenizer_config.json", checkpoint)
    (checkpoint / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(HetMoEError, match="tokenizer.json: not a tokenizer the tokenizers library reads"):
        load_tokenizer(str(checkpoint))


def test_no_tokenizer_is_an_error_not_an_empty_one(checkpoint):
    with pytest.raises(HetMoEError, match="no tokenizer found beside the model"):
        load_tokenizer(str(checkpoint))


# -------------------------------------------------------------------------------- hub ids without network


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty HF cache and a hub endpoint that refuses connections (nothing leaves this machine)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loader, "_PROBES", {})
    return constants


def test_hub_id_without_network_fails_at_once_in_one_line(no_hub, tmp_path, capsys):
    out = tmp_path / "p.json"
    start = time.perf_counter()
    code, err = _place(capsys, "someone/some-moe", out)
    took = time.perf_counter() - start
    assert code == 2 and len(err) == 1 and not out.exists() and took < 3.0  # was 55 s of retries, 23 lines
    assert "someone/some-moe: the Hugging Face hub (http://127.0.0.1:9) cannot be reached" in err[0]
    assert "not in the local cache" in err[0] and "local model directory" in err[0]


def test_hub_that_does_not_answer_is_given_up_after_the_probe_timeout(no_hub, monkeypatch):
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    monkeypatch.setattr(no_hub, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(loader, "HUB_PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(HetMoEError, match="cannot be reached"):
        load_model("someone/some-moe")
    silent.close()
    assert time.perf_counter() - start < 2.5


def test_cached_hub_id_loads_without_network(no_hub, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--cached-moe" / "snapshots" / ("0" * 40)
    tiny_model("olmoe").save_pretrained(snapshot)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, snapshot / name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    start = time.perf_counter()
    model = load_model("someone/cached-moe")
    tokenizer = load_tokenizer("someone/cached-moe")
    assert time.perf_counter() - start < 5.0  # no retries
    assert model.config.num_experts == 8 and tokenizer("hello").input_ids


def test_hf_hub_offline_without_the_model_cached_is_one_line(no_hub, monkeypatch):
    monkeypatch.setattr(no_hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(HetMoEError, match="not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"):
        load_model("someone/some-moe")


# ------------------------------------------------------------------------------------ export console noise


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the notice is about its absence")
def test_exporter_notices_are_silenced_and_nothing_else(caplog):
    from torch.onnx._internal.exporter import _registration
    from torch.utils._pytree import LeafSpec

    from hetmoe_compile.export.onnx_capture import _quiet_exporter

    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _quiet_exporter():
            assert _registration._get_overload("torchvision::nms") is None  # logs "torchvision is not installed"
            LeafSpec()  # torch's FutureWarning
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
            logging.getLogger(_registration.__name__).warning("another exporter warning")
        _registration._get_overload("torchvision::roi_align")  # outside: shown again
    assert [str(w.message) for w in seen] == ["another FutureWarning"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another exporter warning", "torchvision is not installed. Skipping torchvision::roi_align"]
