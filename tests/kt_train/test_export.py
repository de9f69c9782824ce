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
from kt_train.export import (
    SUPPORTED_FORMATS,
    ExportError,
    ParityError,
    export_model,
    load_exported,
    measure_parity,
    parity_failure,
)

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
    assert card["failed_formats"] == {}
    for fmt, name in card["files"].items():
        assert card["sha256"][fmt] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    exp = card["export"]
    assert 0 <= exp["onnx_max_abs_diff"] <= 1e-4
    assert exp["onnx_exporter"] in {"torchscript", "dynamo"}
    assert isinstance(exp["onnx_opset"], int)
    assert exp["torchscript_max_abs_diff"] <= 1e-4
    assert exp["torch_reload_max_abs_diff"] == 0.0
    assert exp["tolerance"] == {"logit_rtol": 1e-3, "prob_atol": 1e-3}
    assert exp["verify_batches"] == [4, 3]
    for fmt in ("onnx", "torchscript"):
        p = exp["parity"][fmt]
        assert p["inputs"] == 7 and p["argmax_agree"] == 7 and p["argmax_near_ties"] == 0
        assert 0 <= p["max_prob_diff"] <= 1e-3 and 0 <= p["rel_logit_diff"] <= 1e-3
        assert p["logit_scale"] >= 1.0
    assert exp["parity"]["onnx"]["max_abs_logit_diff"] == exp["onnx_max_abs_diff"]
    assert exp["parity"]["onnx"]["exporter"] == exp["onnx_exporter"]
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
        ({"logit_rtol": 0.0}, "logit_rtol"),
        ({"prob_atol": -1.0}, "prob_atol"),
        ({"mean": [0.5, 0.5]}, "mean/std"),
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
    with pytest.raises(
        ParityError, match=r"sabotaged exporter: onnxruntime differs from torch: .*max logit diff 1"
    ):
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


# --------------------------------------------------------------------------------------------------
# parity as deployment judges it, and formats that fail it
# --------------------------------------------------------------------------------------------------


def _trained_like(timm_name: str = "resnet10t", num_classes: int = 5) -> torch.nn.Module:
    """A random-init model whose logits have a trained model's magnitude (~10, not ~0.01)."""
    model = _make(timm_name, num_classes).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(300.0)
    return model


def _perturb_onnx(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Make onnxruntime's logits ``change(logits)`` (the file itself is a good export)."""
    real = E._run_onnx

    def run(path: Path, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], int | None]:
        got, opset = real(path, xs)
        return [change(g) for g in got], opset

    monkeypatch.setattr(E, "_run_onnx", run)


def test_verify_inputs_are_normalized_images() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    xs = E._verify_inputs(16, mean, std)
    assert [x.shape for x in xs] == [(4, 3, 16, 16), (3, 3, 16, 16)]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for x in xs:
        img = x * s + m  # back to pixels
        assert img.min() >= -1e-6 and img.max() <= 1 + 1e-6
        assert img.std() > 0.1  # not a flat image
    assert all(torch.equal(a, b) for a, b in zip(xs, E._verify_inputs(16, mean, std), strict=True))


def test_small_real_numerical_difference_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: ~1e-3 on logits of magnitude ~10 changes no prediction; it must pass (an
    absolute 1e-4 tolerance refused it), and the card records the measured numbers."""
    model = _trained_like()
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    _perturb_onnx(monkeypatch, lambda g: g + 1e-3 * sign)
    paths = export_model(model, **RESNET, out_dir=tmp_path, formats=["safetensors", "onnx"])
    assert set(paths) == {"safetensors", "onnx", "card"}
    card = json.loads(paths["card"].read_text())
    assert card["failed_formats"] == {}
    p = card["export"]["parity"]["onnx"]
    assert p["logit_scale"] > 5  # trained-like logits
    assert 1e-4 < p["max_abs_logit_diff"] < 1.1e-3  # what the old atol=1e-4 refused
    assert p["rel_logit_diff"] == pytest.approx(p["max_abs_logit_diff"] / p["logit_scale"])
    assert p["rel_logit_diff"] < 1e-3 and p["max_prob_diff"] < 1e-3
    assert p["argmax_agree"] == p["inputs"] == 7


def test_small_difference_on_random_init_logits_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random-init student (logits ~0.01): 1e-3 added to one logit leaves every argmax alone."""
    model = _make("mobilenetv3_small_050", 4).eval()
    kwargs = {**RESNET, "timm_name": "mobilenetv3_small_050", "num_classes": 4, "input_size": 64}
    bump = torch.tensor([0.0, 9e-4, 0.0, 0.0])
    _perturb_onnx(monkeypatch, lambda g: g + bump)
    paths = export_model(model, **kwargs, out_dir=tmp_path, formats=["onnx"])
    p = json.loads(paths["card"].read_text())["export"]["parity"]["onnx"]
    assert p["logit_scale"] == 1.0 and p["max_abs_logit_diff"] == pytest.approx(9e-4, rel=1e-3)
    assert p["argmax_agree"] + p["argmax_near_ties"] == p["inputs"]


