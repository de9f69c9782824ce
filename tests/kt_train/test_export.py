"""Tests for kt_train.export: every format reproduces the torch model and the card describes the files."""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import timm
import torch

from kt_train import export as E
from kt_train.errors import ConfigError, KTError
from kt_train.export import SUPPORTED_FORMATS, ExportError, export_model, load_exported

RESNET = {"timm_name": "resnet10t", "model_kwargs": {}, "num_classes": 5, "input_size": 32}
CALLER_CARD = {
    "classes": ["a", "b", "c", "d", "e"],
    "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875},
    "metrics": {"top1": 0.5},
    "lineage": {"teacher": "clip:ViT-B-32", "transfer_set": Path("/data/transfer"), "git_commit": "abc"},
}


def _make(timm_name: str, num_classes: int, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(timm_name, num_classes=num_classes, **kwargs)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _batch(n: int, size: int, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full export of a resnet10t left in train mode (to check that export keeps the mode)."""
    model = _make("resnet10t", 5).train()
    model.layer1.eval()  # mixed per-module modes must survive too
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("resnet")
    paths = export_model(model, **RESNET, out_dir=out, card=copy.deepcopy(CALLER_CARD))
    return {"model": model, "modes": modes, "state": state, "out": out, "paths": paths}


def test_returns_all_formats_and_card(resnet_export: dict[str, Any]) -> None:
    paths, out = resnet_export["paths"], resnet_export["out"]
    assert set(paths) == {*SUPPORTED_FORMATS, "card"}
    assert paths["safetensors"] == out / "model.safetensors"
    assert paths["onnx"] == out / "model.onnx"
    assert paths["torchscript"] == out / "model.torchscript.pt"
    assert paths["card"] == out / "model_card.json"
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())


def test_model_mode_device_and_weights_unchanged(resnet_export: dict[str, Any]) -> None:
    model = resnet_export["model"]
    assert [m.training for m in model.modules()] == resnet_export["modes"]
    assert model.training and not model.layer1.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, resnet_export["state"][k]), k


def test_safetensors_round_trip_is_exact(resnet_export: dict[str, Any]) -> None:
    m = timm.create_model("resnet10t", num_classes=5)
    m.load_state_dict(safetensors.torch.load_file(resnet_export["paths"]["safetensors"]), strict=True)
    x = _batch(2, 32)
    assert torch.equal(_logits(m, x), _logits(copy.deepcopy(resnet_export["model"]), x))


def test_onnx_matches_torch_with_dynamic_batch(resnet_export: dict[str, Any]) -> None:
    path = resnet_export["paths"]["onnx"]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = copy.deepcopy(resnet_export["model"])
    for n in (2, 3):
        x = _batch(n, 32, seed=n)
        (got,) = session.run(["logits"], {"input": x.numpy()})
        assert got.shape == (n, 5) and got.dtype == np.float32
        np.testing.assert_allclose(got, _logits(ref, x).numpy(), rtol=0, atol=1e-4)


def test_torchscript_matches_torch(resnet_export: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still works
        ts = torch.jit.load(str(resnet_export["paths"]["torchscript"]))
    ref = copy.deepcopy(resnet_export["model"])
    for n in (2, 3):
        x = _batch(n, 32, seed=10 + n)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), _logits(ref, x), rtol=0, atol=1e-6)


def test_card_fields_and_hashes(resnet_export: dict[str, Any]) -> None:
    paths, out = resnet_export["paths"], resnet_export["out"]
    card = json.loads(paths["card"].read_text())
    # caller's fields are kept (a Path in the lineage becomes a string)
    assert card["classes"] == CALLER_CARD["classes"]
    assert card["preprocessing"] == CALLER_CARD["preprocessing"]
    assert card["metrics"] == {"top1": 0.5}
    assert card["lineage"]["transfer_set"] == "/data/transfer"
    assert card["timm_name"] == "resnet10t"
    assert card["model_kwargs"] == {}
    assert card["num_classes"] == 5 and card["input_size"] == 32
    assert card["files"] == {f: paths[f].name for f in SUPPORTED_FORMATS}
    for fmt, name in card["files"].items():
        assert card["sha256"][fmt] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    exp = card["export"]
    assert 0 <= exp["onnx_max_abs_diff"] <= 1e-4
    assert exp["onnx_exporter"] in {"torchscript", "dynamo"}
    assert isinstance(exp["onnx_opset"], int)
    assert exp["torchscript_max_abs_diff"] <= 1e-4
    assert exp["torch_reload_max_abs_diff"] == 0.0
    assert exp["versions"]["torch"] == torch.__version__
    assert exp["versions"]["timm"] == timm.__version__
    assert exp["versions"]["onnxruntime"] == ort.__version__
    assert list(card)[:4] == ["classes", "preprocessing", "metrics", "lineage"]  # not sorted


def test_card_load_snippet_runs(resnet_export: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    card = json.loads(resnet_export["paths"]["card"].read_text())
    assert "\n" not in card["load"]
    monkeypatch.chdir(resnet_export["out"])
    scope: dict[str, Any] = {}
    exec(card["load"], scope)
    x = _batch(2, 32)
    assert torch.equal(_logits(scope["m"], x), _logits(copy.deepcopy(resnet_export["model"]), x))


def test_load_exported(resnet_export: dict[str, Any]) -> None:
    m = load_exported(resnet_export["out"])
    assert not m.training
    x = _batch(3, 32)
    assert torch.equal(_logits(m, x), _logits(copy.deepcopy(resnet_export["model"]), x))


def test_vit_export(tmp_path: Path) -> None:
    model = _make("test_vit", 3, img_size=64).eval()
    paths = export_model(
        model,
        timm_name="test_vit",
        model_kwargs={"img_size": 64},
        num_classes=3,
        input_size=64,
        out_dir=tmp_path / "vit",  # created on demand
    )
    card = json.loads(paths["card"].read_text())
    assert card["model_kwargs"] == {"img_size": 64}
    assert card["export"]["onnx_max_abs_diff"] <= 1e-4
    assert not model.training
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    loaded = load_exported(tmp_path / "vit")
    for n in (2, 3):
        x = _batch(n, 64, seed=n)
        want = _logits(model, x)
        assert torch.equal(_logits(loaded, x), want)
        (got,) = session.run(["logits"], {"input": x.numpy()})
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_model_kwargs_honored(tmp_path: Path) -> None:
    kwargs = {"pad_type": "same"}
    model = _make("mobilenetv3_small_050", 4, **kwargs).eval()
    paths = export_model(
        model,
        timm_name="mobilenetv3_small_050",
        model_kwargs=kwargs,
        num_classes=4,
        input_size=32,
        out_dir=tmp_path,
        formats=["safetensors"],
    )
    assert set(paths) == {"safetensors", "card"}
    card = json.loads(paths["card"].read_text())
    assert card["model_kwargs"] == kwargs
    assert "pad_type='same'" in card["load"]
    loaded = load_exported(tmp_path)
    assert any(type(m).__name__ == "Conv2dSame" for m in loaded.modules())
    x = _batch(2, 32)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


def test_missing_model_kwargs_is_detected(tmp_path: Path) -> None:
    """pad_type does not change the state dict, only the logits: the parity check must catch it."""
    model = _make("mobilenetv3_small_050", 4, pad_type="same").eval()
    with pytest.raises(ExportError, match="model_kwargs"):
        export_model(
            model,
            timm_name="mobilenetv3_small_050",
            model_kwargs={},
            num_classes=4,
            input_size=32,
            out_dir=tmp_path,
            formats=["safetensors"],
        )
    assert list(tmp_path.iterdir()) == []


def test_wrong_num_classes_is_export_error(tmp_path: Path) -> None:
    model = _make("resnet10t", 5)
    with pytest.raises(ExportError, match="num_classes"):
        export_model(model, **{**RESNET, "num_classes": 4}, out_dir=tmp_path, formats=["safetensors"])
    assert list(tmp_path.iterdir()) == []


def test_input_size_the_model_rejects_is_export_error(tmp_path: Path) -> None:
    kwargs = {"img_size": 64, "dynamic_img_size": False}  # a fixed-size ViT asserts on other sizes
    model = _make("test_vit", 3, **kwargs)
    with pytest.raises(ExportError, match="input_size"):
        export_model(
            model, timm_name="test_vit", model_kwargs=kwargs, num_classes=3, input_size=32, out_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


def test_data_parallel_wrapper_is_unwrapped(tmp_path: Path) -> None:
    model = _make("resnet10t", 5)
    wrapped = torch.nn.DataParallel(model)  # its state-dict keys carry a "module." prefix
    paths = export_model(wrapped, **RESNET, out_dir=tmp_path, formats=["safetensors"])
    x = _batch(2, 32)
    assert torch.equal(_logits(load_exported(tmp_path), x), _logits(model, x))
    assert set(paths) == {"safetensors", "card"}


def test_unknown_format_is_config_error(tmp_path: Path) -> None:
    model = _make("resnet10t", 5)
    with pytest.raises(ConfigError, match=r"safetensors.*onnx.*torchscript") as info:
        export_model(model, **RESNET, out_dir=tmp_path / "x", formats=["onnx", "tflite"])
    assert "tflite" in str(info.value)
    assert isinstance(info.value, KTError)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"formats": []}, "no export format"),
        ({"model_kwargs": {"num_classes": 5}}, "num_classes"),
        ({"model_kwargs": {"pretrained": True}}, "pretrained"),
        ({"input_size": 0}, "input_size"),
        ({"atol": 0.0}, "atol"),
        ({"card": {"bad": object()}}, "JSON"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, override: dict[str, Any], match: str) -> None:
    kwargs: dict[str, Any] = {**RESNET, "out_dir": tmp_path / "x", **override}
    with pytest.raises(ConfigError, match=match):
        export_model(torch.nn.Identity(), **kwargs)
    assert not (tmp_path / "x").exists()


def test_single_format_string_is_accepted(tmp_path: Path) -> None:
    paths = export_model(_make("resnet10t", 5), **RESNET, out_dir=tmp_path, formats="torchscript")
    assert set(paths) == {"torchscript", "card"}
    card = json.loads(paths["card"].read_text())
    assert "load" not in card and "onnx_max_abs_diff" not in card["export"]
    with pytest.raises(ExportError, match="safetensors"):
        load_exported(tmp_path)


def test_onnx_mismatch_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that onnxruntime runs but that disagrees with torch must never be published."""
    model = _make("resnet10t", 5).eval()

    def sabotaged(ref: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
        bad = copy.deepcopy(ref)
        with torch.no_grad():
            bad.get_classifier().bias.add_(1.0)
        E._onnx_export_legacy(bad, x, path, opset)

    monkeypatch.setattr(E, "_ONNX_EXPORTERS", (("sabotaged", sabotaged),))
    with pytest.raises(ExportError, match=r"sabotaged exporter.*differs from torch by 1"):
        export_model(model, **RESNET, out_dir=tmp_path, formats=["onnx"])
    assert list(tmp_path.iterdir()) == []


def test_onnx_falls_back_to_next_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("exporter removed")

    monkeypatch.setattr(E, "_ONNX_EXPORTERS", (("broken", broken), ("torchscript", E._onnx_export_legacy)))
    paths = export_model(_make("resnet10t", 5), **RESNET, out_dir=tmp_path, formats=["onnx"])
    card = json.loads(paths["card"].read_text())
    assert card["export"]["onnx_exporter"] == "torchscript"


def test_load_exported_without_card(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"model_card\.json"):
        load_exported(tmp_path)


def test_reexport_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path
    first = export_model(_make("resnet10t", 5, seed=1), **RESNET, out_dir=out, formats=["safetensors"])
    h1 = json.loads(first["card"].read_text())["sha256"]["safetensors"]
    second = export_model(_make("resnet10t", 5, seed=2), **RESNET, out_dir=out, formats=["safetensors"])
    h2 = json.loads(second["card"].read_text())["sha256"]["safetensors"]
    assert h1 != h2
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_card.json"]
