"""The model card's preprocessing is what evaluation does, and ``kt predict`` follows it (issue 13).

One tiny pipeline run (test_vit -> test_efficientnet, a few steps) is shared: its card, checkpoint,
ONNX file and evaluate metrics are what the tests compare.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kt_train import pipeline
from kt_train.config import parse_config
from kt_train.data import load_labeled
from kt_train.errors import ConfigError
from kt_train.evaluate import predict as evaluate_logits
from kt_train.models import create_student, load_checkpoint, preprocessing
from kt_train.predict import CARD_SUFFIX, card_preprocessing, find_card, predict_files, write_predictions
from kt_train.transforms import EvalTransform

from ..conftest import STUDENT, small_config_dict
from ._images import random_image

STAGES = ["finetune_teacher", "distill", "finetune_student", "evaluate", "export"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_data: dict[str, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("predict")
    cfg = parse_config(small_config_dict(demo_data, root, stages=STAGES))
    results = pipeline.run_pipeline(cfg)
    card = json.loads(Path(results["export"]["card"]).read_text())
    metrics = json.loads(Path(results["evaluate"]["metrics"]).read_text())
    return {"root": root, "results": results, "card": card, "metrics": metrics, "test": demo_data["test"]}


@pytest.fixture
def odd_images(tmp_path: Path) -> Path:
    """An ImageFolder of non-square images (both orientations, down- and upscaled, odd margins)."""
    sizes = [(50, 37), (37, 50), (45, 33), (33, 47), (20, 15), (64, 64), (91, 40)]
    for k, (w, h) in enumerate(sizes):
        cls = ("a", "b")[k % 2]
        path = tmp_path / "odd" / cls / f"{k}_{w}x{h}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(w, h, seed=k).save(path)
    return tmp_path / "odd"


def card_pixels(path: str, pre: dict[str, Any]) -> np.ndarray:
    """The card's preprocessing from its fields only, in PIL + numpy (no kt_train, no torchvision)."""
    assert (pre["resize"], pre["crop"], pre["channel_order"], pre["layout"]) == (
        "shorter_side",
        "center",
        "RGB",
        "NCHW",
    )
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s, c = pre["resize_size"], pre["input_size"]
    nw, nh = (s, math.floor(h * s / w)) if w <= h else (math.floor(w * s / h), s)
    if (nw, nh) != (w, h):
        filt = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
        img = img.resize((nw, nh), filt[pre["interpolation"]])
    left, top = round((nw - c) / 2), round((nh - c) / 2)
    arr = np.asarray(img.crop((left, top, left + c, top + c)), dtype=np.float32) / np.float32(255)
    lo, hi = pre["value_range"]
    arr = lo + arr * (hi - lo)
    arr = (arr - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return arr.transpose(2, 0, 1)


def test_the_card_describes_evaluation_not_timms_pretrained_defaults() -> None:
    model = create_student(STUDENT, 3, image_size=32)
    pre = preprocessing(model)
    assert pre["input_size"] == 32 and pre["resize_size"] == 32
    assert (pre["interpolation"], pre["crop_pct"]) == ("bilinear", 1.0)  # whatever timm's config says
    assert pre["mean"] == list(model.data_config.mean) and pre["std"] == list(model.data_config.std)
    tf = EvalTransform.from_preprocessing(json.loads(json.dumps(pre)))
    assert (tf.size, tf.resize_to, tf.crop_pct, tf.interpolation) == (32, 32, 1.0, "bilinear")


def test_the_cards_preprocessing_applied_independently_reproduces_evaluations_logits(
    run: dict[str, Any], odd_images: Path
) -> None:
    pre = run["card"]["preprocessing"]
    student, _ = load_checkpoint(run["results"]["finetune_student"]["checkpoint"])
    assert pre == json.loads(json.dumps(preprocessing(student)))
    ds = load_labeled(odd_images)
    logits, _ = evaluate_logits(student, ds, device=torch.device("cpu"))
    paths = [ds.describe(i) for i in range(len(ds))]
    net = student.net.eval()
    with torch.no_grad():
        ours = net(torch.from_numpy(np.stack([card_pixels(p, pre) for p in paths])))
    np.testing.assert_allclose(ours.numpy(), logits.numpy(), atol=1e-4, rtol=0)

    # the test can tell: timm's pretrained defaults (what the card used to say) give other logits
    timm_way = {**pre, "interpolation": "bicubic", "crop_pct": 0.875, "resize_size": round(32 / 0.875)}
    with torch.no_grad():
        other = net(torch.from_numpy(np.stack([card_pixels(p, timm_way) for p in paths])))
    assert (other - logits).abs().max() > 1e-2


def test_kt_predict_on_the_onnx_export_reproduces_the_evaluate_metric(
    run: dict[str, Any], tmp_path: Path
) -> None:
    from kt_client.cli import app

    onnx = Path(run["results"]["export"]["onnx"])
    out = tmp_path / "pred.jsonl"
    res = CliRunner().invoke(
        app, ["predict", str(onnx), str(run["test"]), "--format", "onnx", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    student = run["metrics"]["student"]
    assert len(rows) == student["n"] == 20
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert abs(correct - student["top1"] * student["n"] / 100) <= 1
    assert run["card"]["metrics"]["test"]["top1"] == student["top1"]
    assert all(len(r["top_k"]) == 4 and r["top_k"][0]["label"] == r["label"] for r in rows)

    # the safetensors file (timm) and a zip of the same images: the same predictions
    zipped = shutil.make_archive(str(tmp_path / "test"), "zip", run["test"])
    res = CliRunner().invoke(
        app,
        ["predict", str(onnx.with_name("model.safetensors")), zipped, "--json", "--top-k", "2"],
    )
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert [r["path"].split(":")[-1] for r in again] == [
        Path(r["path"]).relative_to(run["test"]).as_posix() for r in rows
    ]
    assert sum(a["label"] != r["label"] for a, r in zip(again, rows, strict=True)) <= 1
    assert all(len(a["top_k"]) == 2 for a in again)

    res = CliRunner().invoke(app, ["predict", str(onnx), str(run["test"]), "--top-k", "2"])  # a table
    assert res.exit_code == 0, res.output
    assert "kt predict" in res.stdout and {r["label"] for r in rows} <= set(res.stdout.split())


def test_predict_files_csv_and_card_lookup(run: dict[str, Any], odd_images: Path, tmp_path: Path) -> None:
    export = Path(run["results"]["export"]["onnx"]).parent
    alone = tmp_path / "dl" / "model-7.onnx"  # a download: no card beside it
    alone.parent.mkdir()
    shutil.copy(export / "model.onnx", alone)
    with pytest.raises(ConfigError, match="no model card beside"):
        predict_files(alone, None, [odd_images])
    # a model that is not there is named as missing (it had said "no model card beside model.onnx")
    from kt_client.cli import app

    res = CliRunner().invoke(app, ["predict", str(tmp_path / "nomodel.onnx"), str(odd_images)])
    text = " ".join(res.output.split())  # the console wraps it
    assert res.exit_code == 2 and "nomodel.onnx does not exist" in text, res.output
    assert "kt models download" in text and "model card" not in text
    shown = tmp_path / "show.json"  # `kt models show ID --json`
    shown.write_text(json.dumps({"id": "7", "card": run["card"], "formats": ["onnx"]}))
    assert find_card(alone, shown) == run["card"]
    preds = predict_files(alone, shown, [odd_images / "a", str(next((odd_images / "b").iterdir()))], top_k=1)
    assert len(preds) == 5 and all(p.label in run["card"]["classes"] and 0 < p.prob <= 1 for p in preds)
    csv_path = write_predictions(preds, tmp_path / "p.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == '"path","label","prob","top_k"' and len(lines) == 6

    # `kt models download` puts the card beside the file; a card written before this fix (timm's
    # pretrained bicubic / crop_pct 0.875, never applied by evaluation) is read as evaluation did
    pre = run["card"]["preprocessing"]
    old = {**run["card"], "preprocessing": {"input_size": 32, "mean": pre["mean"], "std": pre["std"],
                                             "interpolation": "bicubic", "crop_pct": 0.875}}  # fmt: skip
    alone.with_name("model-7" + CARD_SUFFIX).write_text(json.dumps(old))
    assert card_preprocessing(find_card(alone))["interpolation"] == "bilinear"
    again = predict_files(alone, None, [odd_images / "a", str(next((odd_images / "b").iterdir()))], top_k=1)
    assert again == preds


def test_the_card_carries_size_parameters_and_cpu_latency(run: dict[str, Any]) -> None:
    card = run["card"]
    export = Path(run["results"]["export"]["card"]).parent
    student, _ = load_checkpoint(run["results"]["finetune_student"]["checkpoint"])
    assert card["num_params"] == sum(p.numel() for p in student.net.parameters())
    assert card["file_bytes"] == {f: (export / name).stat().st_size for f, name in card["files"].items()}
    lat = card["cpu_latency"]
    assert lat["median_ms"] > 0 and (lat["batch_size"], lat["threads"]) == (1, 1) and lat["runs"] >= 3


def test_client_models_predict_downloads_the_file_and_predicts_with_its_card(
    run: dict[str, Any], tmp_path: Path
) -> None:
    import httpx

    from kt_client import Client

    onnx = Path(run["results"]["export"]["onnx"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/7":
            return httpx.Response(200, json={"id": "7", "card": run["card"], "formats": ["onnx"]})
        assert request.url.path == "/v1/models/7/download" and request.url.params["format"] == "onnx"
        return httpx.Response(200, content=onnx.read_bytes())

    with Client("http://kt.test", "k", transport=httpx.MockTransport(handler)) as kt:
        rows = kt.models.predict("7", run["test"], top_k=1)
        path = kt.models.download("7", "onnx", tmp_path, card=True)
    assert json.loads((tmp_path / "model-7.model_card.json").read_text()) == run["card"]
    assert [r["label"] for r in rows] == [p.label for p in predict_files(path, None, run["test"])]