def _flip_first_argmax(g: torch.Tensor) -> torch.Tensor:
    """Give the first input's second-best class a clear lead."""
    g = g.clone()
    second = g[0].argsort(descending=True)[1]
    g[0, second] = g[0].max() + 5.0
    return g


def test_flipped_argmax_is_refused_in_strict_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _perturb_onnx(monkeypatch, _flip_first_argmax)
    with pytest.raises(ParityError, match=r"argmax disagrees on 2/7 inputs; max prob diff") as info:
        export_model(_trained_like(), **RESNET, out_dir=tmp_path, formats=["onnx"])
    assert info.value.parity["argmax_agree"] == 5  # the first input of each of the 2 batches
    assert list(tmp_path.iterdir()) == []


def test_failed_format_keeps_the_others_and_reports_by_how_much(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")  # must not pass for this model's
    _perturb_onnx(monkeypatch, _flip_first_argmax)
    model = _trained_like()
    paths = export_model(model, **RESNET, out_dir=tmp_path, strict=False)
    assert set(paths) == {"safetensors", "torchscript", "card"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    card = json.loads(paths["card"].read_text())
    assert set(card["files"]) == {"safetensors", "torchscript"}
    assert set(card["failed_formats"]) == {"onnx"}
    reason = card["failed_formats"]["onnx"]
    assert "argmax disagrees on 2/7 inputs" in reason and "max prob diff" in reason
    p = card["export"]["parity"]["onnx"]
    assert p["argmax_agree"] == 5 and p["max_prob_diff"] > 0.4
    assert "onnx_max_abs_diff" not in card["export"] and "fallback_format" not in card["export"]
    x = _batch(2, 32)
    assert torch.equal(_logits(load_exported(tmp_path), x), _logits(model, x))


def test_large_logit_diff_is_refused_even_with_argmax_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _perturb_onnx(monkeypatch, lambda g: g * 1.05)  # same argmax, 5% off
    paths = export_model(
        _trained_like(), **RESNET, out_dir=tmp_path, formats=["onnx", "safetensors"], strict=False
    )
    card = json.loads(paths["card"].read_text())
    assert "max logit diff" in card["failed_formats"]["onnx"]
    assert "argmax" not in card["failed_formats"]["onnx"]
    assert card["export"]["parity"]["onnx"]["argmax_agree"] == 7
    assert set(paths) == {"safetensors", "card"}


def test_every_format_failing_still_writes_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _perturb_onnx(monkeypatch, lambda g: g + torch.arange(g.shape[1]))
    model = _trained_like()
    paths = export_model(model, **RESNET, out_dir=tmp_path, formats=["onnx"], strict=False)
    assert set(paths) == {"safetensors", "card"}
    card = json.loads(paths["card"].read_text())
    assert card["export"]["fallback_format"] == "safetensors"
    assert set(card["failed_formats"]) == {"onnx"} and "load" in card
    x = _batch(2, 32)
    assert torch.equal(_logits(load_exported(tmp_path), x), _logits(model, x))


def test_exporter_crash_is_a_failed_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(E, "_ONNX_EXPORTERS", (("broken", broken),))
    paths = export_model(
        _make("resnet10t", 5), **RESNET, out_dir=tmp_path, formats=["safetensors", "onnx"], strict=False
    )
    card = json.loads(paths["card"].read_text())
    assert "unsupported operator" in card["failed_formats"]["onnx"]
    assert "onnx" not in card["export"]["parity"]  # nothing was measured


def test_full_disk_is_never_a_failed_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(E, "_ONNX_EXPORTERS", (("full", full),))
    with pytest.raises(OSError, match="No space left"):
        export_model(_make("resnet10t", 5), **RESNET, out_dir=tmp_path, formats=["onnx"], strict=False)
    assert not (tmp_path / "model_card.json").exists()


def test_parity_near_tie_and_nan() -> None:
    want = torch.tensor([[5.0, 5.0004, -3.0], [1.0, 0.0, 0.0]])
    swapped = torch.tensor([[5.0004, 5.0, -3.0], [1.0, 0.0, 0.0]])  # a near-tie flips: rounding
    p = measure_parity([swapped], [want])
    assert (p["argmax_agree"], p["argmax_near_ties"]) == (1, 1)
    assert parity_failure(p) is None
    nan = torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0]])
    p = measure_parity([nan], [want])
    assert p["max_abs_logit_diff"] == float("inf") and p["argmax_near_ties"] == 0
    assert parity_failure(p) is not None
    assert E._json_safe(p)["max_abs_logit_diff"] == "inf"
    with pytest.raises(ExportError, match="shape"):
        measure_parity([want[:, :2]], [want])
