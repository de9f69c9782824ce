"""Export formats the product does not write (TFLite, Core ML, OpenVINO, TensorRT, TF.js): a clear
refusal naming the conversion from the exported ONNX file, in the training config, the API and `kt`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kt_train.config import parse_config
from kt_train.errors import ConfigError
from kt_train.formats import NOT_EXPORTED, not_exported_message
from service.schemas import JobCreate
from tests.conftest import small_config_dict


@pytest.mark.parametrize(
    ("fmt", "how"),
    [
        ("tflite", "onnx2tf"),
        ("TFLite", "onnx2tf"),
        ("coreml", "coremltools"),
        ("mlpackage", "coremltools"),
        ("openvino", "ovc model.onnx"),
        ("tensorrt", "trtexec"),
        ("engine", "trtexec"),
        ("tfjs", "tensorflowjs_converter"),
    ],
)
def test_each_unsupported_format_names_its_conversion(fmt: str, how: str) -> None:
    message = not_exported_message(fmt)
    assert message is not None and how in message and "export 'onnx'" in message
    assert f"{fmt!r} is not written" in message


def test_other_strings_are_left_to_the_fields_own_check() -> None:
    assert not_exported_message("onnx") is None and not_exported_message("xyz") is None
    assert set(NOT_EXPORTED) == {"tflite", "coreml", "openvino", "tensorrt", "tfjs"}


def test_the_training_config_refuses_them(demo_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'openvino' is not written.*ovc model\.onnx"):
        parse_config(small_config_dict(demo_data, tmp_path, export__formats=["onnx", "openvino"]))
    assert parse_config(small_config_dict(demo_data, tmp_path, export__formats=["onnx"])).export.formats == [
        "onnx"
    ]


def test_the_api_schema_refuses_them_with_the_conversion() -> None:
    with pytest.raises(ValueError, match=r"'coreml' is not written.*coremltools"):
        JobCreate(dataset_id="a", export_formats=["coreml"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="Input should be 'safetensors', 'onnx' or 'torchscript'"):
        JobCreate(dataset_id="a", export_formats=["xyz"])  # type: ignore[list-item]


def test_the_api_answers_422(tmp_path: Path) -> None:
    from tests.service.test_api import imagefolder_zip, make_settings, running_api, upload

    with running_api(make_settings(tmp_path / "data")) as api, api.client(api.key("acme")) as client:
        dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()
        answer = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "export_formats": ["tflite"]})
        assert answer.status_code == 422 and "onnx2tf" in answer.text, answer.text
