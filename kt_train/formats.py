"""Export formats: the ones ``kt_train.export`` writes, and the ones users of other tools ask for
that it does not, each with the way from the exported ONNX file to it.

Not written here: TFLite, Core ML, OpenVINO, TensorRT, TF.js. Their converters (onnx2tf /
TensorFlow, coremltools, openvino, tensorrt) are large, platform-bound and versioned apart from
torch, and none runs from the ONNX file offline on every machine the product supports, so asking for
one is a clear error naming the conversion rather than a format that fails half the time. Torch-free
(the service checks requests with it).
"""

from __future__ import annotations

EXPORT_FORMATS = ("safetensors", "onnx", "torchscript")

# format a user may ask for -> how to get it from the exported model.onnx
NOT_EXPORTED: dict[str, str] = {
    "tflite": "convert model.onnx with onnx2tf (`onnx2tf -i model.onnx`, which needs TensorFlow)",
    "coreml": "convert the exported TorchScript or ONNX model with coremltools on macOS "
    "(`coremltools.convert(torch.jit.load('model.pt'), inputs=[...])`)",
    "openvino": "convert model.onnx with OpenVINO (`ovc model.onnx`), or load model.onnx in OpenVINO directly",
    "tensorrt": "build an engine from model.onnx on the target GPU (`trtexec --onnx=model.onnx`)",
    "tfjs": "convert model.onnx with onnx2tf, then tensorflowjs_converter",
}
ALIASES = {
    "mlmodel": "coreml",
    "mlpackage": "coreml",
    "core_ml": "coreml",
    "tf_lite": "tflite",
    "engine": "tensorrt",
    "trt": "tensorrt",
    "ov": "openvino",
}


def not_exported_message(fmt: str) -> str | None:
    """Why ``fmt`` is not an export format and how to get it, for a format of ``NOT_EXPORTED``
    (or an alias of one); ``None`` for any other string."""
    key = fmt.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in NOT_EXPORTED:
        return None
    return (
        f"export format {fmt!r} is not written (exported: {', '.join(EXPORT_FORMATS)}); export 'onnx' and "
        f"{NOT_EXPORTED[key]}"
    )


def refuse_unsupported(formats: object) -> object:
    """A ``mode="before"`` validator: ``ValueError`` with ``not_exported_message`` for a list that
    names such a format; anything else passes on to the field's own checks."""
    if isinstance(formats, list | tuple):
        for fmt in formats:
            message = not_exported_message(fmt) if isinstance(fmt, str) else None
            if message is not None:
                raise ValueError(message)
    return formats
